"""HD-Painter nodes for SD1.5 inpainting: HDPainter_PromptTokens, HDPainter_PAIntA,
HDPainter_RASGSampler. The maths lives in ``asuka_core.hd_painter``, the UNet hooks and
the sampler plumbing in ``hd_painter_glue``."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import comfy.latent_formats
import comfy.model_management as mm
import comfy.samplers
from comfy_api.latest import io

from ..asuka_core import hd_painter as hp
from ..asuka_core.errors import InputError
from . import hd_painter_glue as glue
from .types import HD_PAINTER_CATEGORY

CATEGORY = HD_PAINTER_CATEGORY
TOKENS = io.Custom("HDPAINTER_TOKENS")
OFFICIAL_SUFFIX = "Full HD, 4K, high quality, high resolution"


@dataclass(frozen=True)
class PromptTokens:
    """Positions of the prompt's word tokens and of the end token in the text context."""

    positions: tuple[int, ...]
    text: str


def _sd15_tokenizer(clip, where: str):
    tok = getattr(clip, "tokenizer", None)
    inner = getattr(tok, getattr(tok, "clip", ""), None)
    if getattr(tok, "clip_name", None) != "l" or inner is None or getattr(inner, "start_token", None) is None:
        raise InputError(f"{where}: HD-Painter supports SD1.5 only, and this CLIP is not SD1.5's CLIP-L text "
                         "encoder (SD2, SDXL and newer models are not supported). Load an SD1.5 (inpainting) "
                         "checkpoint and use its CLIP.")
    return inner


def check_sd15_model(base_model, where: str) -> None:
    """Refuse anything but an SD1.5 UNet (context width 768, SD1.5 latents)."""
    config = getattr(getattr(base_model, "model_config", None), "unet_config", {}) or {}
    latent = getattr(base_model, "latent_format", None)
    if config.get("context_dim") != 768 or not isinstance(latent, comfy.latent_formats.SD15) \
            or config.get("adm_in_channels") is not None:
        kind = type(getattr(base_model, "model_config", base_model)).__name__
        raise InputError(f"{where}: HD-Painter works with SD1.5 UNets only; this model is {kind} "
                         f"(text context width {config.get('context_dim')}). SD2, SDXL and newer models are "
                         "not supported. Load an SD1.5 inpainting checkpoint.")


def _mask_input():
    return io.Mask.Input("mask", optional=True, tooltip=(
        "Hole to use (white = inpaint). Optional: without it the mask given to "
        "InpaintModelConditioning (the UNet's mask channel) is used."))


def _tokens_input():
    return TOKENS.Input("tokens", tooltip="From HD-Painter Prompt.")


def _pixel_mask(mask):
    return None if mask is None else hp.prepare_pixel_mask(mask.float().cpu())


class PromptTokens_(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="HDPainter_PromptTokens",
            display_name="HD-Painter Prompt",
            category=CATEGORY,
            description=(
                "Encodes the prompt that says what to paint into the hole, for the HD-Painter nodes. "
                "Encodes the inpainting prompt (like CLIPTextEncode) and finds the positions of its "
                "words and of the end-of-text token, which PAIntA and RASG use to relate the prompt to the "
                "image. Use its conditioning as the positive prompt. SD1.5 CLIP only."),
            inputs=[
                io.Clip.Input("clip", tooltip="The CLIP of the SD1.5 (inpainting) checkpoint."),
                io.String.Input("text", multiline=True, default="",
                                tooltip="What should appear in the hole. These words steer PAIntA and RASG."),
                io.String.Input("suffix", default=OFFICIAL_SUFFIX, tooltip=(
                    "Appended as 'text, suffix' to the encoded prompt, as the official HD-Painter does. Its "
                    "words do not count as prompt words; the end token of the whole prompt does. Empty = none.")),
            ],
            outputs=[
                io.Conditioning.Output(display_name="positive", tooltip="The encoded prompt (with the suffix)."),
                TOKENS.Output(display_name="tokens", tooltip="Prompt word positions, for PAIntA and the RASG sampler."),
            ],
        )

    @classmethod
    def execute(cls, clip, text: str, suffix: str) -> io.NodeOutput:
        where = "HD-Painter Prompt"
        inner = _sd15_tokenizer(clip, where)
        hp.require_words(text)
        special = dict(start_token=inner.start_token, end_token=inner.end_token, pad_token=inner.pad_token)
        n_words = hp.count_word_tokens([[t for t, *_ in chunk] for chunk in clip.tokenize(text)["l"]], **special)
        full = f"{text}, {suffix}" if suffix.strip() and text.strip() else text
        tokens = clip.tokenize(full)
        chunks = [[t for t, *_ in chunk] for chunk in tokens["l"]]
        positions = hp.prompt_token_positions(chunks, n_words, chunk_length=inner.max_length, **special)
        conditioning = clip.encode_from_tokens_scheduled(tokens)
        return io.NodeOutput(conditioning, PromptTokens(tuple(positions), text))


