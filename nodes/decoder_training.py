"""Masked-decoder training inside ComfyUI (ASUKA_TrainDecoder) and the ComfyUI side of it
that ``scripts/train_decoder.py`` shares: ComfyUI's loaded VAE (frozen encoder), the SD1.5
inpainting MODEL (the latent augmentation's one-step estimate, through
``training_glue.make_denoiser``) and the empty-prompt context as the callables
``asuka_core.training.DecoderTrainer`` needs. Nothing of ComfyUI's cached models is
modified: the UNet and the VAE only run under ``no_grad``.
"""

from __future__ import annotations

import os
import shutil

import torch
from comfy_api.latest import io

import comfy.model_management as mm
import comfy.ops
import folder_paths

from ..asuka_core.decoder import load_decoder
from ..asuka_core.errors import CheckpointError, InputError
from ..asuka_core.lpips import LPIPS
from ..asuka_core.training import DecoderFrozen, DecoderTrainConfig, DecoderTrainer, image_sets
from ..asuka_core.training.decoder_loop import FRESH_PREFIX, FROM_VAE, decoder_from_vae, start_decoder
from . import common, training_glue
from .training import RUNS_FOLDER, _images_folder, _read_image, _run_name
from .types import CATEGORY, DECODER

CONTEXT_TOKENS, CONTEXT_WIDTH = 77, 768


def empty_prompt(clip=None) -> tuple[torch.Tensor, str]:
    """The UNet's cross-attention input for the latent augmentation: the CLIP encoding of
    the empty prompt when a CLIP is given, else zeros of the same shape. Returns the
    tensor ``[1, 77, 768]`` and a note for the log."""
    if clip is None:
        return torch.zeros(1, CONTEXT_TOKENS, CONTEXT_WIDTH), "no CLIP: zero context"
    cond = clip.encode_from_tokens(clip.tokenize(""))
    if cond.shape[-1] != CONTEXT_WIDTH:
        raise CheckpointError(f"The CLIP gives {cond.shape[-1]}-wide tokens; the SD1.5 inpainting UNet needs "
                              f"{CONTEXT_WIDTH} (use the checkpoint's own CLIP).")
    return cond.detach().float().cpu().clone(), "empty-prompt CLIP context"


def frozen_models(vae, model=None, clip=None, *, latent_augmentation: bool = True, memory_required: int = 0):
    """``(DecoderFrozen, device, note)`` from ComfyUI's VAE and (for the latent
    augmentation) the SD1.5 inpainting MODEL. Checks the model before anything loads."""
    if getattr(vae, "latent_channels", 4) != 4:
        raise CheckpointError(f"The VAE has {vae.latent_channels} latent channels; the SD1.5 decoder is trained "
                              "on the SD1.5 VAE's latents (4 channels).")
    if latent_augmentation:
        if model is None:
            raise InputError("Latent augmentation needs the SD1.5 inpainting MODEL; connect it, or set "
                             "latent_aug_prob to 0.")
        try:
            training_glue.check_inpainting_model(model, vae)
        except CheckpointError as e:
            raise CheckpointError(f"The latent augmentation runs the SD1.5 inpainting UNet: {e} "
                                  "(Or set latent_aug_prob to 0 to train without it.)") from None
    patchers = [vae.patcher] + ([model] if latent_augmentation else [])

    def prepare():
        mm.load_models_gpu(patchers, memory_required=memory_required, force_full_load=True)

    prepare()
    device = (model.load_device if latent_augmentation else vae.patcher.load_device)
    if not latent_augmentation:
        return DecoderFrozen(encode=training_glue.make_encoder(vae, device), prepare=prepare), device, ""
    bm = model.model
    context, note = empty_prompt(clip)
    return DecoderFrozen(
        encode=training_glue.make_encoder(vae, device),
        denoiser=training_glue.make_denoiser(model),
        sigmas=bm.model_sampling.sigmas.detach().clone().float(),
        context=context, latent_in=bm.process_latent_in, latent_out=bm.process_latent_out,
        prepare=prepare), device, note


def build_start_decoder(choice: str, vae, resolve, *, seed: int = 0):
    """``(decoder, fresh_prefixes, description)``: ``choice`` = ``"vae"`` (the VAE's own
    decoder plus a new condition branch) or a decoder file (``resolve(choice)`` -> path).
    Call under ``training_glue.training_mode()`` so the weights are ordinary tensors."""
    if (choice or "").strip().lower() == FROM_VAE:
        state = {k: v.detach().clone() for k, v in vae.first_stage_model.state_dict().items()}
        return decoder_from_vae(state, seed=seed), (FRESH_PREFIX,), "SD VAE decoder + new condition branch"
    path = resolve(choice)
    return start_decoder(path), (), os.path.basename(path)


