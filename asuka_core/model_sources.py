"""Where each model file of the pack's workflows comes from: the one table of model sources.

The README's model table, the example workflows' download metadata (``scripts/workflows.py``)
and the missing-files message of the loaders (``nodes/common.py``) are all made from
:data:`MODEL_SOURCES`. Pure data and string formatting: no ComfyUI, no torch.
"""

from __future__ import annotations

from dataclasses import dataclass

ASUKA_FLUX_REPO = "https://huggingface.co/yikaiwang/ASUKA-FLUX.1-Fill"
FLUX_FILL_REPO = "https://huggingface.co/black-forest-labs/FLUX.1-Fill-dev"
FLUX_TEXT_ENCODERS_REPO = "https://huggingface.co/comfyanonymous/flux_text_encoders"
AVQ_REPO = "https://huggingface.co/cross-attention/asymmetric-autoencoder-kl-x-1-5"
SD15_INPAINT_REPO = "https://huggingface.co/stable-diffusion-v1-5/stable-diffusion-inpainting"
X4_REPO = "https://huggingface.co/stabilityai/stable-diffusion-x4-upscaler"


@dataclass(frozen=True)
class ModelSource:
    name: str          # the file name the example workflows use
    folder: str        # ComfyUI model folder (models/<folder>)
    what: str          # one line: what the file is
    source: str        # where it comes from, in words
    page: str | None   # a web page to get it from; None: cannot be downloaded
    url: str | None = None   # a direct download of this exact file, when there is one
    node: str = ""     # the loader that reads it

    @property
    def downloadable(self) -> bool:
        return self.page is not None


MODEL_SOURCES: tuple[ModelSource, ...] = (
    ModelSource("mae_300.pth", "asuka", "MAE prior encoder (ViT-B/16, 256 px), official",
                "Hugging Face yikaiwang/ASUKA-FLUX.1-Fill", ASUKA_FLUX_REPO, node="ASUKA_MAELoader"),
    ModelSource("asuka_decoder.ckpt", "asuka", "ASUKA masked decoder for FLUX latents (16 channels)",
                "Hugging Face yikaiwang/ASUKA-FLUX.1-Fill", ASUKA_FLUX_REPO, node="ASUKA_DecoderLoader"),
    ModelSource("asuka_alignment_clip.pt", "asuka", "ASUKA aligner for FLUX, pooled-vector (CLIP) branch",
                "Hugging Face yikaiwang/ASUKA-FLUX.1-Fill", ASUKA_FLUX_REPO, node="ASUKA_AlignerLoader"),
    ModelSource("asuka_alignment_t5.pt", "asuka", "ASUKA aligner for FLUX, token (T5) branch",
                "Hugging Face yikaiwang/ASUKA-FLUX.1-Fill", ASUKA_FLUX_REPO, node="ASUKA_AlignerLoader"),
    ModelSource("asymmetric-autoencoder-kl-x-1-5.safetensors", "asuka",
                "Asymmetric VQGAN masked decoder for SD1.5 latents (x1.5; -x-2 is the larger one)",
                "Hugging Face cross-attention/asymmetric-autoencoder-kl-x-1-5 (diffusion_pytorch_model"
                ".safetensors, saved under this name)", AVQ_REPO,
                url=AVQ_REPO + "/resolve/main/diffusion_pytorch_model.safetensors", node="ASUKA_DecoderLoader"),
    ModelSource("asuka_sd15_aligner.safetensors", "asuka",
                "ASUKA aligner for SD1.5 (maps the MAE prior to SD1.5's 768-d cross-attention)",
                "not published by anyone: train one with the Train ASUKA Aligner node or "
                "`scripts/host.sh train-aligner` (docs/training.md)", None, node="ASUKA_AlignerLoader"),
    ModelSource("flux1-fill-dev.safetensors", "diffusion_models", "FLUX.1-Fill-dev (or an fp8 copy)",
                "Hugging Face black-forest-labs/FLUX.1-Fill-dev (accept its licence first)", FLUX_FILL_REPO,
                url=FLUX_FILL_REPO + "/resolve/main/flux1-fill-dev.safetensors", node="UNETLoader"),
    ModelSource("ae.safetensors", "vae", "FLUX VAE", "Hugging Face black-forest-labs/FLUX.1-Fill-dev",
                FLUX_FILL_REPO, url=FLUX_FILL_REPO + "/resolve/main/ae.safetensors", node="VAELoader"),
    ModelSource("clip_l.safetensors", "text_encoders", "FLUX text encoder (CLIP-L)",
                "Hugging Face comfyanonymous/flux_text_encoders", FLUX_TEXT_ENCODERS_REPO,
                url=FLUX_TEXT_ENCODERS_REPO + "/resolve/main/clip_l.safetensors", node="DualCLIPLoader"),
    ModelSource("t5xxl_fp16.safetensors", "text_encoders", "FLUX text encoder (T5-XXL; t5xxl_fp8 also works)",
                "Hugging Face comfyanonymous/flux_text_encoders", FLUX_TEXT_ENCODERS_REPO,
                url=FLUX_TEXT_ENCODERS_REPO + "/resolve/main/t5xxl_fp16.safetensors", node="DualCLIPLoader"),
    ModelSource("sd-v1-5-inpainting.ckpt", "checkpoints",
                "an SD1.5 inpainting checkpoint (9-channel UNet; any SD1.5 inpainting model works)",
                "Hugging Face stable-diffusion-v1-5/stable-diffusion-inpainting", SD15_INPAINT_REPO,
                url=SD15_INPAINT_REPO + "/resolve/main/sd-v1-5-inpainting.ckpt", node="CheckpointLoaderSimple"),
    ModelSource("x4-upscaler-ema.safetensors", "checkpoints", "Stable Diffusion x4 upscaler",
                "Hugging Face stabilityai/stable-diffusion-x4-upscaler", X4_REPO,
                url=X4_REPO + "/resolve/main/x4-upscaler-ema.safetensors", node="CheckpointLoaderSimple"),
)