class PAIntA(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="HDPainter_PAIntA",
            display_name="HD-Painter PAIntA",
            category=CATEGORY,
            description=(
                "Makes the inpainting follow your prompt instead of copying the surroundings into the hole. "
                "Prompt-Aware Introverted Attention: in the self-attention of the two middle UNet "
                "resolutions, hole pixels attend less to known pixels that are unrelated to the prompt, so "
                "the fill follows the prompt instead of copying the surroundings. Patches a copy of the "
                "model; use it with an SD1.5 inpainting model and InpaintModelConditioning."),
            inputs=[
                io.Model.Input("model", tooltip="An SD1.5 inpainting model (9-channel UNet)."),
                _tokens_input(),
                io.Int.Input("end_timestep", default=hp.PAINTA_END_TIMESTEP, min=0, max=1000, tooltip=(
                    "PAIntA is active while the sampler's timestep is above this value (999 = first step, "
                    "0 = last). 500 = the first half of the steps, as the official code.")),
                _mask_input(),
            ],
            outputs=[io.Model.Output(display_name="model", tooltip="The model with PAIntA.")],
        )

    @classmethod
    def execute(cls, model, tokens, end_timestep: int, mask=None) -> io.NodeOutput:
        where = "HD-Painter PAIntA"
        check_sd15_model(model.model, where)
        if mask is None and model.model.model_config.unet_config.get("in_channels") != 9:
            raise InputError(f"{where}: no mask. This is not an inpainting UNet (it has no mask channel), so "
                             "connect a MASK to the node's mask input, or load an SD1.5 inpainting checkpoint "
                             "and use InpaintModelConditioning.")
        patched = model.clone()
        glue.PaintaPatch(tokens.positions, mask=_pixel_mask(mask), end_timestep=end_timestep).install(patched)
        return io.NodeOutput(patched)


def _rasg_sampler_function(model, x, sigmas, extra_args=None, callback=None, disable=None, *, tokens, eta,
                           sigma_mode, mask):
    base = model.inner_model.inner_model
    check_sd15_model(base, "HD-Painter RASG Sampler")
    if mask is None and base.model_config.unet_config.get("in_channels") != 9:
        raise InputError("HD-Painter RASG Sampler: no mask. Use an SD1.5 inpainting model with "
                         "InpaintModelConditioning, or connect a MASK to the sampler's mask input.")
    return glue.rasg_sampler(model, x, sigmas, extra_args, callback, disable, tokens=tokens, eta=eta,
                             sigma_mode=sigma_mode, mask=mask,
                             check_interrupt=mm.throw_exception_if_processing_interrupted)


class RASGSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="HDPainter_RASGSampler",
            display_name="HD-Painter RASG Sampler",
            category=CATEGORY,
            description=(
                "A sampler that makes what the prompt describes actually appear in the hole. "
                "Reweighting Attention Score Guidance: a DDIM sampler whose random noise is replaced by the "
                "gradient of a score that pulls the prompt's cross-attention into the hole. Connect to "
                "SamplerCustom with the 'simple' scheduler (BasicScheduler). Each step runs a backward pass "
                "through the UNet, so a step costs more time and memory than a plain step (1.6x the CPU time "
                "measured at 512x512)."),
            inputs=[
                _tokens_input(),
                io.Float.Input("eta", default=0.1, min=0.0, max=10.0, step=0.01, tooltip=(
                    "Guidance strength. 0 = plain deterministic DDIM. Official value 0.1.")),
                io.Combo.Input("sigma_mode", options=list(hp.SIGMA_MODES), default="official_code", tooltip=(
                    "official_code: the guidance scale of the official implementation (per-step alphas; about "
                    "10-25x weaker than the paper's formula at the same eta). paper: the DDIM sigma of the "
                    "paper (use a much smaller eta, e.g. 0.005-0.01).")),
                _mask_input(),
            ],
            outputs=[io.Sampler.Output(display_name="sampler", tooltip="For SamplerCustom / SamplerCustomAdvanced.")],
        )

    @classmethod
    def execute(cls, tokens, eta: float, sigma_mode: str, mask=None) -> io.NodeOutput:
        if sigma_mode not in hp.SIGMA_MODES:
            raise InputError(f"HD-Painter RASG Sampler: unknown sigma_mode '{sigma_mode}'.")
        function = functools.partial(_rasg_sampler_function, tokens=list(tokens.positions), eta=float(eta),
                                     sigma_mode=sigma_mode, mask=_pixel_mask(mask))
        return io.NodeOutput(comfy.samplers.KSAMPLER(function))


NODES = [PromptTokens_, PAIntA, RASGSampler]
