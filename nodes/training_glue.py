"""ComfyUI side of aligner training: turns ComfyUI's loaded SD1.5 inpainting MODEL and VAE
into the callables ``asuka_core.training`` needs. Used by the training node and by
``scripts/train_aligner.py`` (which loads the checkpoint with ComfyUI's own loader).

* ComfyUI runs every prompt under ``torch.inference_mode()``; weights a loader created
  there are inference tensors, which autograd cannot save for backward even with the
  mode switched off. ``trainable`` (or ``make_trainable`` ... ``release_trainable``)
  gives the UNet normal frozen copies (same values, ``requires_grad=False``) for the run
  only, and puts ComfyUI's own tensors back afterwards: the cached model is left as it
  was found. Only gradients with respect to the UNet's *input context* flow.
* The denoiser is ``BaseModel.apply_model`` with the concat conditioning built by
  ``BaseModel.extra_conds`` (the same path as InpaintModelConditioning + KSampler:
  ``process_latent_in`` on the masked-image latent, bilinear + rounded mask), and the
  aligner tokens as ``c_crossattn``. ``apply_model`` returns the denoised latent
  ``x - eps_hat * sigma``, so ``eps_hat = (x - D) / sigma``.
"""

from __future__ import annotations

import contextlib
import functools
import logging

import torch
import torch.utils.checkpoint

import comfy.model_management as mm

from ..asuka_core.errors import CheckpointError
from . import gradients

log = logging.getLogger("comfyui-asuka")

_HINT = ("Use an SD1.5 *inpainting* checkpoint (e.g. sd-v1-5-inpainting.ckpt or an inpainting merge: "
         "its UNet has 9 input channels).")


def check_inpainting_model(model_patcher, vae=None, name: str = "the model") -> None:
    """CheckpointError unless MODEL is an SD1.5-style 9-channel EPS inpainting UNet with
    768-wide cross-attention (and VAE, if given, has 4 latent channels)."""
    bm = getattr(model_patcher, "model", None)
    cfg = getattr(getattr(bm, "model_config", None), "unet_config", None)
    if bm is None or cfg is None or not hasattr(bm, "diffusion_model"):
        raise CheckpointError(f"{name} is not a diffusion model ComfyUI can train through. {_HINT}")
    channels = cfg.get("in_channels")
    if channels != 9:
        what = "a plain (non-inpainting) model" if channels == 4 else f"a UNet with {channels} input channels"
        raise CheckpointError(f"{name} is {what}; ASUKA's aligner is trained through an inpainting UNet "
                              f"with 9 input channels (4 latent + 1 mask + 4 masked image). {_HINT}")
    if cfg.get("context_dim") != 768:
        raise CheckpointError(f"{name} has {cfg.get('context_dim')}-wide cross-attention; the SD1.5 aligner "
                              f"makes 768-wide tokens (SD2.x and SDXL are not supported). {_HINT}")
    if getattr(getattr(bm, "model_type", None), "name", "EPS") != "EPS":
        raise CheckpointError(f"{name} predicts {bm.model_type.name}, not epsilon; the aligner recipe uses "
                              f"the epsilon loss of an SD1.5 inpainting model. {_HINT}")
    if vae is not None and getattr(vae, "latent_channels", 4) != 4:
        raise CheckpointError(f"The VAE has {vae.latent_channels} latent channels; use the SD1.5 VAE "
                              "(4 channels) of the inpainting checkpoint.")


def _checkpointed(forward):
    @functools.wraps(forward)
    def run(*args, **kwargs):
        if torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)
        return forward(*args, **kwargs)
    return run


@contextlib.contextmanager
def _checkpointed_blocks(unet, enabled: bool):
    """Within the block, every block of the UNet (each entry of input_blocks, middle_block,
    output_blocks) recomputes its activations in the backward pass instead of storing them
    (about 30 % slower, far less memory). On exit each block's own ``forward`` is back:
    an instance attribute that was there before is restored, one added here is removed."""
    changed = []
    try:
        if enabled:
            blocks = [*getattr(unet, "input_blocks", []), getattr(unet, "middle_block", None),
                      *getattr(unet, "output_blocks", [])]
            for block in blocks:
                if block is None:
                    continue
                had = "forward" in block.__dict__
                changed.append((block, had, block.__dict__.get("forward")))
                block.forward = _checkpointed(block.forward)
        yield
    finally:
        for block, had, own in reversed(changed):
            if had:
                block.forward = own
            else:
                del block.forward


@contextlib.contextmanager
def trainable(model_patcher, *, gradient_checkpointing: bool = True, memory_required: int = 0):
    """Within the block, gradients flow through MODEL's frozen UNet to its input context:
    the model is loaded fully on its device, its inference-mode weights are replaced by
    frozen copies (``gradients.differentiable_unet``) and, with ``gradient_checkpointing``,
    its blocks recompute activations in the backward pass. On exit the UNet holds its own
    weights and ``forward`` methods again; the ModelPatcher is never changed."""
    gradients.refuse_streamed_weights(model_patcher, "Aligner training")
    mm.load_models_gpu([model_patcher], memory_required=memory_required, force_full_load=True)
    unet = model_patcher.model.diffusion_model
    with gradients.differentiable_unet(unet) as replaced, _checkpointed_blocks(unet, gradient_checkpointing):
        if replaced:
            log.info("aligner training: %d UNet tensors copied out of inference mode for this run", replaced)
        yield


