"""Masked decoding vs. ComfyUI's own VAE decoding: time and peak memory.

Cases (random weights; speed and memory do not depend on the values):

* ``comfy_vae``  ComfyUI core ``comfy.sd.VAE(sd=<SD1.5 VAE>).decode(latent)`` (what VAEDecode runs);
* ``avq_x1_5``   Asymmetric VQGAN large 1.5x (widths 192/384/768/768, 4 ResNets per level), SD latents;
* ``avq_base``   Asymmetric VQGAN base (same widths as the SD VAE, plus the condition encoder);
* ``asuka``      ASUKA-FLUX decoder (128/256/512/512, 3 ResNets per level, 16-channel latents).

Every (case, size) runs in a fresh subprocess so that memory numbers are not polluted by
earlier cases. Peak memory is the resident-set high-water mark (``VmHWM``), reset through
``/proc/self/clear_refs`` right before the timed decode, minus the resident set at that
moment: i.e. the extra memory the decode needed on top of the loaded weights. (tracemalloc
does not see torch's allocations.) Each child first decodes a 64x64 image once so that
one-off oneDNN set-up is not timed.

Usage::

    python benchmarks/bench_decoder.py                      # 512 and 1024, default cases
    python benchmarks/bench_decoder.py --sizes 512 --cases comfy_vae avq_x1_5
    python benchmarks/bench_decoder.py --flops --sizes 512 --cases comfy_vae avq_x1_5 avq_base asuka
                                          # arithmetic per decode (torch.utils.flop_counter), no timing
    ASUKA_COMFY_DIR=/path/to/ComfyUI python benchmarks/bench_decoder.py

ComfyUI is imported in-process from ``$ASUKA_COMFY_DIR`` (default ``.host/ComfyUI``), in CPU mode.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CASES = ("comfy_vae", "avq_x1_5", "asuka")
ALL_CASES = ("comfy_vae", "avq_x1_5", "avq_base", "asuka")


# --------------------------------------------------------------------------------------
# memory probes (Linux)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        return True
    except OSError:
        return False


# --------------------------------------------------------------------------------------
# children


def _random_comfy_vae():
    comfy_dir = os.environ.get("ASUKA_COMFY_DIR", os.path.join(REPO, ".host", "ComfyUI"))
    sys.path.insert(0, comfy_dir)
    import comfy.cli_args

    comfy.cli_args.args.cpu = True  # must be set before comfy.model_management is imported
    import torch
    import comfy.sd
    from comfy.ldm.models.autoencoder import AutoencoderKL

    ddconfig = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
    # ComfyUI's layers skip initialisation; fill every tensor with seeded noise instead.
    shapes = {k: v.shape for k, v in AutoencoderKL(ddconfig=ddconfig, embed_dim=4).state_dict().items()}
    gen = torch.Generator().manual_seed(0)
    sd = {k: torch.randn(s, generator=gen) * (0.02 if len(s) > 1 else 1.0) for k, s in shapes.items()}
    vae = comfy.sd.VAE(sd=sd)
    del sd
    return vae, 4, lambda latent, image, mask: vae.decode(latent)


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _random_masked_decoder(case: str, dtype_name: str):
    sys.path.insert(0, REPO)
    import torch
    from asuka_core.decoder import load_decoder
    from tests.fixtures.decoder_files import asuka_decoder_state_dict, avq_ldm_state_dict

    if case == "asuka":
        sd = asuka_decoder_state_dict(0, with_encoder=False)
    elif case == "avq_x1_5":
        sd = avq_ldm_state_dict(0, ch=192, num_res_blocks=3, with_extras=False)
    else:
        sd = avq_ldm_state_dict(0, with_extras=False)
    decoder = load_decoder(sd, dtype=getattr(torch, dtype_name))
    del sd
    return decoder, decoder.latent_channels, decoder.decode


def child(case: str, size: int, dtype_name: str, flops: bool = False) -> dict:
    import torch

    if case == "comfy_vae":
        model, channels, decode = _random_comfy_vae()
    else:
        model, channels, decode = _random_masked_decoder(case, dtype_name)

    def inputs(px: int):
        g = torch.Generator().manual_seed(1)
        latent = torch.randn(1, channels, px // 8, px // 8, generator=g)
        image = torch.rand(1, px, px, 3, generator=g)
        mask = torch.zeros(1, px, px)
        mask[:, px // 4: 3 * px // 4, px // 4: 3 * px // 4] = 1.0
        return latent, image, mask

    if flops:
        from torch.utils.flop_counter import FlopCounterMode

        counter = FlopCounterMode(display=False)
        with torch.inference_mode(), counter:
            decode(*inputs(size))
        return {"case": case, "size": size, "flops": counter.get_total_flops()}

    with torch.inference_mode():
        decode(*inputs(64))                               # warm-up, not timed
        latent, image, mask = inputs(size)
        rss_before = _status_kib("VmRSS")
        exact_peak = _reset_peak()
        t0, c0 = time.perf_counter(), _cpu_seconds()
        out = decode(latent, image, mask)
        seconds, cpu_seconds = time.perf_counter() - t0, _cpu_seconds() - c0
    peak_kib = _status_kib("VmHWM")
    result = {"case": case, "size": size, "seconds": seconds, "cpu_seconds": cpu_seconds,
              "decode_peak_mib": (peak_kib - rss_before) / 1024, "rss_peak_mib": peak_kib / 1024,
              "exact_peak": exact_peak, "out_shape": list(out.shape), "threads": torch.get_num_threads()}
    if case != "comfy_vae":
        from asuka_core.decoder import decode_memory_estimate

        result["estimate_mib"] = decode_memory_estimate(model, latent.shape, getattr(torch, dtype_name)) / 2 ** 20
    return result


# --------------------------------------------------------------------------------------
# parent


def run_case(case: str, size: int, dtype: str, timeout: float, flops: bool = False) -> dict:
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", case, str(size), dtype,
                           *(["--flops"] if flops else [])],
                          capture_output=True, text=True, timeout=timeout, cwd=REPO)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode or not lines:
        raise RuntimeError(f"{case} @ {size} failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 1024])
    parser.add_argument("--cases", nargs="+", default=list(DEFAULT_CASES), choices=ALL_CASES)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                        help="dtype of the masked decoders (ComfyUI's VAE uses what ComfyUI picks: float32 on CPU)")
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--flops", action="store_true", help="count arithmetic per decode instead of timing")
    parser.add_argument("--child", nargs=3, metavar=("CASE", "SIZE", "DTYPE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]), args.child[2], args.flops)), flush=True)
        return
    if args.flops:
        print("arithmetic per decode (torch.utils.flop_counter), batch 1, untiled")
        for size in args.sizes:
            base = None
            for case in ["comfy_vae", *[c for c in args.cases if c != "comfy_vae"]]:
                r = run_case(case, size, args.dtype, args.timeout, flops=True)
                base = base or r
                print(f"{case:<10} {size:>5} {r['flops'] / 1e12:8.2f} TFLOP {r['flops'] / base['flops']:6.2f} x VAE",
                      flush=True)
        return

    cases = ["comfy_vae", *[c for c in args.cases if c != "comfy_vae"]]
    print(f"CPUs: {os.cpu_count()}; masked decoders in {args.dtype}; batch 1; untiled; "
          "ratios (x VAE) are to ComfyUI's VAE decode at the same size")
    print(f"{'case':<10} {'size':>5} {'wall s':>8} {'x VAE':>6} {'CPU s':>8} {'x VAE':>6} {'decode MiB':>11} "
          f"{'x VAE':>6} {'estimate MiB':>13} {'load avg':>9}")
    for size in args.sizes:
        base = None
        for case in cases:
            load = os.getloadavg()[0]
            r = run_case(case, size, args.dtype, args.timeout)
            base = base or r
            est = f"{r['estimate_mib']:13.0f}" if "estimate_mib" in r else f"{'-':>13}"
            print(f"{case:<10} {size:>5} {r['seconds']:8.2f} {r['seconds'] / base['seconds']:6.2f} "
                  f"{r['cpu_seconds']:8.2f} {r['cpu_seconds'] / base['cpu_seconds']:6.2f} "
                  f"{r['decode_peak_mib']:11.0f} {r['decode_peak_mib'] / base['decode_peak_mib']:6.2f} "
                  f"{est} {load:9.2f}", flush=True)
            if not r["exact_peak"]:
                print("  (could not reset VmHWM: peak includes model loading)")


if __name__ == "__main__":
    main()
