"""Compute and activation memory of one masked-decoder training sample, counted (not
timed) on PyTorch's meta device, for the three Asymmetric VQGAN decoder sizes.

For each decoder (base, x1.5, x2; layouts from docs/decoder.md) and resolution it runs the
trainer's per-sample graph on meta tensors: decoder forward, the L1 term, the LPIPS
AlexNet and the patch discriminator on the output, backward to the decoder weights. It
prints the parameter count, the FLOPs of forward + backward (``torch.utils.flop_counter``)
and the bytes autograd keeps for the backward pass (saved tensors, fp32, each tensor
counted once). No GPU is used or needed; docs/training.md turns these counts into the
VRAM and time estimates.

    scripts/host.sh python benchmarks/bench_decoder_training.py [--res 256 512]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from asuka_core.decoder import KIND_AVQ, CondLayer, DecoderConfig, MaskedDecoder  # noqa: E402
from asuka_core.lpips import LPIPS, LPIPS_CHANNELS, alexnet_features  # noqa: E402
from asuka_core.training.decoder_losses import PatchDiscriminator  # noqa: E402

VARIANTS = {  # name: (level widths, ResNets per level)
    "base": ((128, 256, 512, 512), 3),
    "x1.5": ((192, 384, 768, 768), 4),
    "x2": ((256, 512, 1024, 1024), 6),
}


def avq_config(widths, blocks) -> DecoderConfig:
    outs = [widths[0], widths[1], widths[2], widths[3], widths[3]]
    cond, c_in = [], 3
    for i, c in enumerate(outs):
        cond.append(CondLayer(c_in, c, 3 if i < 2 else 4))
        c_in = c
    return DecoderConfig(kind=KIND_AVQ, latent_channels=4, mid_channels=widths[3], widths=tuple(widths),
                         blocks=(blocks,) * 4, cond_layers=tuple(cond), out_channels=3, post_quant_conv=True)


def lpips_meta() -> LPIPS:
    """LPIPS's layers without weight files (shapes only, for counting)."""
    net = LPIPS.__new__(LPIPS)
    torch.nn.Module.__init__(net)
    net.features = alexnet_features()
    net.lins = torch.nn.ModuleList(torch.nn.Conv2d(c, 1, 1, bias=False) for c in LPIPS_CHANNELS)
    net.register_buffer("shift", torch.zeros(1, 3, 1, 1))
    net.register_buffer("scale", torch.ones(1, 3, 1, 1))
    return net.requires_grad_(False)


def measure(name: str, res: int) -> dict:
    widths, blocks = VARIANTS[name]
    with torch.device("meta"):
        decoder = MaskedDecoder(avq_config(widths, blocks)).train()
        decoder.post_quant_conv.requires_grad_(False)
        disc = PatchDiscriminator(3, 64, 3).requires_grad_(False)
        lpips = lpips_meta()
        z = torch.empty(1, 4, res // 8, res // 8)
        image = torch.empty(1, 3, res, res)
        mask = torch.empty(1, 1, res, res)
    params = sum(p.numel() for p in decoder.parameters())
    saved: dict[int, tuple[torch.Tensor, int]] = {}

    def pack(t):
        saved.setdefault(id(t), (t, t.numel() * t.element_size()))
        return t

    counter = FlopCounterMode(display=False)
    with counter, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = decoder(z, image, mask)
        loss = (out - image).abs().mean() + lpips.distance(out, image).mean() - disc(out).mean()
    activation = sum(b for _, b in saved.values())
    with counter:
        loss.backward()
    return {"params": params, "flops": counter.get_total_flops(), "saved": activation}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--res", type=int, nargs="+", default=[256, 512])
    args = p.parse_args()
    print("| decoder | params | resolution | fwd+bwd TFLOP / sample | saved for backward (fp32) / sample |")
    print("| --- | --- | --- | --- | --- |")
    for name in VARIANTS:
        for res in args.res:
            m = measure(name, res)
            print(f"| {name} | {m['params'] / 1e6:.1f} M | {res} | {m['flops'] / 1e12:.2f} | "
                  f"{m['saved'] / 2**30:.2f} GiB |", flush=True)


if __name__ == "__main__":
    main()
