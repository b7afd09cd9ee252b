"""Region-limited decoding through the pack's nodes, in process with ComfyUI's modules:
ASUKA Masked Decode's ``region`` input (auto / full / hole)."""

from __future__ import annotations

import pytest
import torch

from tests.fixtures.decoder_files import asuka_decoder_state_dict
from tests.host.inprocess import comfy_modules

DECODER_TINY = dict(ch=32, ch_mult=(1, 2, 2, 2), num_res_blocks=1)
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def comfy():
    return comfy_modules()


@pytest.fixture(scope="module")
def decode_node(comfy):
    sd = asuka_decoder_state_dict(seed=5, z_channels=16, **DECODER_TINY)
    model = comfy.pack("asuka_core.decoder").load_decoder(sd, operations=comfy.ops.manual_cast)
    patcher = comfy.common.patch_model(model, torch.float32, load_device=CPU, offload_device=CPU)
    g = torch.Generator().manual_seed(0)
    cells = 56
    latent = torch.randn(1, 16, cells, cells, generator=g) / 0.3611
    image = torch.rand(1, cells * 8, cells * 8, 3, generator=g)
    mask = torch.zeros(1, cells * 8, cells * 8)
    mask[:, 30:80, 300:380] = 1.0                         # a small hole near the top edge
    node = comfy.pack("nodes.decoder").MaskedDecode
    return node, patcher, dict(decoder=patcher, samples={"samples": latent}, image=image, mask=mask,
                               composite=True, tile_size=0, tile_overlap=64)


def _sizes_seen(model, module=None) -> list[tuple[int, int]]:
    """Latent sizes the up path starts on (its first ResNet), or ``module`` sees."""
    seen = []
    module = module or model.up[model.config.levels - 1].block[0]
    module.register_forward_hook(lambda mod, args, out: seen.append(tuple(args[0].shape[-2:])))
    return seen


def test_region_input_is_optional_with_full_as_default(decode_node):
    node = decode_node[0]
    schema = node.define_schema()
    region = next(i for i in schema.inputs if i.id == "region")
    assert region.optional and region.default == "full" and set(region.options) == {"auto", "full", "hole"}
    assert region.tooltip


def test_auto_decodes_only_the_hole_region_when_compositing(decode_node):
    node, patcher, kwargs = decode_node
    model = patcher.model
    seen, mid_seen = _sizes_seen(model), _sizes_seen(model, model.conv_in)
    auto = node.execute(**kwargs, region="auto").result[0]
    full = node.execute(**kwargs).result[0]                               # old workflows: no region input
    raw = node.execute(**{**kwargs, "composite": False}, region="auto").result[0]   # auto without composite: full
    boxes = model.decode_boxes(kwargs["mask"][0], 56, 56, "auto")
    assert seen == [(b.height, b.width) for b in boxes] + [(56, 56), (56, 56)]
    assert mid_seen == [(56, 56)] * 3                                    # the mid block sees the whole latent
    assert len(boxes) == 1 and boxes[0].height * boxes[0].width < 56 * 56 / 2
    keep = kwargs["mask"] == 0
    assert torch.equal(auto[keep], kwargs["image"][keep]) and torch.equal(full[keep], kwargs["image"][keep])
    hole = ~keep
    assert (auto[hole] - full[hole]).abs().mean() < 0.25                 # the same fill, approximately
    assert not torch.equal(raw[keep], kwargs["image"][keep])             # composite off: raw output everywhere


def test_hole_mode_applies_without_composite(decode_node):
    node, patcher, kwargs = decode_node
    seen = _sizes_seen(patcher.model)
    out = node.execute(**{**kwargs, "composite": False}, region="hole").result[0]
    assert len(seen) == 1 and seen[0] != (56, 56)
    far = torch.zeros_like(kwargs["mask"], dtype=torch.bool)
    far[:, 300:, :] = True                                                 # well outside the grown hole
    assert torch.equal(out[far], kwargs["image"][far])
