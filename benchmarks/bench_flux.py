"""How much ASUKA's FLUX conditioning costs against FLUX.1-Fill sampling.

Times, in one process on the same device and dtype, with random weights of the real sizes:

* the MAE prior (ViT-B as released) on one 512x512 image;
* the CLIP-branch aligner (768 wide, 4 blocks, as released) -> pooled vector;
* the T5-branch aligner (4096 wide): its input layer + 1 block + final norm measured, and
  the 3 further identical blocks timed alone and added (the whole 0.8 B parameters would
  need 3.2 GB in float32; --t5-depth 4 runs it whole where memory allows);
* one FLUX.1-Fill transformer step at 512x512 (1024 image tokens + 256 ASUKA tokens):
  ComfyUI's own Flux model with the real widths, 1 double + 1 single block (the test
  model's sizes plus one single block), each block timed by hooks; the full model
  (19 double + 38 single blocks) is **estimated** from those block times.

    scripts/host.sh python benchmarks/bench_flux.py [--size 512] [--dtype float32|bfloat16] [--repeat 3]

Figures are CPU seconds of the process (both threads; wall time on a shared machine
measures the neighbours). Prints measured figures and the estimate, each labelled, and the
peak memory of the process (ru_maxrss).
"""

from __future__ import annotations

import argparse
import gc
import os
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_conditioning import COMFY, fixture  # noqa: E402  (also puts ComfyUI and the repo on sys.path)

FULL_DOUBLE, FULL_SINGLE = 19, 38   # FLUX.1-Fill-dev


def median_time(fn, repeat: int) -> float:
    """Median CPU seconds of the process (all threads) per call: on a busy shared machine
    wall time mostly measures the neighbours; CPU time measures the work."""
    times = []
    for _ in range(repeat):
        t = time.process_time()
        fn()
        times.append(time.process_time() - t)
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--t5-depth", type=int, default=1, help="T5-aligner blocks actually built (1..4)")
    args = parser.parse_args()

    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    comfy.cli_args.args.use_pytorch_cross_attention = True
    import torch

    from asuka_core.aligner import Aligner
    from asuka_core.flux import pooled_from_tokens
    from asuka_core.mae import MAE

    aligner_files, mae_files = fixture("aligner_files"), fixture("mae_files")
    dtype = getattr(torch, args.dtype)
    size, rep = args.size, args.repeat
    torch.manual_seed(0)
    image = torch.rand(1, size, size, 3)
    mask = torch.zeros(1, size, size)
    mask[:, size // 4: 3 * size // 4, size // 4: 3 * size // 4] = 1.0
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, dtype {args.dtype}, "
          f"image {size}x{size}, load average {os.getloadavg()[0]:.1f}")

    def build_aligner(width, depth, seed):
        sd = aligner_files.without_modulation(aligner_files.official_aligner_state_dict(seed, width, depth))
        model = Aligner.from_state_dict(sd, dtype=dtype).eval()
        del sd
        return model

    # ---- conditioning (measured)
    mae = MAE.from_state_dict(mae_files.official_mae_state_dict(0), dtype=dtype).eval()
    with torch.inference_mode():
        feats = mae.encode(image, mask).features
        t_mae = median_time(lambda: mae.encode(image, mask), rep)
    del mae
    clip = build_aligner(768, 4, 1)
    with torch.inference_mode():
        clip(feats)
        t_clip = median_time(lambda: pooled_from_tokens(clip(feats)), rep)
    del clip
    gc.collect()
    t5 = build_aligner(4096, args.t5_depth, 2)
    with torch.inference_mode():
        t5(feats)
        t_t5_built = median_time(lambda: t5(feats), rep)
        block = t5._modules["1"]
        x = torch.randn(1, 256, 4096, dtype=dtype)
        t_t5_block = median_time(lambda: block(x), rep)
    t_t5 = t_t5_built + (4 - args.t5_depth) * t_t5_block
    del t5, block
    gc.collect()

    # ---- one FLUX.1-Fill step (real widths, measured per block)
    from comfy.ldm.flux.model import Flux

    cfg = dict(image_model="flux", in_channels=96, out_channels=16, vec_in_dim=768, context_in_dim=4096,
               hidden_size=3072, mlp_ratio=4.0, num_heads=24, depth=1, depth_single_blocks=1,
               axes_dim=[16, 56, 56], theta=10000, patch_size=2, qkv_bias=True, guidance_embed=True)
    flux = Flux(**cfg, dtype=dtype, device="cpu", operations=torch.nn).eval()
    with torch.no_grad():
        for name, p in flux.named_parameters():
            if name.endswith("scale"):
                p.fill_(1.0)
    spans: dict[str, list[float]] = {"double": [], "single": []}

    def timer(kind):
        start = {}

        def pre(_m, _a, _k=None):
            start["t"] = time.process_time()

        def post(_m, _a, _o, _k=None):
            spans[kind].append(time.process_time() - start["t"])

        return pre, post

    for kind, module in (("double", flux.double_blocks[0]), ("single", flux.single_blocks[0])):
        pre, post = timer(kind)
        module.register_forward_pre_hook(pre)
        module.register_forward_hook(post)
    lat = size // 8
    x = torch.randn(1, 96, lat, lat, dtype=dtype)
    ctx = torch.randn(1, 256, 4096, dtype=dtype)
    y = torch.randn(1, 768, dtype=dtype)
    step = lambda: flux(x, torch.tensor([0.5], dtype=dtype), ctx, y=y,  # noqa: E731
                        guidance=torch.tensor([30.0], dtype=dtype), transformer_options={})
    with torch.inference_mode():
        step()
        spans["double"].clear(), spans["single"].clear()
        t_step_small = median_time(step, rep)
    med = lambda v: sorted(v)[len(v) // 2]  # noqa: E731
    t_double, t_single = med(spans["double"]), med(spans["single"])
    t_rest = t_step_small - t_double - t_single
    t_full = t_rest + FULL_DOUBLE * t_double + FULL_SINGLE * t_single
    params = sum(p.numel() for p in flux.parameters())
    del flux

    t_cond = t_mae + t_clip + t_t5
    tokens = (size // 16) ** 2
    print(f"\nmeasured, CPU seconds of the process (median of {rep}):")
    print(f"  MAE prior (ViT-B)                          {t_mae:9.3f} s")
    print(f"  CLIP-branch aligner (768 x 4 blocks)       {t_clip:9.3f} s")
    print(f"  T5-branch aligner, {args.t5_depth} block(s) built       {t_t5_built:9.3f} s")
    print(f"  T5-branch aligner, one block               {t_t5_block:9.3f} s")
    print(f"  FLUX step, 1 double + 1 single ({params / 1e6:.0f} M params, {tokens}+256 tokens) "
          f"{t_step_small:9.3f} s")
    print(f"    of which double block {t_double:.3f} s, single block {t_single:.3f} s, rest {t_rest:.3f} s")
    label = "measured" if args.t5_depth == 4 else f"estimated: {args.t5_depth} built + {4 - args.t5_depth} x block"
    print(f"\nT5-branch aligner, 4 blocks ({label})  {t_t5:9.3f} s")
    print(f"prior + both aligners                       {t_cond:9.3f} s")
    print(f"FLUX.1-Fill step, 19 double + 38 single (ESTIMATED from block times) {t_full:9.3f} s")
    print(f"conditioning / one full step (estimate)     {100 * t_cond / t_full:9.2f} %")
    print(f"conditioning / 50 full steps (estimate)     {100 * t_cond / (50 * t_full):9.3f} %")
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB; ComfyUI at {COMFY}")


if __name__ == "__main__":
    main()
