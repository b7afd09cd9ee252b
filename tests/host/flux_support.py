"""FLUX.1-Fill test models and graph for the host tests (imported by the test modules).

The models are random-weight and small where ComfyUI allows (``tests/fixtures/flux_files``):
a FLUX.1-Fill transformer with the real widths and one double block (772 MiB bf16, loaded
by the stock ``UNETLoader``), a 16-channel TAESD-layout VAE (``VAELoader``) and a one-block
aligner in the released T5-branch format (.pt). They are built once into the shared cache (atomic
``_cached``) and linked into the session server's ``diffusion_models`` / ``vae`` / ``asuka``
folders, which ComfyUI re-lists when their contents change.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import pytest

from tests.host.comfy_client import Graph
from tests.host.conftest import _cached, _source_hash


@dataclass
class FluxModels:
    unet: str = "asuka-test-flux1-fill-tiny.safetensors"
    vae: str = "asuka-test-vae16-tiny.safetensors"
    t5_aligner: str = "asuka_alignment_t5_1block.pt"


def _link(src: str, folder: str, name: str) -> None:
    dst = os.path.join(folder, name)
    if not os.path.lexists(dst):
        os.symlink(src, dst)


@pytest.fixture(scope="session")
def flux_models(host_server, host_cache) -> FluxModels:
    from tests.fixtures import flux_files

    m = FluxModels()
    cache = os.path.join(host_cache, "models", "asuka-test")
    key = _source_hash(flux_files)
    base = host_server.base_dir
    _link(_cached(cache, m.unet, key, lambda p: flux_files.write_tiny_flux_fill(p, seed=41)),
          os.path.join(base, "models_diffusion"), m.unet)
    _link(_cached(cache, m.vae, key, lambda p: flux_files.write_tiny_vae16(p, seed=42)),
          os.path.join(base, "models_vae"), m.vae)
    _link(_cached(cache, m.t5_aligner, key, lambda p: flux_files.write_t5_aligner(p, seed=43)),
          host_server.models.folder, m.t5_aligner)
    return m


def flux_inpaint_graph(*, host, flux: FluxModels, images: list[str], record_path: str | None, seed: int,
                       prefix: str, steps: int = 2, weight: float = 0.5, guidance: float = 30.0,
                       empty_seed: int | None = 7, clip_aligner: str | None = None,
                       t5_aligner: str | None = None, decoder: str | None = None,
                       core_average: float | None = None) -> Graph:
    """The ASUKA FLUX.1-Fill graph, as in example_workflows/asuka_flux_fill.json but with the
    test models and the stand-in empty prompt:

    LoadImage(s) [-> ImageBatch] -> ASUKA MAE prior -> ASUKA_FluxConditioning (clip + T5
    aligners, empty) -> InpaintModelConditioning (tiny VAE, noise_mask off) -> KSampler
    (UNETLoader -> ModelSamplingFlux(size of the image) -> ASUKATest_RecordModelInputs;
    cfg 1, euler, simple) -> ASUKA_MaskedDecode -> SaveImage ("save").

    The first image's mask serves the whole batch. Node ids: "cond", "sampler", "save".
    ``core_average`` w: the ASUKA node at weight 1 (pure prior), then core
    ConditioningAverage(to = ASUKA, from = empty, to_strength = w) instead of the node's blend.
    """
    m = host.models
    g = Graph()
    loads = [g.add("LoadImage", image=name) for name in images]
    pixels = loads[0][0]
    for load in loads[1:]:
        pixels = g.add("ImageBatch", image1=pixels, image2=load[0])[0]
    mask = loads[0][1]
    mae = g.add("ASUKA_MAELoader", mae_name=m.mae)
    prior = g.add("ASUKA_MAEPrior", mae=mae[0], image=pixels, mask=mask)
    clip = g.add("ASUKA_AlignerLoader", aligner_name=clip_aligner or m.flux_aligner)
    t5 = g.add("ASUKA_AlignerLoader", aligner_name=t5_aligner or flux.t5_aligner)
    extra = {}
    if empty_seed is not None:
        extra["empty"] = g.add("ASUKATest_FluxEmpty", seed=empty_seed)[0]
    if core_average is not None:
        pure = g.add("ASUKA_FluxConditioning", _id="cond", prior=prior[0], clip_aligner=clip[0],
                     t5_aligner=t5[0], weight=1.0, guidance=guidance)
        cond = g.add("ConditioningAverage", conditioning_to=pure[0], conditioning_from=extra["empty"],
                     conditioning_to_strength=core_average)
    else:
        cond = g.add("ASUKA_FluxConditioning", _id="cond", prior=prior[0], clip_aligner=clip[0],
                     t5_aligner=t5[0], weight=weight, guidance=guidance, **extra)
    vae = g.add("VAELoader", vae_name=flux.vae)
    imc = g.add("InpaintModelConditioning", positive=cond[0], negative=cond[0], vae=vae[0], pixels=pixels,
                mask=mask, noise_mask=False)
    unet = g.add("UNETLoader", unet_name=flux.unet, weight_dtype="default")
    size = g.add("GetImageSize", image=pixels)
    model = g.add("ModelSamplingFlux", model=unet[0], max_shift=1.15, base_shift=0.5, width=size[0],
                  height=size[1])[0]
    if record_path:
        model = g.add("ASUKATest_RecordModelInputs", model=model, path=record_path)[0]
    ks = g.add("KSampler", _id="sampler", model=model, seed=seed, steps=steps, cfg=1.0, sampler_name="euler",
               scheduler="simple", positive=imc[0], negative=imc[1], latent_image=imc[2], denoise=1.0)
    dec = g.add("ASUKA_DecoderLoader", decoder_name=decoder or m.asuka_decoder)
    out = g.add("ASUKA_MaskedDecode", decoder=dec[0], samples=ks[0], image=pixels, mask=mask, composite=True,
                tile_size=0, tile_overlap=64)
    g.add("SaveImage", _id="save", images=out[0], filename_prefix=prefix)
    return g
