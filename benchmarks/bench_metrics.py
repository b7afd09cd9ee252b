"""Cost of the offline evaluation metrics per image pair on this machine.

    scripts/host.sh python benchmarks/bench_metrics.py [--size 512] [--runs 5] [--threads N]

Times each metric of ``asuka_core.metrics`` on one photo (scikit-image's astronaut,
resized to ``--size``) with a generated mask and a blurred, colour-shifted fill, and, as a
baseline in the same run, the test oracles that compute the same number (scikit-image for
PSNR / SSIM / CIEDE2000, OpenCV for the Grad formula, as ``tests/unit/test_metrics.py``
writes them). Median of ``--runs`` calls after one warm-up. Needs the test tools
(scikit-image, OpenCV) that ``scripts/host.sh`` installs.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import cv2
import numpy as np
import skimage.color
import skimage.data
import skimage.metrics
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from asuka_core import metrics  # noqa: E402
from asuka_core.masks import EVALUATION_SHARES, MaskGenerator  # noqa: E402


def _median(fn, runs: int) -> float:
    fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    s = args.size
    truth = cv2.resize(skimage.data.astronaut(), (s, s), interpolation=cv2.INTER_AREA)
    mask = MaskGenerator(s, seed=0, shares=EVALUATION_SHARES, hole_ratio=(0.2, 0.8)).numpy(0)
    fill = np.clip(cv2.GaussianBlur(truth, (9, 9), 3).astype(int) + [10, -5, 0], 0, 255).astype(np.uint8)
    result = np.where(mask[..., None], fill, truth)
    pasted = np.where(mask[..., None], result, truth) / 255.0
    grey = np.array([0.2989, 0.587, 0.114])

    def oracle_grad():
        m255 = mask.astype(np.uint8) * 255
        edges = cv2.Canny(m255, 100, 200) > 0
        out = []
        for c in range(3):
            pc, gc = pasted[..., c] * 255, truth[..., c].astype(np.float64)
            dx = cv2.Sobel(pc, cv2.CV_64F, 1, 0, ksize=3) - cv2.Sobel(gc, cv2.CV_64F, 1, 0, ksize=3)
            dy = cv2.Sobel(pc, cv2.CV_64F, 0, 1, ksize=3) - cv2.Sobel(gc, cv2.CV_64F, 0, 1, ksize=3)
            out.append(np.sqrt(dx ** 2 + dy ** 2)[edges].mean())
        return np.mean(out)

    def oracle_de():
        de = skimage.color.deltaE_ciede2000(skimage.color.rgb2lab(result), skimage.color.rgb2lab(truth))
        return de[~mask].mean()

    oracles = {
        "psnr": lambda: skimage.metrics.peak_signal_noise_ratio(truth / 255.0, pasted, data_range=1.0),
        "ssim": lambda: skimage.metrics.structural_similarity(pasted @ grey, truth / 255.0 @ grey, data_range=1.0),
        "grad": oracle_grad,
        "seam": None,
        "unmasked_de2000": oracle_de,
    }
    fns = {"psnr": metrics.psnr, "ssim": metrics.ssim, "grad": metrics.grad, "seam": metrics.seam,
           "unmasked_de2000": metrics.unmasked_de2000}
    print(f"# metrics per {s}x{s} pair, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"median of {args.runs}, load average {os.getloadavg()[0]:.1f}")
    print(f"{'metric':<18}{'asuka_core (ms)':>16}{'oracle (ms)':>13}{'ratio':>8}")
    total = 0.0
    for name, fn in fns.items():
        ours = _median(lambda: fn(result, truth, mask), args.runs)
        total += ours
        if oracles[name] is None:
            print(f"{name:<18}{ours * 1e3:>16.1f}{'-':>13}{'-':>8}")
            continue
        ref = _median(oracles[name], args.runs)
        print(f"{name:<18}{ours * 1e3:>16.1f}{ref * 1e3:>13.1f}{ours / ref:>8.2f}")
    print(f"{'all five':<18}{total * 1e3:>16.1f}")


if __name__ == "__main__":
    main()
