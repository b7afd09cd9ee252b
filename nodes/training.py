"""Node for training an SD1.5 aligner inside ComfyUI: ASUKA_TrainAligner."""

from __future__ import annotations

import os
import shutil

import torch
from comfy_api.latest import io

import comfy.model_management as mm
import comfy.ops
import comfy.model_patcher
import folder_paths

from ..asuka_core.aligner import TARGET_SD15, load_aligner
from ..asuka_core.errors import InputError
from ..asuka_core.training import AlignerTrainer, TrainConfig, image_sets
from . import common, training_glue
from .types import ALIGNER, CATEGORY, MAE

RUNS_FOLDER = "asuka_training"


def _images_folder(value: str) -> str:
    value = (value or "").strip()
    if not value:
        raise InputError("images_folder is empty: give a folder of photos (absolute, or inside ComfyUI's input folder).")
    path = value if os.path.isabs(value) else os.path.join(folder_paths.get_input_directory(), value)
    if not os.path.isdir(path):
        raise InputError(f"Image folder '{value}' was not found (looked for '{path}'). Give an absolute path or a "
                         "folder inside ComfyUI's input folder.")
    return path


def _run_name(value: str) -> str:
    name = (value or "").strip()
    if not name or any(c in name for c in "/\\:") or name.startswith("."):
        raise InputError(f"run_name '{value}' must be a plain file name (no folders), e.g. my_sd15_aligner.")
    return name[:-len(".safetensors")] if name.endswith(".safetensors") else name


