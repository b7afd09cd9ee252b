"""MAE prior encode time on this machine (ViT-B, random weights).

    .host/venv/bin/python benchmarks/bench_mae.py [--size 512] [--runs 3] [--device cpu]

Times ``MAE.encode`` end to end (uint8 rounding, OpenCV-exact resizes, encoder, decoder
feature and reconstruction) at batch 1 and 4, in float32 and bfloat16, after one warm-up
call; reports the median of ``--runs`` timed calls.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from asuka_core.mae import MAE  # noqa: E402
from tests.fixtures.mae_files import official_mae_state_dict  # noqa: E402


def _inputs(batch: int, size: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    image = torch.rand(batch, size, size, 3, generator=g)
    mask = torch.zeros(batch, size, size)
    mask[:, size // 4: size // 2 + 7, size // 3: size // 3 * 2 + 5] = 1.0
    return image.to(device), mask.to(device)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_encode(model: MAE, batch: int, size: int, runs: int, device: str) -> float:
    image, mask = _inputs(batch, size, device)
    model.encode(image, mask, batch_size=batch)  # warm-up
    times = []
    for _ in range(runs):
        _sync(device)
        start = time.perf_counter()
        model.encode(image, mask, batch_size=batch)
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=512, help="input image side in pixels (default 512)")
    parser.add_argument("--runs", type=int, default=3, help="timed runs per setting (default 3)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    sd = official_mae_state_dict(0)
    print(f"MAE prior encode, ViT-B/16 (random weights), input {args.size}x{args.size}, "
          f"device {args.device}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"median of {args.runs} runs after 1 warm-up")
    if hasattr(os, "getloadavg"):  # timings on a shared machine are only comparable at similar load
        print("load average at start: {:.1f} {:.1f} {:.1f}".format(*os.getloadavg()))
    print(f"{'dtype':<10}{'batch':>6}{'total (s)':>12}{'per image (s)':>16}")
    for dtype in (torch.float32, torch.bfloat16):
        model = MAE.from_state_dict(sd, dtype=dtype, device=args.device)
        for batch in (1, 4):
            t = time_encode(model, batch, args.size, args.runs, args.device)
            print(f"{str(dtype).removeprefix('torch.'):<10}{batch:>6}{t:>12.3f}{t / batch:>16.3f}")
        del model


if __name__ == "__main__":
    main()
