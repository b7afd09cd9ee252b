"""Cost of HD-Painter's PAIntA and RASG against a plain sampler step.

Runs, each mode in its own subprocess (clean peak-memory figures), the same sampling on the
random full-size SD1.5 inpainting UNet (the test checkpoint, 859.5 M parameters, random
weights) through ComfyUI's ``comfy.sample.sample_custom`` with CFG (batch 2):

* plain:  Euler (= deterministic DDIM) on the unpatched model
* painta: Euler on the model patched by the HDPainter_PAIntA node (active at these steps)
* rasg:   the HDPainter_RASGSampler node's sampler (forward with graph + backward to x per step)

and prints seconds per step (wall and CPU), the peak resident memory during sampling above
the loaded model, and the ratios to the plain step. Goals: PAIntA <= 1.15x, RASG <= 2.5x.

    scripts/host.sh python benchmarks/bench_hd_painter.py [--size 512] [--steps 3] [--dtype bfloat16]

The UNet weights and activations are in ``--dtype`` (bfloat16 by default: a 512x512 RASG
step in float32 would need ~7 GB on the CPU). Timed steps are the first ``--steps`` steps
of a 50-step 'simple' schedule (t = 999, 979, ...; PAIntA active), after one warm-up step.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMFY = os.environ.get("ASUKA_COMFY_DIR", os.path.join(REPO, ".host", "ComfyUI"))
CACHE = os.environ.get("ASUKA_HOST_CACHE", os.path.join(REPO, ".host", "cache"))
MODES = ("plain", "painta", "rasg")


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")          # resets VmHWM (peak RSS) to the current RSS
        return True
    except OSError:
        return False


def _load_pack():
    import importlib
    import importlib.util

    name = "comfyui_asuka_bench"
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "__init__.py"),
                                                  submodule_search_locations=[REPO])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return importlib.import_module(name + ".nodes.hd_painter")


def child(mode: str, size: int, steps: int, dtype_name: str) -> dict:
    sys.path[:0] = [COMFY]
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    comfy.cli_args.args.use_pytorch_cross_attention = True
    import torch
    from safetensors.torch import load_file

    import comfy.model_detection
    import comfy.model_patcher
    import comfy.sample
    import comfy.samplers

    hd = _load_pack()
    dtype = getattr(torch, dtype_name)
    from bench_conditioning import fixture     # benchmarks/ is on sys.path when run as a script

    ckpt = fixture("sd15_checkpoint").ensure_sd15_inpaint_checkpoint(CACHE, COMFY)
    prefix = "model.diffusion_model."
    with torch.inference_mode():                          # as ComfyUI's executor loads models
        sd = {k: v for k, v in load_file(ckpt).items() if k.startswith(prefix)}
        config = comfy.model_detection.model_config_from_unet(sd, prefix)
        config.set_inference_dtype(dtype, None)           # compute in dtype, no per-layer casts
        model = config.get_model(sd, prefix)
        model.load_model_weights(sd, prefix)
        del sd
    cpu = torch.device("cpu")
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)
    n_params = sum(p.numel() for p in model.diffusion_model.parameters())

    tokens = hd.PromptTokens((1, 2, 3, 4, 5), "bench")
    if mode == "painta":
        patcher = hd.PAIntA.execute(patcher, tokens, 500).args[0]
        sampler = comfy.samplers.ksampler("euler")
    elif mode == "rasg":
        sampler = hd.RASGSampler.execute(tokens, 0.1, "official_code").args[0]
    else:
        sampler = comfy.samplers.ksampler("euler")

    g = torch.Generator().manual_seed(0)
    lat = size // 8
    pixel_mask = torch.zeros(1, size, size)
    pixel_mask[:, size // 4: 3 * size // 4, size // 4: 3 * size // 4] = 1.0
    extra = {"concat_latent_image": torch.randn(1, 4, lat, lat, generator=g), "concat_mask": pixel_mask}
    positive = [[torch.randn(1, 77, 768, generator=g), dict(extra)]]
    negative = [[torch.randn(1, 77, 768, generator=g), dict(extra)]]
    latent = torch.zeros(1, 4, lat, lat)
    noise = torch.randn(1, 4, lat, lat, generator=g)
    sigma_table = patcher.get_model_object("model_sampling").sigmas
    schedule = [float(sigma_table[999 - 20 * i]) for i in range(steps + 2)]

    def run(n: int) -> float:
        sig = torch.tensor(schedule[:n + 1])
        t, c = time.perf_counter(), time.process_time()
        with torch.inference_mode():
            out = comfy.sample.sample_custom(patcher, noise, 7.5, sampler, sig, positive, negative, latent,
                                             disable_pbar=True, seed=0)
        assert torch.isfinite(out).all()
        return time.perf_counter() - t, time.process_time() - c

    # RASG copies the UNet's inference-mode weights once per sampling (scoped to the
    # sampler call); that copy is inside the timed runs.
    import ctypes
    import gc

    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)              # return freed heap, for a clean baseline
    peak_ok = _reset_peak()
    base = _status_kib("VmRSS")
    run(1)                                                # warm-up
    seconds, cpu_seconds = run(steps)
    peak = _status_kib("VmHWM") if peak_ok else 0
    return {"mode": mode, "step_s": seconds / steps, "cpu_step_s": cpu_seconds / steps,
            "load": os.getloadavg()[0], "rss_base_mib": base / 1024,
            "peak_extra_mib": (peak - base) / 1024 if peak_ok else None, "params": n_params,
            "threads": torch.get_num_threads()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args.child, args.size, args.steps, args.dtype)), flush=True)
        return
    results = {}
    for mode in args.modes.split(","):
        proc = subprocess.run([sys.executable, __file__, "--child", mode, "--size", str(args.size),
                               "--steps", str(args.steps), "--dtype", args.dtype],
                              capture_output=True, text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            sys.exit(f"{mode} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        results[mode] = json.loads(lines[-1][len("RESULT "):])
        r = results[mode]
        print(f"{mode:7s} {r['step_s']:8.2f} s/step ({r['cpu_step_s']:.2f} CPU s, load {r['load']:.1f})   "
              f"peak +{r['peak_extra_mib']:7.0f} MiB over the loaded "
              f"model ({r['rss_base_mib']:.0f} MiB)", flush=True)
    plain = results.get("plain")
    first = next(iter(results.values()))
    print(f"\nSD1.5 inpainting UNet ({first['params'] / 1e6:.1f} M parameters, random weights), {args.dtype}, "
          f"{args.size}x{args.size}, CFG batch 2, CPU, {first['threads']} threads, {args.steps} timed steps")
    print(f"{'mode':8s} {'wall s':>8s} {'ratio':>7s} {'CPU s':>8s} {'ratio':>7s} {'peak extra MiB':>15s} {'ratio':>7s}")
    for mode, r in results.items():
        def ratio(key):
            return f"{r[key] / plain[key]:.2f}x" if plain and plain[key] else "-"
        print(f"{mode:8s} {r['step_s']:8.2f} {ratio('step_s'):>7s} {r['cpu_step_s']:8.2f} {ratio('cpu_step_s'):>7s} "
              f"{r['peak_extra_mib']:15.0f} {ratio('peak_extra_mib'):>7s}")
    print("goals: painta <= 1.15x, rasg <= 2.5x of plain")


if __name__ == "__main__":
    main()