class TrainAligner(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ASUKA_TrainAligner",
            display_name="Train ASUKA Aligner (SD1.5)",
            category=CATEGORY,
            is_output_node=True,
            description=(
                "Teaches ASUKA to work with SD1.5 by training an aligner on a folder of your photos (needs "
                "a GPU and time). "
                "Trains an SD1.5 ASUKA aligner for N steps on a folder of photos, with the SD1.5 inpainting "
                "model frozen (only the aligner learns; masks are generated). Blocks the queue while it runs; "
                "the progress bar shows the steps and Cancel stops it after saving a resumable state. The "
                "aligner is written to models/asuka/<run_name>.safetensors and the run (state, loss curve, "
                "sample images) to output/asuka_training/<run_name>/. A useful aligner needs a GPU and many "
                "thousand steps; see docs/training.md."
            ),
            inputs=[
                io.Model.Input("model", tooltip="An SD1.5 inpainting MODEL (9-channel UNet), e.g. from Load Checkpoint."),
                io.Vae.Input("vae", tooltip="The VAE of that checkpoint."),
                MAE.Input("mae", tooltip="From Load ASUKA MAE Prior (mae_300.pth)."),
                io.String.Input("images_folder", default="asuka_photos", tooltip=(
                    "Folder of training photos (png/jpg/webp, sub-folders included): absolute, or inside "
                    "ComfyUI's input folder. Hundreds to thousands of varied photos; a few are held out.")),
                io.Int.Input("steps", default=1000, min=1, max=1_000_000, tooltip=(
                    "Total optimiser steps of the run (with resume: the step to stop at).")),
                io.Int.Input("batch_size", default=4, min=1, max=64, tooltip="Images per micro-batch."),
                io.Int.Input("grad_accum", default=1, min=1, max=64, tooltip=(
                    "Micro-batches per optimiser step (effective batch = batch_size x grad_accum).")),
                io.Float.Input("learning_rate", default=1e-4, min=1e-5, max=1.0, step=1e-5, tooltip=(
                    "AdamW learning rate, after a linear warm-up (500 steps, at most a tenth of the run). "
                    "1e-4 is the pack's default; the paper's 5e-2 rewrote the weights many times over in "
                    "our small test (docs/training.md).")),
                io.Int.Input("resolution", default=512, min=64, max=1024, step=64, tooltip=(
                    "Training crop size in pixels (SD1.5: 512).")),
                io.Combo.Input("precision", options=["auto", "bf16", "fp16", "fp32"], default="auto", tooltip=(
                    "Autocast dtype. auto: bf16 where supported, else fp16 on a GPU, fp32 on the CPU.")),
                io.Boolean.Input("gradient_checkpointing", default=True, tooltip=(
                    "Recompute UNet activations in the backward pass: much less VRAM, ~30 % slower.")),
                io.String.Input("run_name", default="asuka_sd15_aligner", tooltip=(
                    "Name of the aligner file and of the run folder.")),
                io.Boolean.Input("resume", default=False, tooltip=(
                    "Continue the run saved under this run_name (same batch, seed and resolution).")),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1, control_after_generate=True,
                             tooltip="Seed of crops, masks, noise and timesteps."),
                io.Boolean.Input("save_to_models", default=True, tooltip=(
                    "Also copy the aligner into models/asuka, so Load ASUKA Aligner lists it.")),
            ],
            outputs=[
                ALIGNER.Output(display_name="aligner", tooltip="The trained aligner (EMA weights), ready for "
                               "ASUKA Aligner Conditioning."),
                io.Image.Output(display_name="loss_curve", tooltip="Training (black) and held-out (red) loss."),
                io.String.Output(display_name="aligner_path", tooltip="Where the aligner file was written."),
            ],
        )

    @classmethod
    def execute(cls, model, vae, mae, images_folder: str, steps: int, batch_size: int, grad_accum: int,
                learning_rate: float, resolution: int, precision: str, gradient_checkpointing: bool,
                run_name: str, resume: bool, seed: int, save_to_models: bool) -> io.NodeOutput:
        name = _run_name(run_name)
        folder = _images_folder(images_folder)
        device = model.load_device
        if precision == "auto":
            precision = ("fp32" if device.type == "cpu" else
                         "bf16" if mm.should_use_bf16(device, prioritize_performance=False) else "fp16")
        cfg = TrainConfig(steps=steps, batch_size=batch_size, grad_accum=grad_accum, lr=learning_rate,
                          warmup=min(500, steps // 10), resolution=resolution, precision=precision, seed=seed,
                          val_every=max(1, min(500, steps // 4)), save_every=min(1000, steps),
                          sample_every=min(1000, steps), log_every=10)
        cfg.check()
        train_set, val_set = image_sets(folder, resolution, seed=seed)
        training_glue.check_inpainting_model(model, vae)
        out_dir = os.path.join(folder_paths.get_output_directory(), RUNS_FOLDER, name)
        memory = training_glue.training_memory(batch_size, resolution, precision=precision,
                                               gradient_checkpointing=gradient_checkpointing)
        progress = common.progress_bar(steps)
        with training_glue.training_mode():
            try:
                models, device = training_glue.frozen_models(
                    model, vae, mae, sample_steps=20, gradient_checkpointing=gradient_checkpointing,
                    memory_required=memory)
                trainer = AlignerTrainer(cfg, models, train_set, val_set, out_dir=out_dir, device=device,
                                         export_name=name + ".safetensors", log=common.log.info,
                                         progress=progress, metadata={"asuka.training.base_model": "ComfyUI MODEL"})
                if resume:
                    trainer.resume()
                elif os.path.exists(trainer.state_path):
                    raise InputError(f"A run named '{name}' already exists in {out_dir}. Switch resume on to "
                                     "continue it, or choose another run_name.")
                result = trainer.run()
            finally:
                training_glue.release_trainable(model)
        path = result["aligner"]
        if save_to_models:
            target = os.path.join(folder_paths.get_folder_paths(common.MODEL_FOLDER)[0], name + ".safetensors")
            shutil.copyfile(path, target + ".tmp")
            os.replace(target + ".tmp", target)
            path = target
        aligner = load_aligner(result["aligner"], operations=comfy.ops.manual_cast,
                               dtype=common.compute_dtype(mm.get_torch_device()),
                               device=mm.text_encoder_offload_device())
        aligner.expect_target(TARGET_SD15)
        aligner.compute_dtype = common.compute_dtype(mm.get_torch_device())
        aligner.eval().requires_grad_(False)
        patcher = comfy.model_patcher.ModelPatcher(aligner, load_device=mm.get_torch_device(),
                                                   offload_device=mm.text_encoder_offload_device())
        curve = _read_image(result["loss_curve"])
        return io.NodeOutput(patcher, curve, path)


def _read_image(path: str) -> torch.Tensor:
    import numpy as np
    from PIL import Image

    with Image.open(path) as im:
        return torch.from_numpy(np.asarray(im.convert("RGB")).astype(np.float32) / 255.0)[None]


NODES = [TrainAligner]
