"""Region-limited masked decode and 2K SR against decoding / sampling the whole picture.

One table, ratios within one run, random weights (time and memory do not depend on the
values; the region-vs-full *difference* does, see docs/decoder.md):

* decode: for each picture size and mask (families ``object``, ``irregular``, ``box`` of
  ``asuka_core.masks`` at about 5, 25 and 50 % hole), the ASUKA-shaped masked decoder
  (16-channel latents, 3 ResNets per level) with ``region="hole"`` against the same
  decoder on the whole picture (``region="full"``) and against ComfyUI's core VAE decode
  (SD1.5 layout) of the whole picture, all at the same base width (``--width``; 128 is the
  real size). Time, peak memory (resident-set high-water mark reset right before each call,
  minus the resident set then), and inside the hole (mask > 0.5) the difference between
  region and full decode in 0..255 grey levels (max, mean, PSNR).
* SR: one x4-upscaler UNet call at batch 2 (one sampling step with CFG) on a 2048 px
  output (512 x 512 latent), in the example workflow's tiles (1152 px, overlap 128 px),
  through the SR sampler's tile/region wrapper
  (``asuka_core.super_resolution.run_tiled``) with the regions of ``sr_regions``, against
  the whole latent. The tiny UNet (the test checkpoint's layout) is measured in full; the
  real-size UNet (473 M parameters) with ``--real-unet`` is measured on one 64 x 64 tile
  and the rest is extrapolated per latent cell (marked "extrapolated").

``--check`` runs only the 2048 px / 10 % object-hole decode case and ends with
``region/full=<R> below_vae=<yes|no> hole_psnr=<P>``.

Usage::

    scripts/host.sh python benchmarks/bench_region.py                  # the table (width 32)
    scripts/host.sh python benchmarks/bench_region.py --check
    scripts/host.sh python benchmarks/bench_region.py --shares --holes 5 10 25 50   # region sizes only
    scripts/host.sh python benchmarks/bench_region.py --check --width 128   # real-size decoders
    scripts/host.sh python benchmarks/bench_region.py --sizes 1024 --families object --holes 10 --no-sr --norm-oracle
    scripts/host.sh python benchmarks/bench_region.py --sizes 2048 --holes 10 --families object --real-unet
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))
sys.path.insert(0, REPO)

from bench_decoder import _random_comfy_vae, _reset_peak, _status_kib  # noqa: E402
from bench_super_resolution import _comfy, _fill  # noqa: E402
# before ComfyUI's folder joins sys.path: it has a 'tests' package of its own
from tests.fixtures.decoder_files import asuka_decoder_state_dict  # noqa: E402
from tests.fixtures.x4_upscaler_checkpoint import UNET_CONFIG  # noqa: E402
from asuka_core.decoder import load_decoder  # noqa: E402

SEARCH_SIZE = 256  # masks are searched at this size, then drawn at the picture's size


def measure(fn):
    """(result, seconds, extra MiB) of one call."""
    import torch

    with torch.inference_mode():
        rss = _status_kib("VmRSS")
        _reset_peak()
        t0 = time.perf_counter()
        out = fn()
        seconds = time.perf_counter() - t0
    return out, seconds, (_status_kib("VmHWM") - rss) / 1024


def pick_mask(size: int, family: str, share: float):
    """The first of 60 seeded masks of ``family`` whose hole share is closest to ``share``."""
    from asuka_core.masks import MaskGenerator

    probe = MaskGenerator(SEARCH_SIZE, seed=0, shares={family: 1.0}, hole_ratio=(0.005, 0.95))
    best = min(range(60), key=lambda i: abs(float(probe.numpy(i).mean()) - share))
    return MaskGenerator(size, seed=0, shares={family: 1.0}, hole_ratio=(0.005, 0.95))(best)[None]


def hole_difference(a, b, mask):
    """max and mean |a - b| in grey levels, and PSNR (dB), over the hole pixels."""
    hole = mask[0] > 0.5
    d = (a[0][hole] - b[0][hole]).abs() * 255
    mse = float((d ** 2).mean())
    psnr = float("inf") if mse == 0 else 10 * math.log10(255 ** 2 / mse)
    return float(d.max()), float(d.mean()), psnr


class WholePictureNorms:
    """Diagnostic only: every GroupNorm of ``decoder`` normalises with statistics recorded
    from a full decode (``record`` once, then ``replay`` during a region decode). A region
    decode that replays them differs from the full decode only through what is left, i.e.
    nothing if the GroupNorm statistics are the whole remaining difference. Not a way to
    decode: the statistics need the full decode."""

    def __init__(self, decoder, prefixes: tuple[str, ...] = ("",)):
        import torch

        self.norms = [m for name, m in decoder.named_modules()
                      if isinstance(m, torch.nn.GroupNorm) and name.startswith(prefixes)]
        self.stats: dict[int, tuple] = {}

    def _run(self, record: bool, fn):
        for n, norm in enumerate(self.norms):
            def forward(x, n=n, norm=norm):
                g = x.float().reshape(x.shape[0], norm.num_groups, -1)
                if record:
                    self.stats[n] = (g.mean(-1, keepdim=True), g.var(-1, unbiased=False, keepdim=True))
                mean, var = self.stats[n]
                y = ((g - mean) / (var + norm.eps).sqrt()).reshape(x.shape).to(x.dtype)
                return y * norm.weight[:, None, None] + norm.bias[:, None, None]
            norm.forward = forward
        try:
            return fn()
        finally:
            for norm in self.norms:
                del norm.forward

    def record(self, fn):
        return self._run(True, fn)

    def replay(self, fn):
        return self._run(False, fn)


def setup_comfy() -> None:
    """ComfyUI in CPU mode with PyTorch's fused attention in its VAE (``--use-pytorch-cross-attention``),
    the attention kernel the masked decoder uses too; ComfyUI's default on CPU, split attention,
    holds a large part of the 2048 px attention matrix at once."""
    comfy_dir = os.environ.get("ASUKA_COMFY_DIR", os.path.join(REPO, ".host", "ComfyUI"))
    sys.path.insert(0, comfy_dir)
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    comfy.cli_args.args.use_pytorch_cross_attention = True
    _comfy()


def core_vae_decode(width: int):
    """ComfyUI's VAE Decode of SD1.5 latents: ``comfy.sd.VAE.decode`` at the real width (128);
    at other widths ComfyUI's own decoder module (``AutoencoderKL.decode``, what VAE.decode
    runs inside) built with that width, as comfy.sd.VAE only knows the released layout."""
    if width == 128:
        return _random_comfy_vae()[2]
    _comfy()
    import torch
    from comfy.ldm.models.autoencoder import AutoencoderKL

    ddconfig = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": width,
                "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
    model = AutoencoderKL(ddconfig=ddconfig, embed_dim=4).eval()
    _fill(model)
    return lambda latent, image, mask: model.decode(latent).float().add(1).div(2).clamp(0, 1).movedim(1, -1)


def decode_rows(sizes, families, holes, width: int, norm_oracle: bool = False):
    import torch
    from asuka_core.tiling import region_share

    decoder = load_decoder(asuka_decoder_state_dict(0, with_encoder=False, ch=width))
    vae_decode = core_vae_decode(width)
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():  # warm-up (one-off oneDNN set-up)
        decoder.decode(torch.randn(1, 16, 8, 8), torch.rand(1, 64, 64, 3), torch.zeros(1, 64, 64))
        vae_decode(torch.randn(1, 4, 8, 8), None, None)
    rows = []
    for size in sizes:
        cells = size // 8
        latent = torch.randn(1, 16, cells, cells, generator=g) * 2.8
        image = torch.rand(1, size, size, 3, generator=g)
        _, vae_s, vae_mib = measure(lambda: vae_decode(torch.randn(1, 4, cells, cells, generator=g), None, None))
        for family in families:
            for hole in holes:
                mask = pick_mask(size, family, hole / 100)
                boxes = decoder.decode_boxes(mask[0], cells, cells, "hole")
                full, full_s, full_mib = measure(lambda: decoder.decode(latent, image, mask, region="full"))
                region, region_s, region_mib = measure(lambda: decoder.decode(latent, image, mask, region="hole"))
                dmax, dmean, psnr = hole_difference(region, full, mask)
                rows.append(dict(size=size, family=family, hole=float(mask.mean()) * 100,
                                 region=region_share(boxes, cells, cells) * 100, boxes=len(boxes),
                                 vae_s=vae_s, full_s=full_s, region_s=region_s, vae_mib=vae_mib,
                                 full_mib=full_mib, region_mib=region_mib, dmax=dmax, dmean=dmean, psnr=psnr,
                                 load=os.getloadavg()[0]))
                print_decode_row(rows[-1])
                if norm_oracle:
                    lowest = f"up.{decoder.config.levels - 1}.block."
                    for what, prefixes in (("all GroupNorms", ("",)), (f"the {lowest}* GroupNorms", (lowest,))):
                        norms = WholePictureNorms(decoder, prefixes)
                        with torch.inference_mode():
                            recorded = norms.record(lambda: decoder.decode(latent, image, mask, region="full"))
                            replayed = norms.replay(lambda: decoder.decode(latent, image, mask, region="hole"))
                        print(f"  region decode with the full decode's statistics in {what} ({len(norms.norms)}) "
                              f"vs full decode: max / mean / PSNR "
                              "{:.0f} / {:.3f} / {:.1f}".format(*hole_difference(replayed, full, mask)),
                              f"(recording itself: PSNR {hole_difference(recorded, full, mask)[2]:.1f})", flush=True)
                        del recorded, replayed
                del full, region
    return rows


DECODE_HEADER = (f"{'size':>5} {'mask':<9} {'hole%':>5} {'region%':>7} {'VAE s':>7} {'full s':>7} {'region s':>8} "
                 f"{'reg/full':>8} {'reg/VAE':>7} {'VAE MiB':>8} {'full MiB':>8} {'reg MiB':>8} "
                 f"{'max':>5} {'mean':>6} {'PSNR':>6} {'load':>5}")


def print_decode_row(r):
    print(f"{r['size']:>5} {r['family']:<9} {r['hole']:>5.1f} {r['region']:>7.1f} {r['vae_s']:>7.1f} {r['full_s']:>7.1f} "
          f"{r['region_s']:>8.1f} {r['region_s'] / r['full_s']:>8.2f} {r['region_s'] / r['vae_s']:>7.2f} "
          f"{r['vae_mib']:>8.0f} {r['full_mib']:>8.0f} {r['region_mib']:>8.0f} {r['dmax']:>5.0f} {r['dmean']:>6.2f} "
          f"{r['psnr']:>6.1f} {r['load']:>5.1f}", flush=True)


def tiled_cells(boxes, tile: int, overlap: int) -> int:
    """Latent cells the UNet is run on when each box is tiled like a whole latent."""
    from asuka_core.tiling import tile_grid

    return sum(t.height * t.width for b in boxes for t in tile_grid(b.height, b.width, tile, overlap).tiles)


def sr_rows(families, holes, real_unet: bool, tile: int, overlap: int):
    """One UNet call (batch 2) over a 2048 px output's 512 x 512 latent, tiled as the
    example workflow does (``tile``/``overlap`` latent cells): region vs whole."""
    import torch

    from bench_super_resolution import X4_UNET
    from asuka_core.super_resolution import blend_mask, run_tiled, sr_regions
    from asuka_core.tiling import Tile, region_share

    import comfy.supported_models as sm

    out, cells = 2048, 512
    whole = [Tile(0, 0, cells, cells)]
    rows = []
    for name, cfg in (("tiny", UNET_CONFIG), *((("real", X4_UNET),) if real_unet else ())):
        config = sm.SD_X4Upscaler({**cfg, "dtype": torch.float32})
        config.set_inference_dtype(torch.float32, None)
        unet = config.get_model({}).diffusion_model
        _fill(unet)
        g = torch.Generator().manual_seed(1)
        context = torch.randn(2, 77, 1024, generator=g)
        t, y = torch.tensor([999.0, 999.0]), torch.tensor([20, 20])

        def call(x, _spatial):
            return unet(x, t, context=context, y=y)[:, :4]

        with torch.inference_mode():
            call(torch.randn(2, 7, 16, 16), None)            # warm-up
        x = torch.randn(2, 7, cells, cells, generator=g)
        known = torch.zeros(2, 4, cells, cells)
        if name == "tiny":
            _, full_s, full_mib = measure(lambda: run_tiled(call, x, {}, tile=tile, overlap=overlap))
            per_cell = None
        else:  # one 64 x 64 tile, per latent cell
            _, tile_s, full_mib = measure(lambda: call(x[..., :64, :64], None))
            per_cell = tile_s / 64 ** 2
            full_s = per_cell * tiled_cells(whole, tile, overlap)
        for family in families:
            for hole in holes:
                mask = pick_mask(out, family, hole / 100)
                boxes = sr_regions(blend_mask(mask, (cells, cells)), "hole")
                share = region_share(boxes, cells, cells)
                if per_cell is None:
                    _, region_s, region_mib = measure(
                        lambda: run_tiled(call, x, {}, tile=tile, overlap=overlap, boxes=boxes, fill=known))
                else:
                    region_s, region_mib = per_cell * tiled_cells(boxes, tile, overlap), float("nan")
                rows.append(dict(unet=name, family=family, hole=float(mask.mean()) * 100, region=share * 100,
                                 full_s=full_s, region_s=region_s, full_mib=full_mib, region_mib=region_mib,
                                 extrapolated=per_cell is not None, load=os.getloadavg()[0]))
                r = rows[-1]
                time_ratio = r["region_s"] / r["full_s"]
                print(f"{name:<5} {family:<9} {r['hole']:>5.1f} {r['region']:>7.1f} {full_s:>8.1f} {region_s:>8.1f} "
                      f"{time_ratio:>8.2f} {time_ratio / max(share, 1e-9):>9.2f} {full_mib:>8.0f} {region_mib:>8.0f} "
                      f"{'extrapolated' if r['extrapolated'] else 'measured':>12} {r['load']:>5.1f}", flush=True)
        del unet
    return rows


def share_rows(sizes, families, holes) -> None:
    """Region shares only (no timing): the ASUKA decoder's decode boxes
    (``MaskedDecoder.decode_boxes``: hole cells grown by the up-path reach), SR boxes."""
    from asuka_core.super_resolution import blend_mask, sr_regions
    from asuka_core.tiling import region_share

    decoder = load_decoder(asuka_decoder_state_dict(0, with_encoder=False, ch=32))
    print(f"decoder up-path reach {decoder.config.reach_up_cells} latent cells "
          f"({decoder.config.reach_up_px} px); SR at 4x the picture is for 2048 px only")
    print(f"{'size':>5} {'mask':<9} {'hole%':>5} {'decode region%':>14} {'boxes':>5} {'SR region%':>10} {'boxes':>5}")
    for size in sizes:
        for family in families:
            for hole in holes:
                mask = pick_mask(size, family, hole / 100)
                cells = size // 8
                boxes = decoder.decode_boxes(mask[0], cells, cells, "hole")
                line = (f"{size:>5} {family:<9} {float(mask.mean()) * 100:>5.1f} "
                        f"{region_share(boxes, cells, cells) * 100:>14.1f} {len(boxes):>5}")
                if size == 2048:
                    sr = sr_regions(blend_mask(mask, (512, 512)), "hole")
                    line += f" {region_share(sr, 512, 512) * 100:>10.1f} {len(sr):>5}"
                print(line, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048])
    parser.add_argument("--families", nargs="+", default=["object", "irregular", "box"])
    parser.add_argument("--holes", type=float, nargs="+", default=[5, 25, 50], help="hole shares in percent")
    parser.add_argument("--width", type=int, default=32, help="base width of the decoders (128 = real size)")
    parser.add_argument("--no-sr", action="store_true", help="skip the SR rows")
    parser.add_argument("--no-decode", action="store_true", help="skip the decode rows")
    parser.add_argument("--real-unet", action="store_true", help="add the real-size x4 UNet SR rows (slow)")
    parser.add_argument("--sr-tile", type=int, default=288, help="SR tile in latent cells (example: 1152 px = 288)")
    parser.add_argument("--sr-overlap", type=int, default=32, help="SR tile overlap in latent cells (128 px = 32)")
    parser.add_argument("--check", action="store_true", help="the 2048 px / 10 %% object-hole decode only")
    parser.add_argument("--shares", action="store_true", help="only the region shares of the masks (fast)")
    parser.add_argument("--norm-oracle", action="store_true",
                        help="diagnostic: also the region decode with the full decode's GroupNorm statistics")
    args = parser.parse_args()
    import torch

    if args.shares:
        share_rows(args.sizes, args.families, args.holes)
        return
    setup_comfy()
    print(f"CPUs: {os.cpu_count()}; torch threads {torch.get_num_threads()}; float32; decoder width {args.width}; "
          f"load average {os.getloadavg()[0]:.1f}")
    if args.check:
        args.sizes, args.families, args.holes, args.no_sr = [2048], ["object"], [10], True
    rows = []
    if not args.no_decode:
        print("masked decode, region vs full vs core VAE Decode (hole difference region vs full, grey levels)")
        print(DECODE_HEADER)
        rows = decode_rows(args.sizes, args.families, args.holes, args.width, args.norm_oracle)
    if not args.no_sr:
        print(f"\nx4 SR, one UNet call at batch 2 on a 2048 px output (512 x 512 latent) in tiles of "
              f"{args.sr_tile} cells, overlap {args.sr_overlap}: region vs whole; '/ region%' = time ratio / area ratio")
        print(f"{'unet':<5} {'mask':<9} {'hole%':>5} {'region%':>7} {'full s':>8} {'region s':>8} {'reg/full':>8} "
              f"{'/ region%':>9} {'full MiB':>8} {'reg MiB':>8} {'':>12} {'load':>5}")
        sr_rows(args.families, args.holes, args.real_unet, args.sr_tile, args.sr_overlap)
    if args.check and rows:
        r = rows[-1]
        ratio = r["region_s"] / r["full_s"]
        print(f"region/full={ratio:.2f} below_vae={'yes' if r['region_s'] < r['vae_s'] else 'no'} "
              f"hole_psnr={r['psnr']:.1f}")


if __name__ == "__main__":
    main()