def perceptual_net(lpips_weight: float, lpips_weights: str, alexnet_weights: str, resolve=lambda p: p):
    """The LPIPS network from the user's two files (None when the LPIPS weight is 0)."""
    if lpips_weight <= 0:
        return None
    missing = [n for n, v in (("lpips weights (alex.pth of the lpips package)", lpips_weights),
                              ("AlexNet weights (alexnet-owt-7be5be79.pth)", alexnet_weights)) if not (v or "").strip()]
    if missing:
        raise InputError(f"The LPIPS loss (weight {lpips_weight}) needs {' and '.join(missing)}; nothing is "
                         "downloaded. Give the files, or set the LPIPS weight to 0.")
    return LPIPS.from_files(resolve(alexnet_weights), resolve(lpips_weights), alexnet_what="AlexNet weights",
                            lin_what="LPIPS weights")


def _model_file(value: str) -> str:
    """An absolute path, or a file name in models/asuka."""
    value = (value or "").strip()
    if os.path.isabs(value):
        return value
    path = folder_paths.get_full_path(common.MODEL_FOLDER, value)
    return path if path is not None else os.path.join(folder_paths.get_folder_paths(common.MODEL_FOLDER)[0], value)


class TrainDecoder(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ASUKA_TrainDecoder",
            display_name="Train ASUKA Masked Decoder (SD1.5)",
            category=CATEGORY,
            is_output_node=True,
            description=(
                "Fine-tunes a masked decoder for SD1.5 latents on a folder of photos with ASUKA's colour and "
                "latent augmentation, so fills keep the picture's colours. Starts from an Asymmetric VQGAN "
                "decoder (models/asuka) or from the VAE's own decoder with a new condition branch. Blocks the "
                "queue while it runs; Cancel stops it after saving a resumable state. The decoder goes to "
                "models/asuka/<run_name>.safetensors, the run to output/asuka_training/<run_name>/. A useful "
                "decoder needs a GPU and many thousand steps; see docs/training.md."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The SD1.5 inpainting MODEL (9-channel UNet) for the latent "
                               "augmentation, e.g. from Load Checkpoint."),
                io.Vae.Input("vae", tooltip="The SD1.5 VAE of that checkpoint: its encoder makes the latents."),
                io.Combo.Input("start_decoder", options=[FROM_VAE] + common.model_files(), tooltip=(
                    "An Asymmetric VQGAN decoder in models/asuka (base, x1.5, x2) to fine-tune, or 'vae': the "
                    "VAE's own decoder plus a new condition branch.")),
                io.String.Input("images_folder", default="asuka_photos", tooltip=(
                    "Folder of training photos (absolute, or inside ComfyUI's input folder).")),
                io.String.Input("lpips_weights", default="alex.pth", tooltip=(
                    "LPIPS v0.1 linear layers (weights/v0.1/alex.pth of the lpips package): absolute path or a "
                    "name in models/asuka. Not needed when lpips_weight is 0.")),
                io.String.Input("alexnet_weights", default="alexnet-owt-7be5be79.pth", tooltip=(
                    "torchvision's ImageNet AlexNet weights for LPIPS: absolute path or a name in models/asuka.")),
                io.Int.Input("steps", default=1000, min=1, max=1_000_000, tooltip="Total optimiser steps."),
                io.Int.Input("batch_size", default=4, min=1, max=64, tooltip="Images per micro-batch."),
                io.Int.Input("grad_accum", default=10, min=1, max=64, tooltip=(
                    "Micro-batches per step; the paper's batch is 40 (4 x 10).")),
                io.Float.Input("learning_rate", default=8e-5, min=1e-7, max=1e-2, step=1e-6, tooltip=(
                    "Adam learning rate (paper: 8e-5, cosine decay).")),
                io.Float.Input("l1_weight", default=1.0, min=0.0, max=100.0, step=0.1, tooltip="L1 loss weight."),
                io.Float.Input("lpips_weight", default=1.0, min=0.0, max=100.0, step=0.1, tooltip="LPIPS loss weight."),
                io.Int.Input("disc_start", default=10000, min=0, max=10_000_000, tooltip=(
                    "Step from which the patch-GAN loss is on.")),
                io.Float.Input("latent_aug_prob", default=0.5, min=0.0, max=1.0, step=0.05, tooltip=(
                    "Share of images whose latent is the UNet's one-step estimate (paper: 0.5).")),
                io.Int.Input("resolution", default=256, min=64, max=1024, step=64, tooltip="Training crop size."),
                io.Combo.Input("precision", options=["auto", "bf16", "fp16", "fp32"], default="auto", tooltip=(
                    "Autocast dtype. auto: bf16 where supported, else fp16 on a GPU, fp32 on the CPU.")),
                io.String.Input("run_name", default="asuka_sd15_decoder", tooltip="Name of the file and run folder."),
                io.Boolean.Input("resume", default=False, tooltip="Continue the run saved under this run_name."),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1, control_after_generate=True,
                             tooltip="Seed of crops, masks, jitter, timesteps and noise."),
                io.Boolean.Input("save_to_models", default=True, tooltip=(
                    "Also copy the decoder into models/asuka, so Load ASUKA Masked Decoder lists it.")),
                io.Clip.Input("clip", optional=True, tooltip=(
                    "The checkpoint's CLIP: the UNet then sees the empty prompt in the latent augmentation "
                    "(without it: zero tokens).")),
            ],
            outputs=[
                DECODER.Output(display_name="decoder", tooltip="The trained decoder (EMA weights)."),
                io.Image.Output(display_name="loss_curve", tooltip="Training (black) and held-out (red) loss."),
                io.String.Output(display_name="decoder_path", tooltip="Where the decoder file was written."),
            ],
        )

    @classmethod
    def execute(cls, model, vae, start_decoder: str, images_folder: str, lpips_weights: str, alexnet_weights: str,
                steps: int, batch_size: int, grad_accum: int, learning_rate: float, l1_weight: float,
                lpips_weight: float, disc_start: int, latent_aug_prob: float, resolution: int, precision: str,
                run_name: str, resume: bool, seed: int, save_to_models: bool, clip=None) -> io.NodeOutput:
        name = _run_name(run_name)
        folder = _images_folder(images_folder)
        device = model.load_device
        if precision == "auto":
            precision = ("fp32" if device.type == "cpu" else
                         "bf16" if mm.should_use_bf16(device, prioritize_performance=False) else "fp16")
        cfg = DecoderTrainConfig(steps=steps, batch_size=batch_size, grad_accum=grad_accum, lr=learning_rate,
                                 l1_weight=l1_weight, lpips_weight=lpips_weight, disc_start=disc_start,
                                 latent_aug_prob=latent_aug_prob, resolution=resolution, precision=precision,
                                 seed=seed, val_every=max(1, min(1000, steps // 4)), save_every=min(2000, steps),
                                 sample_every=min(2000, steps), log_every=10)
        cfg.check()
        train_set, val_set = image_sets(folder, resolution, seed=seed)
        out_dir = os.path.join(folder_paths.get_output_directory(), RUNS_FOLDER, name)
        progress = common.progress_bar(steps)
        with training_glue.training_mode():
            # built outside ComfyUI's inference mode: gradients flow through LPIPS to the decoder
            perceptual = perceptual_net(lpips_weight, lpips_weights, alexnet_weights, _model_file)
            decoder, fresh, start = build_start_decoder(start_decoder, vae, common.model_path, seed=seed)
            frozen, device, note = frozen_models(vae, model, clip, latent_augmentation=latent_aug_prob > 0)
            if note:
                common.log.info("decoder training: %s", note)
            trainer = DecoderTrainer(cfg, frozen, decoder, train_set, val_set, out_dir=out_dir, device=device,
                                     perceptual=perceptual, fresh_prefixes=fresh, export_name=name + ".safetensors",
                                     log=common.log.info, progress=progress,
                                     metadata={"asuka.training.start_decoder": start})
            if resume:
                trainer.resume()
            elif os.path.exists(trainer.state_path):
                raise InputError(f"A run named '{name}' already exists in {out_dir}. Switch resume on to "
                                 "continue it, or choose another run_name.")
            result = trainer.run()
        path = result["decoder"]
        if save_to_models:
            target = os.path.join(folder_paths.get_folder_paths(common.MODEL_FOLDER)[0], name + ".safetensors")
            shutil.copyfile(path, target + ".tmp")
            os.replace(target + ".tmp", target)
            path = target
        load_device, offload_device = mm.vae_device(), mm.vae_offload_device()
        dtype = common.compute_dtype(load_device, common.ROLE_DECODER)
        trained = load_decoder(result["decoder"], operations=comfy.ops.manual_cast, dtype=dtype, device=offload_device)
        patcher = common.patch_model(trained, dtype, load_device=load_device, offload_device=offload_device)
        return io.NodeOutput(patcher, _read_image(result["loss_curve"]), path)


NODES = [TrainDecoder]
