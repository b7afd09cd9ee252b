"""GPU check: run every model of the pack in bfloat16 and float16 on a GPU, through the
nodes' own code and ComfyUI's model management, and print what it measured.

    python benchmarks/gpu_check.py --comfy /path/to/ComfyUI          # a GPU machine, ComfyUI's python
    scripts/host.sh python benchmarks/gpu_check.py --device cpu --smoke   # quick CPU smoke run

One command, random weights of the released sizes (nothing to download), a few minutes on
a recent GPU. For each model (MAE prior, SD1.5-size aligner, FLUX T5-size aligner, ASUKA
decoder, Asymmetric VQGAN x1.5 decoder) and each dtype the GPU supports, it reports:

* the dtype the pack would choose on this GPU (``nodes.common.compute_dtype``);
* time per call (median of --repeat after a warm-up) and the ratio to float32;
* the relative RMS error against the float32 output, and whether the output is finite;
* for the decoders, untiled decodes at 512, 1024 and 2048 px: peak memory
  (``torch.cuda.max_memory_allocated`` above what was allocated before) against
  ``decode_memory_estimate`` (the figure ComfyUI frees memory by), and a 2048x2048 decode
  in 512 px tiles (time, peak, and its difference to the untiled decode when that fits).

Results are printed as tables and, with --out, written as JSON. ``--device cpu --smoke``
runs the same code with tiny models and sizes so that the script itself can be checked
on a machine without a GPU (no GPU figures come out of that). The project's own machines
have no GPU: this script has not been run on one yet (see docs/gpu.md).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import math
import os
import platform
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACK = "comfyui_asuka_gpu_check"
KINDS = ("mae", "aligner_sd15", "aligner_t5", "asuka_decoder", "avq_decoder")


def fixture(name: str):
    """A random-weight generator from tests/fixtures/, loaded by path (ComfyUI has a
    ``tests`` package of its own)."""
    spec = importlib.util.spec_from_file_location(f"asuka_fixture_{name}",
                                                  os.path.join(REPO, "tests", "fixtures", name + ".py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def import_comfy(comfy_dir: str, device: str):
    if not os.path.isfile(os.path.join(comfy_dir, "comfy", "model_management.py")):
        sys.exit(f"{comfy_dir} is not a ComfyUI folder: pass --comfy /path/to/ComfyUI")
    sys.path[:0] = [comfy_dir]      # ComfyUI's top-level `nodes` must win over the pack's package
    import comfy.cli_args

    comfy.cli_args.args.cpu = device == "cpu"
    import comfy.model_management as mm
    import comfy.ops

    spec = importlib.util.spec_from_file_location(PACK, os.path.join(REPO, "__init__.py"),
                                                  submodule_search_locations=[REPO])
    pack = importlib.util.module_from_spec(spec)
    sys.modules[PACK] = pack
    spec.loader.exec_module(pack)
    return mm, comfy.ops, lambda name: importlib.import_module(f"{PACK}.{name}")


# ------------------------------------------------------------------------------ measuring


class Meter:
    def __init__(self, torch, device):
        self.torch, self.device = torch, device
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize(self.device)

    def time(self, fn, repeat: int) -> float:
        fn()                                   # warm-up (kernels, caches, model placement)
        self.sync()
        times = []
        for _ in range(repeat):
            t = time.perf_counter()
            fn()
            self.sync()
            times.append(time.perf_counter() - t)
        return statistics.median(times)

    def peak(self, fn) -> tuple[object, int | None]:
        """(result, peak bytes allocated above the level before): CUDA's allocator
        statistics on a GPU; elsewhere the tensors each op allocates, tracked op by op
        (tests/fixtures/tensor_memory.py)."""
        torch = self.torch
        if not self.cuda:
            with fixture("tensor_memory").TensorMemory() as memory:
                out = fn()
            return out, memory.peak
        self.sync()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        out = fn()
        self.sync()
        return out, torch.cuda.max_memory_allocated(self.device) - base


def rel_rms(torch, got, expected) -> float:
    got, expected = got.float().cpu(), expected.float().cpu()
    return float((got - expected).pow(2).mean().sqrt() / expected.pow(2).mean().sqrt().clamp_min(1e-12))


def is_oom(torch, e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


def mib(n) -> str:
    return "-" if n is None else f"{n / 2**20:.0f}"


# ------------------------------------------------------------------------------ the check


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--comfy", default=os.environ.get("ASUKA_COMFY_DIR", os.path.join(REPO, ".host", "ComfyUI")),
                        help="the ComfyUI folder (default: $ASUKA_COMFY_DIR or .host/ComfyUI)")
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (cpu: a smoke run, no GPU figures)")
    parser.add_argument("--smoke", action="store_true", help="tiny models and sizes (checks the script, measures nothing)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--skip-t5", action="store_true", help="leave out the 0.8 B-parameter T5 aligner (3.2 GB in fp32)")
    parser.add_argument("--models", help="comma-separated subset of: " + ", ".join(KINDS))
    parser.add_argument("--out", help="also write the results as JSON here")
    args = parser.parse_args()
    if args.smoke:
        args.repeat = min(args.repeat, 1)
    if args.device == "cpu" and not args.smoke:
        print("note: --device cpu without --smoke runs full-size models on the CPU (slow); "
              "the figures are CPU figures, not GPU ones", file=sys.stderr)

    mm, ops, pack = import_comfy(args.comfy, "cpu" if args.device == "cpu" else "cuda")
    import torch

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device visible to this PyTorch; use --device cpu --smoke to check the script")
    common = pack("nodes.common")
    mae_nodes, aligner_nodes, decoder_nodes = pack("nodes.mae"), pack("nodes.aligner"), pack("nodes.decoder")
    core_mae, core_aligner, core_decoder = pack("asuka_core.mae"), pack("asuka_core.aligner"), pack("asuka_core.decoder")
    mae_files, aligner_files, decoder_files = fixture("mae_files"), fixture("aligner_files"), fixture("decoder_files")
    meter = Meter(torch, device)
    offload = torch.device("cpu")

    # ---- what runs where
    info = {"torch": torch.__version__, "python": platform.python_version(), "device": str(device),
            "smoke": args.smoke}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, capability=f"{props.major}.{props.minor}",
                    memory_gib=round(props.total_memory / 2**30, 1), bf16_supported=torch.cuda.is_bf16_supported())
        dtypes = [torch.bfloat16, torch.float16] if torch.cuda.is_bf16_supported() else [torch.float16]
    else:
        dtypes = [torch.bfloat16, torch.float16]
    info["pack_dtype_encoder"] = str(common.compute_dtype(device, common.ROLE_ENCODER))
    info["pack_dtype_decoder"] = str(common.compute_dtype(device, common.ROLE_DECODER))
    print("# ASUKA GPU check\n")
    for k, v in info.items():
        print(f"- {k}: {v}")

    # ---- models (random weights, released sizes unless --smoke)
    if args.smoke:
        mae_kw = dict(embed_dim=128, depth=2, decoder_dim=64, decoder_depth=7)
        sd15_kw, t5_kw = dict(width=768, depth=1), None   # the T5 aligner is left out
        dec_kw = dict(ch=32, ch_mult=(1, 2, 2, 2), num_res_blocks=1)
        avq_kw = dict(ch=32, ch_mult=(1, 2, 2, 2), num_res_blocks=1)
        picture, decode_sizes, big, tile_px = 64, [64], 128, 64
    else:
        mae_kw, sd15_kw, t5_kw = {}, dict(width=768, depth=4), dict(width=4096, depth=4)
        dec_kw = decoder_files.ASUKA_CONFIG
        avq_kw = dict(ch=192, ch_mult=(1, 2, 4, 4), num_res_blocks=3)      # Asymmetric VQGAN x1.5
        picture, decode_sizes, big, tile_px = 512, [512, 1024, 2048], 2048, 512

    def state_dict(kind: str):
        if kind == "mae":
            return mae_files.official_mae_state_dict(0, **mae_kw)
        if kind == "aligner_sd15":
            return aligner_files.without_modulation(aligner_files.official_aligner_state_dict(0, **sd15_kw))
        if kind == "aligner_t5":
            return aligner_files.without_modulation(aligner_files.official_aligner_state_dict(0, **t5_kw))
        if kind == "asuka_decoder":
            return decoder_files.asuka_decoder_state_dict(seed=0, z_channels=16, **dec_kw)
        return decoder_files.avq_ldm_state_dict(seed=0, z_channels=4, with_extras=False, **avq_kw)

    def load(kind: str, sd, dtype):
        if kind == "mae":
            model = core_mae.load_mae(sd, operations=ops.manual_cast, dtype=dtype, device=offload)
        elif kind.startswith("aligner"):
            target = {"aligner_sd15": "sd15", "aligner_t5": "flux_t5"}[kind]
            model = core_aligner.Aligner.from_state_dict(sd, metadata={"asuka.target": target},
                                                         operations=ops.manual_cast, dtype=dtype, device=offload)
        else:
            model = core_decoder.load_decoder(sd, operations=ops.manual_cast, dtype=dtype, device=offload)
        return common.patch_model(model, dtype, load_device=device, offload_device=offload)

    g = torch.Generator().manual_seed(0)
    image = torch.rand(1, picture, picture, 3, generator=g)
    mask = torch.zeros(1, picture, picture)
    mask[:, picture // 4:picture * 3 // 4, picture // 3:picture * 2 // 3] = 1.0
    features = torch.randn(1, 256, 512, generator=g)
    # raw ComfyUI latents spread like FLUX (~2.8) and SD1.5 (~5.5) ones
    latent_std = {16: core_decoder.FLUX_LATENT_STD, 4: 1 / 0.18215}
    latents = {c: torch.randn(1, c, picture // 8, picture // 8, generator=g) * latent_std[c] for c in (16, 4)}

    def run(kind: str, patcher):
        if kind == "mae":
            return mae_nodes.MAEPrior.execute(mae=patcher, image=image, mask=mask).result[0].features
        if kind == "aligner_sd15":
            prior = core_mae.MAEPrior(features, image, torch.zeros(1, 256, dtype=torch.bool), torch.zeros(1, dtype=torch.bool))
            return aligner_nodes.AlignerConditioning.execute(aligner=patcher, prior=prior, strength=1.0).result[0][0][0]
        if kind == "aligner_t5":
            return common.activate(patcher)(features)
        channels = 16 if kind == "asuka_decoder" else 4
        return decoder_nodes.MaskedDecode.execute(decoder=patcher, samples={"samples": latents[channels]}, image=image,
                                                  mask=mask, composite=False, tile_size=0, tile_overlap=64).result[0]

    kinds = [k for k in (args.models.split(",") if args.models else KINDS)
             if not (k == "aligner_t5" and (args.skip_t5 or args.smoke))]
    unknown = set(kinds) - set(KINDS)
    if unknown:
        sys.exit(f"unknown --models {sorted(unknown)}; choose from {', '.join(KINDS)}")
    rows = []
    print("\n## Each model in each dtype, against float32\n")
    print("| model | dtype | pack's choice | time s | x fp32 time | rel. RMS error vs fp32 | finite | peak MiB |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for kind in kinds:
        sd = state_dict(kind)
        role = common.ROLE_DECODER if kind.endswith("decoder") else common.ROLE_ENCODER
        chosen = common.compute_dtype(device, role)
        reference = base_time = None
        for dtype in [torch.float32, *dtypes]:
            row = {"model": kind, "dtype": str(dtype).replace("torch.", ""), "pack_choice": dtype == chosen}
            try:
                patcher = load(kind, sd, dtype)
                with torch.no_grad():
                    out, peak = meter.peak(lambda: run(kind, patcher))
                    seconds = meter.time(lambda: run(kind, patcher), args.repeat)
                out = out.float().cpu()
                if dtype == torch.float32:
                    reference, base_time = out, seconds
                row.update(seconds=seconds, time_ratio=seconds / base_time, finite=bool(torch.isfinite(out).all()),
                           rel_rms_error=rel_rms(torch, out, reference), peak_bytes=peak)
            except Exception as e:  # noqa: BLE001 - report and go on with the next case
                row.update(error=f"{type(e).__name__}: {str(e)[:200]}")
            finally:
                patcher = None
                mm.unload_all_models()
                mm.soft_empty_cache()
            rows.append(row)
            if "error" in row:
                print(f"| {kind} | {row['dtype']} | {'yes' if row['pack_choice'] else ''} | error: {row['error']} | | | | |")
            else:
                print(f"| {kind} | {row['dtype']} | {'yes' if row['pack_choice'] else ''} | {row['seconds']:.4f} | "
                      f"{row['time_ratio']:.2f} | {row['rel_rms_error']:.2e} | {row['finite']} | {mib(row['peak_bytes'])} |")
        del sd

    # ---- decoder memory: estimate vs measured peak, untiled; and a big decode in tiles
    print("\n## Decoder memory: estimate vs measured peak (untiled), and a tiled decode\n")
    print("| decoder | dtype | size px | tiles | time s | peak MiB | estimate MiB | estimate / peak | max abs diff to untiled |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    memory_rows = []
    for kind in [k for k in kinds if k.endswith("decoder")]:
        dtype = common.compute_dtype(device, common.ROLE_DECODER)
        patcher = load(kind, state_dict(kind), dtype)
        model = common.activate(patcher)
        channels = model.latent_channels
        untiled_big = None
        for size, tile in [*((s, 0) for s in decode_sizes), (big, tile_px)]:
            gen = torch.Generator().manual_seed(size)
            z = torch.randn(1, channels, size // 8, size // 8, generator=gen) * latent_std[channels]
            img = torch.rand(1, size, size, 3, generator=gen)
            msk = torch.zeros(1, size, size)
            msk[:, size // 4:size // 2, size // 3:size * 2 // 3] = 1.0
            row = {"model": kind, "dtype": str(dtype).replace("torch.", ""), "size": size, "tile_px": tile}
            try:
                with torch.no_grad():
                    t = time.perf_counter()
                    out, peak = meter.peak(lambda: model.decode(z, img, msk, tile_size=tile // 8 or None, tile_overlap=8))
                    row["seconds"] = time.perf_counter() - t
                estimate = core_decoder.decode_memory_estimate(model, z.shape, dtype)
                row.update(peak_bytes=peak, estimate_bytes=estimate if not tile else None)
                if not tile and size == big:
                    untiled_big = out
                if tile and untiled_big is not None:
                    row["max_abs_diff_to_untiled"] = float((out - untiled_big).abs().max())
            except Exception as e:  # noqa: BLE001
                if not is_oom(torch, e):
                    raise
                row["error"] = "out of memory"
            mm.soft_empty_cache()
            memory_rows.append(row)
            ratio = (f"{row['estimate_bytes'] / row['peak_bytes']:.2f}" if row.get("estimate_bytes") and row.get("peak_bytes")
                     else "-")
            diff = f"{row['max_abs_diff_to_untiled']:.3f}" if "max_abs_diff_to_untiled" in row else "-"
            if "error" in row:
                print(f"| {kind} | {row['dtype']} | {size} | {tile or 'no'} | {row['error']} | | | | |")
            else:
                print(f"| {kind} | {row['dtype']} | {size} | {tile or 'no'} | {row['seconds']:.3f} | {mib(peak)} | "
                      f"{mib(row.get('estimate_bytes'))} | {ratio} | {diff} |")
        patcher = model = None
        mm.unload_all_models()
        mm.soft_empty_cache()

    problems = [r for r in rows if "error" in r or not r.get("finite", True)]
    problems += [r for r in memory_rows if r.get("estimate_bytes") and r.get("peak_bytes")
                 and r["estimate_bytes"] < r["peak_bytes"]]
    print("\n## Summary\n")
    if device.type != "cuda":
        print("- CPU run: the figures above check the script and the dtype paths; they are not GPU figures "
              "(peak = tensor bytes tracked op by op, not an allocator's statistics).")
    print(f"- {len(problems)} problem(s): " + ("none" if not problems else json.dumps(problems, default=str)))
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump({"info": info, "models": rows, "decoder_memory": memory_rows}, f, indent=2, default=str)
        print(f"- written to {args.out}")
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
