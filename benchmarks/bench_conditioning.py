"""How much ASUKA's conditioning adds to an SD1.5 inpainting run.

Times, in one process and on the same device, the MAE prior + aligner (ViT-B MAE and a
768-wide aligner, random weights) against the KSampler of the same graph
(SD1.5 inpainting UNet, full size, random weights) at 512x512, and prints the ratio.
Goal: conditioning under 2 % of the sampler's time.

    scripts/host.sh python benchmarks/bench_conditioning.py [--steps 20] [--size 512]

Needs the host set up by scripts/host.sh (ComfyUI tree and its venv). The SD1.5 checkpoint
is the random-weight test checkpoint, built and cached on first use (~30 s, 2.1 GB).
With fewer --steps the sampler time is also extrapolated to 20 steps, and labelled so.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMFY = os.environ.get("ASUKA_COMFY_DIR", os.path.join(REPO, ".host", "ComfyUI"))
CACHE = os.environ.get("ASUKA_HOST_CACHE", os.path.join(REPO, ".host", "cache"))
# ComfyUI first: its top-level `nodes` module must win over this pack's `nodes` package
sys.path[:0] = [COMFY]
sys.path.append(REPO)


def fixture(name: str):
    """A module of tests/fixtures/, loaded by path (ComfyUI has a `tests` package of its own)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"asuka_fixture_{name}",
                                                  os.path.join(REPO, "tests", "fixtures", name + ".py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def median_time(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--cfg", type=float, default=1.0)
    args = parser.parse_args()

    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    comfy.cli_args.args.use_pytorch_cross_attention = True
    import utils.install_util  # noqa: F401  (ComfyUI needs it imported before `nodes`)
    import torch

    import comfy.model_management as mm
    import comfy.sample
    import comfy.sd
    import nodes

    from asuka_core.aligner import Aligner
    from asuka_core.mae import MAE
    official_aligner_state_dict = fixture("aligner_files").official_aligner_state_dict
    official_mae_state_dict = fixture("mae_files").official_mae_state_dict
    ensure_sd15_inpaint_checkpoint = fixture("sd15_checkpoint").ensure_sd15_inpaint_checkpoint

    torch.manual_seed(0)
    size = args.size
    image = torch.rand(1, size, size, 3)
    mask = torch.zeros(1, size, size)
    mask[:, size // 4: 3 * size // 4, size // 4: 3 * size // 4] = 1.0

    mae = MAE.from_state_dict(official_mae_state_dict(0)).eval()
    aligner = Aligner.from_state_dict(official_aligner_state_dict(0), metadata={"asuka.target": "sd15"}).eval()

    def conditioning():
        with torch.inference_mode():
            prior = mae.encode(image, mask)
            return aligner.conditioning(prior.features, 1.0)

    conditioning()  # warm-up
    t_cond = median_time(conditioning, 5)
    positive, negative = conditioning()

    ckpt = ensure_sd15_inpaint_checkpoint(CACHE, COMFY)
    model, _clip, vae = comfy.sd.load_checkpoint_guess_config(ckpt, output_vae=True, output_clip=False)[:3]
    pos, neg, latent = nodes.InpaintModelConditioning().encode(
        [[positive, {}]], [[negative, {}]], image, vae, mask, True)
    noise = comfy.sample.prepare_noise(latent["samples"], 0)

    def sample(steps):
        with torch.inference_mode():
            comfy.sample.sample(model, noise, steps, args.cfg, "euler", "normal", pos, neg, latent["samples"],
                                noise_mask=latent.get("noise_mask"), disable_pbar=True, seed=0)

    sample(1)  # warm-up: loads the model
    t = time.perf_counter()
    sample(args.steps)
    t_sample = time.perf_counter() - t
    t_sample20 = t_sample * 20 / args.steps

    device = mm.get_torch_device()
    print(f"device: {device}, torch threads: {torch.get_num_threads()}, image {size}x{size}, cfg {args.cfg}")
    print(f"MAE prior + aligner (median of 5):  {t_cond:8.3f} s")
    print(f"KSampler, {args.steps} steps:              {t_sample:8.3f} s")
    if args.steps != 20:
        print(f"KSampler, 20 steps (extrapolated):  {t_sample20:8.3f} s")
    print(f"conditioning / sampler (20 steps):  {100 * t_cond / t_sample20:8.2f} %   (goal < 2 %)")


if __name__ == "__main__":
    main()
