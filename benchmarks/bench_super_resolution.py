"""Memory of HD-Painter's 2K super-resolution stage, measured on CPU per component and
combined into figures for a 2048x2048 output, whole and in tiles.

Components (random weights of the real sizes; memory and time do not depend on the values):

* ``unet L``        the SD x4 upscaler UNet as ComfyUI 0.3.75 builds it (473 M parameters:
                    256 channels, channel_mult 1/2/2/4, 2 res blocks, transformers at the three
                    lower levels, context 1024, 1000 classes), one call at batch 2 (the CFG pair)
                    on an L x L latent: what one sampling step costs for one tile;
* ``encode P``      ComfyUI's x4 VAE (ch_mult 1/2/4) encoding a P x P picture;
* ``decode P``      the same VAE decoding to P x P;
* ``poisson P``     ``asuka_core.poisson.hd_painter_blend`` on P x P with a P/4 square hole.

Each (component, size) runs in a fresh subprocess. "extra MiB" is the peak resident memory
during the call minus the resident memory right before it (``VmHWM`` reset through
``/proc/self/clear_refs``), i.e. the working memory on top of the loaded weights;
"weights MiB" is the resident memory the loaded model added. Float32 on CPU.

The UNet's 2048 figures are extrapolated: its activations grow with the number of pixels,
so a line through the two largest latents measured (per-pixel slope + fixed part) is
evaluated at the tile and at the whole 2048 output. The VAE is reported at its tile size
only (its mid-block attention grows with the square of the pixels). The GPU column is an
estimate, not a measurement: fp16 weights and activations (half of float32).

Usage::

    scripts/host.sh python benchmarks/bench_super_resolution.py                 # default sizes
    scripts/host.sh python benchmarks/bench_super_resolution.py --unet 64 128 --vae 256 512 --save rows.json
    scripts/host.sh python benchmarks/bench_super_resolution.py --summary rows.json --tile 1024
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))
sys.path.insert(0, REPO)

from bench_decoder import _cpu_seconds, _reset_peak, _status_kib  # noqa: E402

X4_UNET = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
    "legacy": False, "adm_in_channels": None, "in_channels": 7, "model_channels": 256,
    "num_res_blocks": [2, 2, 2, 2], "channel_mult": [1, 2, 2, 4],
    "transformer_depth": [0, 0, 1, 1, 1, 1, 1, 1], "transformer_depth_output": [0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1],
    "transformer_depth_middle": 1, "use_linear_in_transformer": True, "context_dim": 1024,
    "use_temporal_attention": False, "use_temporal_resblock": False,
}
OUTPUT = 2048


def _comfy():
    comfy_dir = os.environ.get("ASUKA_COMFY_DIR", os.path.join(REPO, ".host", "ComfyUI"))
    sys.path.insert(0, comfy_dir)
    import comfy.cli_args

    comfy.cli_args.args.cpu = True  # before comfy.model_management is imported
    import comfy.model_detection  # noqa: F401  (ComfyUI's import order)


def _fill(module, seed: int = 0) -> None:
    """ComfyUI's layers skip initialisation: give every tensor small seeded values."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.02 if p.ndim > 1 else 1.0))


def _measure(fn) -> dict:
    import torch

    with torch.inference_mode():
        rss = _status_kib("VmRSS")
        exact = _reset_peak()
        t0, c0 = time.perf_counter(), _cpu_seconds()
        out = fn()
        seconds, cpu = time.perf_counter() - t0, _cpu_seconds() - c0
    peak = _status_kib("VmHWM")
    return {"extra_mib": (peak - rss) / 1024, "seconds": seconds, "cpu_seconds": cpu, "exact_peak": exact,
            "out_shape": list(out.shape)}