_SESSIONS: dict[int, contextlib.ExitStack] = {}


def make_trainable(model_patcher, *, gradient_checkpointing: bool = True, memory_required: int = 0) -> None:
    """``trainable`` entered until ``release_trainable(model_patcher)`` (for callers that cannot
    hold a ``with`` block across their run: the node, ``scripts/train_aligner.py``)."""
    key = id(model_patcher.model)
    if key in _SESSIONS:
        return
    stack = contextlib.ExitStack()
    stack.enter_context(trainable(model_patcher, gradient_checkpointing=gradient_checkpointing,
                                  memory_required=memory_required))
    _SESSIONS[key] = stack


def release_trainable(model_patcher) -> None:
    """Leave ``make_trainable``: the UNet's own weights and ``forward`` methods are back."""
    stack = _SESSIONS.pop(id(model_patcher.model), None)
    if stack is not None:
        stack.close()


def make_denoiser(model_patcher):
    """``denoiser(x, sigma, context, masked_latent, mask) -> eps_hat`` through
    ``apply_model`` (see the module docstring)."""
    bm = model_patcher.model

    def denoiser(x, sigma, context, masked_latent, mask):
        device = x.device
        c_concat = bm.extra_conds(noise=x, device=device, concat_latent_image=masked_latent.to(device),
                                  concat_mask=mask.to(device))["c_concat"].cond
        denoised = bm.apply_model(x, sigma, c_concat=c_concat, c_crossattn=context,
                                  transformer_options=gradients.chain_attention_override({}))
        return (x - denoised) / sigma.view(-1, 1, 1, 1).to(denoised.dtype)

    return denoiser


def make_encoder(vae, device):
    """IMAGE -> raw latent on ``device`` (ComfyUI's VAE.encode: its batching, dtype and
    placement rules)."""
    def encode(pixels: torch.Tensor) -> torch.Tensor:
        return vae.encode(pixels[..., :3]).to(device)

    return encode


def make_sampler(model_patcher, vae, *, steps: int = 20, sampler_name: str = "euler", scheduler: str = "normal"):
    """``sampler(context, image, mask, seed) -> IMAGE``: the SD1.5 ASUKA graph's result
    (InpaintModelConditioning's concat inputs, ASUKA tokens as the only conditioning,
    KSampler at cfg 1, VAEDecode) for the sample images."""
    import comfy.sample

    def sample(context, image, mask, seed):
        from ..asuka_core.training import masked_image

        out = []
        for i in range(image.shape[0]):
            img, m = image[i:i + 1], mask[i:i + 1]
            concat = vae.encode(masked_image(img, m))
            cond = [[context[i:i + 1].float().cpu(), {"concat_latent_image": concat, "concat_mask": m}]]
            latent = torch.zeros_like(concat)
            noise = comfy.sample.prepare_noise(latent, seed)
            with torch.no_grad():
                z = comfy.sample.sample(model_patcher, noise, steps, 1.0, sampler_name, scheduler, cond, cond,
                                        latent, denoise=1.0, disable_pbar=True, seed=seed)
                out.append(vae.decode(z)[..., :3].float().cpu())
        return torch.cat(out)

    return sample


@contextlib.contextmanager
def training_mode():
    """Leave ComfyUI's inference mode and enable autograd for the duration."""
    with torch.inference_mode(False), torch.enable_grad():
        yield


def frozen_models(model_patcher, vae, mae, *, sample_steps: int = 20, gradient_checkpointing: bool = True,
                  memory_required: int = 0):
    """Everything ``AlignerTrainer`` needs from ComfyUI's MODEL and VAE and the pack's MAE
    (its ModelPatcher from ASUKA_MAELoader, or a plain module). Returns
    ``(FrozenModels, device)``."""
    from ..asuka_core.training import FrozenModels, mae_prior

    check_inpainting_model(model_patcher, vae)
    mae_patcher = mae if hasattr(mae, "model") and hasattr(mae, "load_device") else None
    patchers = [model_patcher, vae.patcher] + ([mae_patcher] if mae_patcher is not None else [])

    def prepare():
        # Cheap when everything is still loaded; reloads what ComfyUI moved away meanwhile.
        mm.load_models_gpu(patchers, memory_required=memory_required, force_full_load=True)

    make_trainable(model_patcher, gradient_checkpointing=gradient_checkpointing, memory_required=memory_required)
    prepare()
    device = model_patcher.load_device
    bm = model_patcher.model
    return FrozenModels(
        prior=mae_prior(mae_patcher.model if mae_patcher is not None else mae),
        encode=make_encoder(vae, device),
        denoiser=make_denoiser(model_patcher),
        sigmas=bm.model_sampling.sigmas.detach().clone().float(),
        latent_in=bm.process_latent_in,
        sampler=make_sampler(model_patcher, vae, steps=sample_steps) if sample_steps > 0 else None,
        prepare=prepare,
    ), device


def training_memory(batch_size: int, resolution: int, *, gradient_checkpointing: bool, precision: str) -> int:
    """Bytes to keep free for activations (reference estimates, not measured): about
    0.72 GB per 512 px sample with bf16/fp16 autocast, twice that in fp32, a quarter of it
    with gradient checkpointing, +30 % backward peak."""
    per_sample = 0.72e9 * (2.0 if precision == "fp32" else 1.0) * (resolution / 512) ** 2
    if gradient_checkpointing:
        per_sample *= 0.25
    return int(per_sample * batch_size * 1.3)
