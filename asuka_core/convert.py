"""Convert an official pickled ASUKA file to .safetensors, without running anything in it.

    python -m asuka_core.convert INPUT [OUTPUT] [--target sd15|flux_clip|flux_t5]

* The input is read with ``asuka_core.checkpoint.read_checkpoint`` (the same safe reader
  the nodes use: a file that would run code is refused).
* MAE prior (``mae_300.pth``): every tensor of the model state dict.
* Masked decoders (``asuka_decoder.ckpt``, Asymmetric VQGAN checkpoints): only
  ``decoder.*`` and ``post_quant_conv.*``; the frozen encoder, the loss/discriminator and
  the optimiser state of the training file are left out.
* Aligners (``asuka_alignment_clip.pt`` / ``asuka_alignment_t5.pt``): every tensor, plus
  ``asuka.target``. Official files are told apart by width (768 -> ``flux_clip``, 4096 ->
  ``flux_t5``); an SD1.5 aligner, which has the same shapes as ``flux_clip``, needs
  ``--target sd15``.

Metadata written: ``asuka.kind`` (mae, aligner, asuka_decoder, avq_decoder,
diffusers_asym_decoder), ``asuka.source`` (the input file name) and, for aligners,
``asuka.target``. OUTPUT defaults to INPUT with the extension replaced by .safetensors.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Mapping, Sequence

import torch

from .checkpoint import (
    DECODER_KINDS,
    KIND_ALIGNER,
    KIND_IDS,
    SAFETENSORS_EXTENSIONS,
    identify,
    read_checkpoint,
    save_safetensors,
)
from .errors import AsukaError, CheckpointError

DECODER_PREFIXES = ("decoder.", "post_quant_conv.")


def default_output(input_path: str) -> str:
    root, _ = os.path.splitext(input_path)
    return root + ".safetensors"


def select_tensors(tensors: Mapping[str, torch.Tensor], kind: str) -> dict[str, torch.Tensor]:
    """The tensors worth keeping for ``kind`` (see the module docstring)."""
    if kind in DECODER_KINDS:
        kept = {k: v for k, v in tensors.items() if k.startswith(DECODER_PREFIXES)}
        if not kept:
            raise CheckpointError("the file holds no decoder.* tensors.")
        return kept
    return dict(tensors)


def convert(input_path: str | os.PathLike, output_path: str | os.PathLike | None = None, *,
            target: str | None = None, overwrite: bool = False) -> dict:
    """Convert one file. Returns a summary: output, kind, tensors, parameters, dtypes,
    metadata, dropped (number of tensors left out)."""
    from .aligner import METADATA_TARGET, TARGET_FLUX_CLIP, TARGET_SD15, aligner_config

    input_path = os.fspath(input_path)
    output_path = os.fspath(output_path) if output_path is not None else default_output(input_path)
    if not output_path.lower().endswith(SAFETENSORS_EXTENSIONS):
        raise CheckpointError(f"the output '{output_path}' should end in .safetensors.")
    if os.path.exists(output_path):
        if os.path.realpath(output_path) == os.path.realpath(input_path):
            raise CheckpointError("the output would overwrite the input; give another OUTPUT name.")
        if not overwrite:
            raise CheckpointError(f"'{output_path}' already exists; pass --overwrite to replace it.")

    ckpt = read_checkpoint(input_path)
    kind = identify(ckpt.tensors)
    if kind not in KIND_IDS:
        raise CheckpointError(
            f"'{ckpt.name}' looks like {kind}. This converter handles ASUKA files only: the MAE "
            "prior, the aligners and the masked decoders (ASUKA or Asymmetric VQGAN)."
        )
    if target is not None and kind != KIND_ALIGNER:
        raise CheckpointError(f"--target is for aligners only; '{ckpt.name}' is {kind}.")

    tensors = select_tensors(ckpt.tensors, kind)
    metadata = {"asuka.kind": KIND_IDS[kind], "asuka.source": ckpt.name}
    notes = []
    if kind == KIND_ALIGNER:
        known = dict(ckpt.metadata)
        if target is not None:
            known[METADATA_TARGET] = target
        try:
            cfg = aligner_config(tensors, known)  # validates shapes and the target's width
        except CheckpointError as e:
            raise CheckpointError(f"'{ckpt.name}': {e}") from None
        metadata[METADATA_TARGET] = cfg.target
        if target is None and METADATA_TARGET not in ckpt.metadata and cfg.target == TARGET_FLUX_CLIP:
            notes.append(
                "width 768 read as the FLUX CLIP-branch aligner; if this is an SD1.5 aligner, "
                f"run again with --target {TARGET_SD15}."
            )
    save_safetensors(tensors, output_path, metadata)
    return {
        "output": output_path,
        "kind": kind,
        "tensors": len(tensors),
        "parameters": sum(t.numel() for t in tensors.values()),
        "dtypes": sorted({str(t.dtype).replace("torch.", "") for t in tensors.values()}),
        "metadata": metadata,
        "dropped": len(ckpt.tensors) - len(tensors),
        "notes": notes,
    }


def _describe(summary: dict) -> str:
    lines = [
        f"Wrote {summary['output']}",
        f"  {summary['kind']}: {summary['tensors']} tensors, {summary['parameters']:,} parameters "
        f"({', '.join(summary['dtypes'])})",
    ]
    if summary["dropped"]:
        lines.append(f"  left out {summary['dropped']} training-only tensors (encoder, loss, ...)")
    lines.append("  metadata: " + ", ".join(f"{k}={v}" for k, v in summary["metadata"].items()))
    lines += [f"  note: {n}" for n in summary["notes"]]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    from .aligner import TARGETS

    parser = argparse.ArgumentParser(
        prog="python -m asuka_core.convert",
        description="Convert an official pickled ASUKA file (.pth/.pt/.ckpt) to .safetensors "
                    "without executing anything from it.",
    )
    parser.add_argument("input", help="the pickled file, e.g. mae_300.pth, asuka_decoder.ckpt, asuka_alignment_t5.pt")
    parser.add_argument("output", nargs="?", help="the .safetensors to write (default: beside the input)")
    parser.add_argument("--target", choices=TARGETS, help="aligners only: what the aligner conditions")
    parser.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    args = parser.parse_args(argv)
    try:
        summary = convert(args.input, args.output, target=args.target, overwrite=args.overwrite)
    except AsukaError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(_describe(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