def child(part: str, size: int) -> dict:
    import torch

    rss0 = _status_kib("VmRSS")
    if part == "unet":
        _comfy()
        import comfy.supported_models as sm

        config = sm.SD_X4Upscaler({**X4_UNET, "dtype": torch.float32})
        config.set_inference_dtype(torch.float32, None)
        model = config.get_model({})
        _fill(model.diffusion_model)
        params = sum(p.numel() for p in model.diffusion_model.parameters())
        weights = (_status_kib("VmRSS") - rss0) / 1024
        g = torch.Generator().manual_seed(1)
        x = torch.randn(2, 7, size, size, generator=g)
        t = torch.tensor([999.0, 999.0])
        context = torch.randn(2, 77, 1024, generator=g)
        y = torch.tensor([20, 20])
        with torch.inference_mode():  # warm-up at a small size (one-off oneDNN set-up)
            model.diffusion_model(x[..., :16, :16], t, context=context, y=y)
        r = _measure(lambda: model.diffusion_model(x, t, context=context, y=y))
        r.update(params=params, weights_mib=weights)
    elif part in ("encode", "decode"):
        _comfy()
        import comfy.sd
        from comfy.ldm.models.autoencoder import AutoencoderKL

        ddconfig = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                    "ch_mult": [1, 2, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
        shapes = {k: v.shape for k, v in AutoencoderKL(ddconfig=ddconfig, embed_dim=4).state_dict().items()}
        g = torch.Generator().manual_seed(0)
        vae = comfy.sd.VAE(sd={k: torch.randn(s, generator=g) * (0.02 if len(s) > 1 else 1.0)
                               for k, s in shapes.items()})
        assert vae.downscale_ratio == 4
        weights = (_status_kib("VmRSS") - rss0) / 1024
        if part == "encode":
            vae.encode(torch.rand(1, 64, 64, 3))
            pixels = torch.rand(1, size, size, 3, generator=g)
            r = _measure(lambda: vae.encode(pixels))
        else:
            vae.decode(torch.randn(1, 4, 16, 16))
            latent = torch.randn(1, 4, size // 4, size // 4, generator=g)
            r = _measure(lambda: vae.decode(latent))
        r.update(weights_mib=weights)
    elif part == "poisson":
        from asuka_core.poisson import hd_painter_blend

        g = torch.Generator().manual_seed(0)
        original, generated = torch.rand(1, 3, size, size, generator=g), torch.rand(1, 3, size, size, generator=g)
        mask = torch.zeros(1, size, size)
        mask[:, 3 * size // 8: 5 * size // 8, 3 * size // 8: 5 * size // 8] = 1
        r = _measure(lambda: hd_painter_blend(original, generated, mask))
        r.update(weights_mib=0.0)
    else:
        raise SystemExit(f"unknown part {part}")
    r.update(part=part, size=size, threads=torch.get_num_threads())
    return r


def run(part: str, size: int, timeout: float) -> dict:
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", part, str(size)],
                          capture_output=True, text=True, timeout=timeout, cwd=REPO)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode or not lines:
        raise RuntimeError(f"{part} @ {size} failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--unet", type=int, nargs="+", default=[64, 128], help="latent sides for the UNet")
    parser.add_argument("--vae", type=int, nargs="+", default=[256, 512], help="picture sides for the VAE")
    parser.add_argument("--poisson", type=int, nargs="+", default=[OUTPUT])
    parser.add_argument("--tile", type=int, default=1152, help="SR tile side in output pixels for the estimate")
    parser.add_argument("--vae-tile", type=int, default=512, help="VAE tile side in pixels (must be among --vae)")
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--save", help="also write the measured rows to this JSON file")
    parser.add_argument("--summary", help="only print the 2048 summary from rows saved with --save")
    parser.add_argument("--child", nargs=2, metavar=("PART", "SIZE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]))), flush=True)
        return
    if args.summary:
        with open(args.summary) as f:
            summarise(json.load(f), args.tile, args.vae_tile)
        return

    print(f"CPUs: {os.cpu_count()}; float32; each row a fresh process; load average before each row")
    print(f"{'part':<8} {'size':>5} {'weights MiB':>12} {'extra MiB':>10} {'MiB/Mpx':>8} {'wall s':>8} "
          f"{'CPU s':>8} {'load':>5}")
    rows = []
    for part, sizes in (("unet", args.unet), ("encode", args.vae), ("decode", args.vae), ("poisson", args.poisson)):
        for size in sizes:
            load = os.getloadavg()[0]
            r = run(part, size, args.timeout)
            pixels = (size * 4) ** 2 if part == "unet" else size ** 2   # output pixels covered
            r["mib_per_mpx"] = r["extra_mib"] / (pixels / 1e6)
            rows.append(r)
            if args.save:
                with open(args.save, "w") as f:
                    json.dump(rows, f, indent=1)
            print(f"{part:<8} {size:>5} {r['weights_mib']:>12.0f} {r['extra_mib']:>10.0f} {r['mib_per_mpx']:>8.0f} "
                  f"{r['seconds']:>8.1f} {r['cpu_seconds']:>8.1f} {load:>5.1f}", flush=True)

    summarise(rows, args.tile, args.vae_tile)


def fit(rows: list[dict], part: str) -> tuple[float, float, dict]:
    """(MiB per output Mpx, MiB at 0 px) through the two largest sizes measured (a line, so
    fixed overheads do not inflate the per-pixel cost); one size: through the origin."""
    pts = sorted((r for r in rows if r["part"] == part), key=lambda r: r["size"])[-2:]
    mpx = [((r["size"] * 4) ** 2 if part == "unet" else r["size"] ** 2) / 1e6 for r in pts]
    if len(pts) == 1:
        return pts[0]["extra_mib"] / mpx[0], 0.0, pts[-1]
    slope = (pts[1]["extra_mib"] - pts[0]["extra_mib"]) / (mpx[1] - mpx[0])
    return slope, pts[1]["extra_mib"] - slope * mpx[1], pts[-1]


def summarise(rows: list[dict], tile: int, vae_tile: int) -> None:
    """UNet: extrapolated along a line (its only self-attention is at 1/8 of the latent, a
    small share at these sizes). VAE: measured at the tile size only: its mid-block attention
    over all latent cells grows with the square of the pixels (67 MiB at 256 px, 2.2 GiB at
    512 px on this machine), so a whole-2048 figure cannot be extrapolated; it is far beyond
    any GPU without tiling."""
    out_mpx = OUTPUT ** 2 / 1e6
    tile_mpx = min(tile, OUTPUT) ** 2 / 1e6
    est, weights = {}, {}
    if any(r["part"] == "unet" for r in rows):
        slope, base, top = fit(rows, "unet")
        weights["UNet"] = top["weights_mib"]
        est[f"UNet step (batch 2), whole {OUTPUT}"] = base + slope * out_mpx
        est[f"UNet step (batch 2), {tile} px tiles"] = base + slope * tile_mpx
    for part, label in (("encode", "VAE encode"), ("decode", "VAE decode")):
        at = [r for r in rows if r["part"] == part and r["size"] == vae_tile]
        if at:
            weights["VAE"] = at[0]["weights_mib"]
            est[f"{label}, {vae_tile} px tiles (measured)"] = at[0]["extra_mib"]
    pois = [r for r in rows if r["part"] == "poisson" and r["size"] == OUTPUT]
    if pois:
        est[f"Poisson blend {OUTPUT} (measured)"] = pois[0]["extra_mib"]
    print(f"\n{OUTPUT}x{OUTPUT} output: working memory on top of the loaded weights (float32 resident: "
          f"{', '.join(f'{k} {v:.0f} MiB' for k, v in weights.items())}); UNet rows from a line through "
          "the two largest latents measured; GPU column = half (fp16), an estimate:")
    print(f"{'stage':<40} {'CPU fp32 MiB':>13} {'GPU fp16 MiB (est.)':>20}")
    for name, mib in est.items():
        # the VAE's CPU figure is dominated by a materialised attention matrix, which GPU SDPA
        # kernels do not build: no estimate is derived from it
        gpu = "-" if name.startswith("VAE") else f"{mib if name.startswith('Poisson') else mib / 2:.0f}"
        print(f"{name:<40} {mib:>13.0f} {gpu:>20}")


if __name__ == "__main__":
    main()