# Model inputs of the loaders that the pack's workflows use: node type -> input -> folder.
LOADER_INPUTS: dict[str, dict[str, str]] = {
    "ASUKA_MAELoader": {"mae_name": "asuka"},
    "ASUKA_AlignerLoader": {"aligner_name": "asuka"},
    "ASUKA_DecoderLoader": {"decoder_name": "asuka"},
    "CheckpointLoaderSimple": {"ckpt_name": "checkpoints"},
    "UNETLoader": {"unet_name": "diffusion_models"},
    "VAELoader": {"vae_name": "vae"},
    "CLIPLoader": {"clip_name": "text_encoders"},
    "DualCLIPLoader": {"clip_name1": "text_encoders", "clip_name2": "text_encoders"},
}

BY_NAME: dict[str, ModelSource] = {s.name: s for s in MODEL_SOURCES}
SD15_ALIGNER = BY_NAME["asuka_sd15_aligner.safetensors"]


def source_for(name: str, folder: str, node: str = "") -> ModelSource | None:
    """The table's entry for a file of that name (sub-folders ignored), or for an aligner
    that is not one of the released FLUX files: every other aligner is an SD1.5 aligner,
    which nobody publishes."""
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    entry = BY_NAME.get(base)
    if entry is not None and entry.folder == folder:
        return entry
    if node == "ASUKA_AlignerLoader":
        return SD15_ALIGNER
    return None


def describe_source(entry: ModelSource | None) -> str:
    if entry is None:
        return "not a file this pack knows: get it where you got the workflow"
    if not entry.downloadable:
        return "cannot be downloaded, " + entry.source
    where = entry.url or entry.page
    return f"{entry.source}: {where}"


def missing_files_message(missing: list[tuple[str, str, str]], folder_paths: dict[str, list[str]]) -> str:
    """One message for every missing model file of a prompt.

    missing: (node type, folder, file name) per missing file; folder_paths: the folder's
    directories on this machine (the first is where a new file goes)."""
    unique: list[tuple[str, str, str]] = []
    for entry in missing:   # a file that several loaders use is listed once
        if all(entry[1:] != seen[1:] for seen in unique):
            unique.append(entry)
    lines = [f"{len(unique)} model file{'s are' if len(unique) != 1 else ' is'} missing:"]
    for node, folder, name in unique:
        dirs = folder_paths.get(folder) or []
        where = f"models/{folder}" + (f" [{dirs[0]}]" if dirs else "")
        lines.append(f"- {name} -> {where} ({node}); {describe_source(source_for(name, folder, node))}")
    lines.append("Put the files there, then press 'r' in the browser to refresh the file lists "
                 "(or pick files you already have in the loaders).")
    return "\n".join(lines)


def markdown_table() -> str:
    """The README's model-file table."""
    rows = ["| file | folder | what it is | where it comes from |", "| --- | --- | --- | --- |"]
    for s in MODEL_SOURCES:
        where = f"[{s.source}]({s.page})" if s.downloadable else f"**{s.source}**"
        rows.append(f"| `{s.name}` | `models/{s.folder}` | {s.what} | {where} |")
    return "\n".join(rows)


def workflow_metadata(name: str, folder: str) -> dict | None:
    """The frontend's model metadata for a loader widget value ({name, url, directory}:
    its missing-models dialog offers the download), or None for a file without a download."""
    entry = source_for(name, folder)
    if entry is None or not entry.downloadable:
        return None
    # The dialog lists one entry per url: files that share a page get it with their name as
    # the fragment.
    return {"name": name, "url": entry.url or f"{entry.page}#{name}", "directory": folder}
