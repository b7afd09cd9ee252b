"""Fine-tuning a masked decoder for SD1.5 latents with ASUKA's colour and latent
augmentation (pure PyTorch; paper §3.3 and §5, recipe in docs/training.md).

The frozen side comes in as callables (:class:`DecoderFrozen`): the VAE encoder and,
for the latent augmentation, the SD1.5 inpainting UNet in k-diffusion form, built by
``nodes/decoder_training.py`` from ComfyUI's models or by tests. One optimiser step, per
image of the batch:

1. a training crop (``data.ImageSet``) and a generated mask (``asuka_core.masks``);
2. colour augmentation (``decoder_augment.draw_jitter``): the crop is colour-jittered,
   then encoded by the frozen VAE encoder;
3. latent augmentation, with probability ``latent_aug_prob`` (paper: 50 %): the latent is
   replaced by the UNet's one-step estimate at ``t`` in [500, 1000) with an all-zero mask;
4. the decoder decodes that latent with the *original* known pixels and the mask, and is
   trained to give the original crop: L1 + LPIPS through a learned log-variance, plus,
   from ``disc_start``, a hinge patch-GAN with the adaptive weight (the Asymmetric VQGAN
   losses, ``decoder_losses``); the discriminator takes its own step.

Then optional clipping, Adam for both, EMA of the decoder (the exported file holds the
average). Every random draw of step ``s`` comes from generators seeded with ``(seed, s)``,
so a resumed run continues exactly as an uninterrupted one.

Under ``torchrun`` (``distributed.py``) each process trains its shard of every global
batch (each sample's draws a function of ``(seed, global sample number)``); the decoder is
wrapped in DistributedDataParallel, the discriminator's and the log-variance's gradients
are averaged over the ranks, the discriminator's BatchNorm and the adaptive GAN weight use
the whole global batch, so N processes train as one process with N times the batch. Rank 0
keeps the EMA, validates, writes samples, logs and saves.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from typing import Callable, Mapping, Optional, Sequence

import numpy as np
import torch
from torch import nn

from .. import checkpoint as ckpt_mod
from ..decoder import KIND_AVQ, MaskedDecoder, load_decoder
from ..errors import CheckpointError, InputError, TrainingDivergedError
from ..imaging import image_to_model, model_to_image
from ..runtime import Progress
from . import distributed
from .data import ImageSet
from .decoder_augment import (PAPER_JITTER, PAPER_T_RANGE, check_t_range, draw_jitter, draw_timesteps,
                              jitter_batch, latent_augment)
from .decoder_losses import PatchDiscriminator, adaptive_weight, hinge_d_loss, reconstruction_nll
from .ema import EMA
from .data import rng_seed
from .loop import PRECISIONS
from .plot import loss_curve_png, sample_grid_png
from .schedule import learning_rate
from .trainer_base import OLDER_DRAWS_NOTE, TrainerBase, read_state, refuse_changes, resume_changes, write_state

STATE_FORMAT = "asuka-decoder-training"
STATE_VERSION = 2   # 2: per-sample random draws (sharded under torchrun), world size stored
FROM_VAE = "vae"
"""Start-decoder choice meaning: the SD VAE's own decoder plus a new condition branch."""
FRESH_PREFIX = "condition_encoder."
# The batch size is checked as the global batch (batch size x processes), as for the aligner.
_RESUME_FIXED = ("grad_accum", "seed", "resolution", "holdout_seed", "hole_ratio", "jitter",
                 "latent_aug_prob", "latent_aug_t", "disc_width", "disc_layers", "learn_logvar")

Encode = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class DecoderFrozen:
    """What the decoder trainer needs from the frozen models."""

    encode: Encode
    """IMAGE ``[B, H, W, 3]`` 0..1 -> raw VAE latent ``[B, 4, H/8, W/8]`` (the frozen encoder)."""
    denoiser: Optional[Callable[..., torch.Tensor]] = None
    """``denoiser(x, sigma, context, masked_latent, mask) -> eps_hat``: the SD1.5 inpainting
    UNet (only for the latent augmentation)."""
    sigmas: Optional[torch.Tensor] = None          # [T] ascending in t
    context: Optional[torch.Tensor] = None         # [1, N, 768]: the empty prompt (or zeros)
    latent_in: Callable[[torch.Tensor], torch.Tensor] = lambda z: z    # raw -> model space
    latent_out: Callable[[torch.Tensor], torch.Tensor] = lambda z: z   # model space -> raw
    prepare: Optional[Callable[[], None]] = None


@dataclass
class DecoderTrainConfig:
    # paper §5: 50K steps, batch 40, lr 8e-5 with cosine decay
    steps: int = 50000
    batch_size: int = 4
    grad_accum: int = 10
    lr: float = 8e-5
    warmup: int = 0
    lr_final: float = 0.0               # cosine decay to lr * lr_final (1 = constant)
    pretrained_lr_scale: float = 0.1    # AVQ: pre-existing decoder weights at 0.1x when a new branch trains
    betas: tuple = (0.5, 0.9)           # AVQ's Adam
    max_grad_norm: float = 0.0          # 0 = no clipping (AVQ clips nothing)
    ema_decay: float = 0.999
    l1_weight: float = 1.0
    lpips_weight: float = 1.0           # AVQ perceptual weight 1
    learn_logvar: bool = True
    disc_start: int = 10000
    disc_weight: float = 0.8            # AVQ: adaptive weight x 0.8
    disc_factor: float = 1.0            # 0 = no GAN at all
    disc_width: int = 64
    disc_layers: int = 3
    jitter: tuple = PAPER_JITTER        # brightness, contrast, saturation, hue
    latent_aug_prob: float = 0.5
    latent_aug_t: tuple = PAPER_T_RANGE
    resolution: int = 256
    hole_ratio: tuple = (0.1, 0.75)
    seed: int = 0
    holdout_seed: int = 0
    precision: str = "bf16"
    val_every: int = 1000
    save_every: int = 2000
    sample_every: int = 2000
    sample_count: int = 4
    log_every: int = 10

    def check(self) -> None:
        problems = []
        for name in ("steps", "batch_size", "grad_accum", "disc_width", "disc_layers"):
            if int(getattr(self, name)) < 1:
                problems.append(f"{name} must be at least 1 (got {getattr(self, name)})")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            problems.append(f"lr must be a positive number (got {self.lr})")
        if self.precision not in PRECISIONS:
            problems.append(f"precision must be one of {', '.join(PRECISIONS)} (got {self.precision!r})")
        if not 0.0 <= self.ema_decay < 1.0:
            problems.append(f"ema_decay must be in [0, 1) (got {self.ema_decay})")
        if not 0.0 <= self.latent_aug_prob <= 1.0:
            problems.append(f"latent_aug_prob must be in [0, 1] (got {self.latent_aug_prob})")
        for name in ("l1_weight", "lpips_weight", "disc_weight", "disc_factor", "pretrained_lr_scale"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0):
                problems.append(f"{name} must be a number >= 0 (got {v})")
        if self.l1_weight == 0 and self.lpips_weight == 0:
            problems.append("l1_weight and lpips_weight are both 0: nothing to reconstruct with")
        if len(self.jitter) != 4 or any(not (0 <= float(j)) for j in self.jitter) or float(self.jitter[3]) > 0.5:
            problems.append(f"jitter must be 4 values >= 0 (brightness, contrast, saturation, hue <= 0.5); "
                            f"got {self.jitter}")
        if self.resolution < 64 or self.resolution % 64:
            problems.append(f"resolution must be a multiple of 64 (got {self.resolution})")
        if problems:
            raise InputError("Decoder training settings: " + "; ".join(problems) + ".")


# ------------------------------------------------------------------------------ decoders

_FAMILY_HINT = ("Start from an Asymmetric VQGAN decoder for SD1.5 (base, x1.5 or x2: the original .ckpt or the "
                "diffusers cross-attention/asymmetric-autoencoder-kl-x-1-5 / x-2 folder), or from the SD VAE's "
                f"own decoder ('{FROM_VAE}').")


def check_sd15_decoder(decoder: MaskedDecoder, name: str = "the start decoder") -> None:
    """CheckpointError unless ``decoder`` is an Asymmetric-VQGAN-family decoder for
    4-channel (SD1.5) latents, the family this trainer fine-tunes."""
    if decoder.latent_channels != 4:
        raise CheckpointError(
            f"{name} decodes {decoder.latent_channels}-channel latents ({'FLUX' if decoder.latent_channels == 16 else 'not SD1.5'}); "
            f"the SD1.5 decoder trainer needs a decoder for 4-channel SD1.5 latents. {_FAMILY_HINT}")
    if decoder.kind != KIND_AVQ:
        raise CheckpointError(
            f"{name} is an ASUKA-FLUX-style decoder (mask as an extra input); the SD1.5 trainer fine-tunes the "
            f"Asymmetric VQGAN family. {_FAMILY_HINT}")


def start_decoder(source) -> MaskedDecoder:
    """An SD1.5 masked decoder from a file, a diffusers folder or a state dict, in float32
    on the CPU, checked to be of the family this trainer fine-tunes."""
    name = source if isinstance(source, (str, os.PathLike)) else "the start decoder"
    try:
        decoder = load_decoder(source, dtype=torch.float32)
    except CheckpointError as e:
        raise CheckpointError(f"Start decoder: {e} {_FAMILY_HINT}") from None
    check_sd15_decoder(decoder, f"'{os.path.basename(os.fspath(name))}'" if name != "the start decoder" else name)
    return decoder


def _vae_tensors(vae_state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    for prefix in ("first_stage_model.", "vae.", ""):
        out = {k[len(prefix):]: v for k, v in vae_state.items() if k.startswith(prefix)}
        if "decoder.conv_in.weight" in out and "post_quant_conv.weight" in out:
            return {k: v for k, v in out.items() if k.startswith(("decoder.", "post_quant_conv."))}
    raise CheckpointError(
        "The VAE has no ldm-style decoder with post_quant_conv (decoder.conv_in, post_quant_conv): give the SD1.5 "
        "VAE (the checkpoint's own, or vae-ft-mse-840000) to start the decoder from.")


def decoder_from_vae(vae_state: Mapping[str, torch.Tensor], *, seed: int = 0) -> MaskedDecoder:
    """The SD VAE decoder (ldm names, as ComfyUI holds it) plus a freshly initialised
    Asymmetric-VQGAN condition branch (``condition_encoder.*``: 3x3 convs to the widths of
    up level 0 and 1 at full resolution, then 4x4 stride-2 convs to the widths of the
    lower levels; PyTorch's default initialisation, seeded)."""
    tensors = _vae_tensors(vae_state)
    if "decoder.encoder.layers.0.weight" in tensors:
        raise CheckpointError("This VAE already has a condition branch: load it as the start decoder instead.")
    levels = sorted({int(k.split(".")[2]) for k in tensors if k.startswith("decoder.up.")})
    widths = [tensors[f"decoder.up.{lv}.block.0.conv1.weight"].shape[0] for lv in levels]
    mid = tensors["decoder.conv_in.weight"].shape[0]
    outs = [widths[0]] + [widths[lv + 1] if lv + 1 < len(widths) else mid for lv in range(len(widths))]
    kernels = [3, 3] + [4] * (len(widths) - 1)
    out_rgb = tensors["decoder.conv_out.weight"].shape[0]
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        c_in = out_rgb
        for i, (c, k) in enumerate(zip(outs, kernels)):
            conv = nn.Conv2d(c_in, c, k, stride=1 if k == 3 else 2, padding=1)
            tensors[f"decoder.encoder.layers.{i}.weight"] = conv.weight.detach().clone()
            tensors[f"decoder.encoder.layers.{i}.bias"] = conv.bias.detach().clone()
            c_in = c
    finally:
        torch.random.set_rng_state(gen_state)
    decoder = load_decoder(tensors, dtype=torch.float32)
    check_sd15_decoder(decoder, "the VAE decoder")
    return decoder


def ldm_state_dict(decoder_state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Internal ``MaskedDecoder`` names -> the original Asymmetric VQGAN (ldm) layout the
    loaders read: ``decoder.*``, the condition branch as ``decoder.encoder.layers.N``, mid
    attention as 1x1 convs, ``post_quant_conv.*`` at the top."""
    out = {}
    for k, v in decoder_state.items():
        if k.startswith("post_quant_conv."):
            out[k] = v
            continue
        if k.startswith(FRESH_PREFIX + "layers."):
            k = "encoder.layers." + k[len(FRESH_PREFIX + "layers."):]
        if k.startswith("mid.attn_1.") and k.endswith(".weight") and v.ndim == 2:
            v = v[:, :, None, None]
        out["decoder." + k] = v
    return out


# ------------------------------------------------------------------------------ trainer

def is_main() -> bool:
    """Whether this process writes files, samples and logs (rank 0 under torchrun)."""
    return distributed.current().is_main


class DecoderTrainer(TrainerBase):
    """Fine-tunes an SD1.5 masked decoder. ``run()`` trains to ``config.steps``;
    ``resume(path)`` first restores a state written by ``save_state``."""

    def __init__(self, config: DecoderTrainConfig, frozen: DecoderFrozen, decoder: MaskedDecoder,
                 train_set: ImageSet, val_set: ImageSet, *, out_dir: str, device: torch.device | str = "cpu",
                 perceptual: nn.Module | None = None, fresh_prefixes: Sequence[str] = (),
                 object_masks=None, progress: Progress = None, log: Callable[[str], None] = print,
                 export_name: str = "asuka_sd15_decoder.safetensors", metadata: dict | None = None,
                 dist: distributed.DistInfo | None = None):
        config.check()
        if len(train_set) == 0 or len(val_set) == 0:
            raise InputError("Training needs at least one training and one held-out image.")
        check_sd15_decoder(decoder)
        if config.lpips_weight > 0 and perceptual is None:
            raise InputError("lpips_weight is above 0 but no LPIPS network was given: pass the LPIPS weights "
                             "(--lpips-weights alex.pth and --alexnet-weights alexnet-owt-7be5be79.pth) or set "
                             "the LPIPS weight to 0.")
        if config.latent_aug_prob > 0:
            if frozen.denoiser is None or frozen.sigmas is None or frozen.context is None:
                raise InputError("Latent augmentation (latent_aug_prob > 0) needs the frozen SD1.5 inpainting "
                                 "UNet: give the inpainting checkpoint, or set latent_aug_prob to 0.")
            problem = check_t_range(config.latent_aug_t, len(frozen.sigmas))
            if problem:
                raise InputError(f"Decoder training settings: {problem}.")
        self._init_common(config, train_set, val_set, device=device, dist=dist, out_dir=out_dir, progress=progress,
                          log=log, export_name=export_name, metadata=metadata)
        self.frozen = frozen
        self.decoder = decoder.to(self.device).float().train()
        self.decoder.requires_grad_(True)
        if self.decoder.post_quant_conv is not None:       # SD's post-quant conv stays frozen (AVQ)
            self.decoder.post_quant_conv.requires_grad_(False)
        self.perceptual = perceptual.to(self.device).eval() if perceptual is not None else None
        self.disc = distributed.sync_batchnorm(
            PatchDiscriminator(3, config.disc_width, config.disc_layers, seed=config.seed).to(self.device), self.dist)
        self.logvar = nn.Parameter(torch.zeros((), device=self.device), requires_grad=config.learn_logvar)
        self.model = self._wrap(self.decoder)
        self.disc_model = self._wrap(self.disc)
        self._make_masks(object_masks)
        fresh, old = [], []
        for name, p in self.decoder.named_parameters():
            if p.requires_grad:
                (fresh if name.startswith(tuple(fresh_prefixes)) else old).append(p)
        self.fresh_prefixes = tuple(fresh_prefixes)
        old_scale = config.pretrained_lr_scale if fresh else 1.0
        groups = [{"params": old, "lr_scale": old_scale}]
        if fresh:
            groups.append({"params": fresh, "lr_scale": 1.0})
        if config.learn_logvar:
            groups.append({"params": [self.logvar], "lr_scale": 1.0})
        self.optimizer = torch.optim.Adam(groups, lr=config.lr, betas=tuple(config.betas))
        self.disc_optimizer = torch.optim.Adam(self.disc.parameters(), lr=config.lr, betas=tuple(config.betas))
        self.ema = EMA(self.decoder, config.ema_decay)
        fp16 = config.precision == "fp16"
        self.scaler = torch.amp.GradScaler(self.device.type) if fp16 else None
        self.disc_scaler = torch.amp.GradScaler(self.device.type) if fp16 else None
        self.step = 0
        self.history: dict[str, list] = {"train": [], "val": [], "d": []}
        self._last_saved = -1
        self._eval_decoder: MaskedDecoder | None = None

    def _wrap(self, module: nn.Module) -> nn.Module:
        """The decoder in DistributedDataParallel under torchrun (itself in one process).
        The discriminator is not wrapped: its generator-side forward runs with its weights
        frozen, so its gradients are averaged explicitly (``_average_side_gradients``)."""
        return distributed.wrap(module, self.dist) if module is self.decoder else module

    def _average_side_gradients(self, disc: bool) -> None:
        distributed.average_gradients([self.logvar] + (list(self.disc.parameters()) if disc else []), self.dist)

    def _global_mean(self, t: torch.Tensor) -> torch.Tensor:
        return distributed.all_mean(t, self.dist)

    def _prepare(self) -> None:
        if self.frozen.prepare is not None:
            self.frozen.prepare()

    def _say(self, text: str) -> None:
        if self.dist.is_main:
            self.log(text)

    # ---------------------------------------------------------------------- batches

    @property
    def global_batch(self) -> int:
        return self.config.batch_size * self.dist.world_size

    def _micro_batch(self, step: int, micro: int) -> dict:
        """This process's share of micro-batch ``micro`` of ``step``: the global samples
        ``n`` of ``distributed.shard``, each drawn from ``(seed, n)`` alone (image, crop,
        mask, jitter, augmentation flag, timestep and noise)."""
        cfg = self.config
        first = (step * cfg.grad_accum + micro) * self.global_batch
        numbers = [first + k for k in distributed.shard(cfg.batch_size, self.dist)]
        images, jitters, augment, gens = [], [], [], []
        for n in numbers:
            rng = np.random.default_rng([cfg.seed, n, 1])
            pick = int(rng.integers(0, len(self.train_set)))
            images.append(self.train_set.sample(pick, seed=rng_seed(cfg.seed, n)))
            jitters.append(draw_jitter(rng, cfg.jitter))
            augment.append(bool(rng.random() < cfg.latent_aug_prob))
            gens.append(torch.Generator().manual_seed(rng_seed(cfg.seed, n, 2)))
        return {"images": torch.stack(images), "masks": self.masks.batch(numbers), "jitters": jitters,
                "augment": torch.tensor(augment, dtype=torch.bool), "gen": gens}

    @torch.no_grad()
    def corrupted_latents(self, images: torch.Tensor, jitters, augment: torch.Tensor,
                          gen: torch.Generator | Sequence[torch.Generator]) -> torch.Tensor:
        """The decoder's input: the latent of the colour-jittered images, for the images
        flagged in ``augment`` replaced by the UNet's one-step estimate. ``gen``: one
        generator per image (timestep, then noise), or one for the whole batch."""
        z = self.frozen.encode(jitter_batch(images, jitters)).float().to(self.device)
        if isinstance(gen, torch.Generator):
            t = draw_timesteps(gen, z.shape[0], self.config.latent_aug_t)
            noise = torch.randn(z.shape, generator=gen)
        else:
            t, noise = [], []
            for g in gen:
                t.append(draw_timesteps(g, 1, self.config.latent_aug_t))
                noise.append(torch.randn((1,) + tuple(z.shape[1:]), generator=g))
            t, noise = torch.cat(t), torch.cat(noise)
        noise = noise.to(self.device)
        if bool(augment.any()):
            idx = torch.nonzero(augment).flatten().to(self.device)
            z_hat = latent_augment(z[idx], t[idx.cpu()], noise[idx], denoiser=self.frozen.denoiser,
                                   sigmas=self.frozen.sigmas, context=self.frozen.context,
                                   latent_in=self.frozen.latent_in, latent_out=self.frozen.latent_out)
            z = z.clone()
            z[idx] = z_hat.float().to(self.device)
        return z

    def _decode(self, model: nn.Module, z, images, masks) -> tuple[torch.Tensor, torch.Tensor]:
        target = image_to_model(images).to(self.device)
        mask = masks[:, None].to(self.device).round()
        with self._autocast():
            decoded = model(z, target, mask)   # known pixels: the original, unjittered image
        return decoded.float(), target

    def _perceptual(self):
        return self.perceptual.distance if self.perceptual is not None else None

    # ---------------------------------------------------------------------- checks

    @torch.no_grad()
    def preflight(self) -> None:
        """One forward pass on a held-out image before any training: the latent shape and
        (with latent augmentation) the UNet turn wiring problems into clear errors."""
        cfg = self.config
        self._prepare()
        image, mask = self.val_set.sample(0)[None], self.val_masks(0)[None]
        z = self.frozen.encode(image).float()
        lat = cfg.resolution // 8
        if tuple(z.shape[1:]) != (4, lat, lat):
            raise CheckpointError(
                f"The VAE gives latents {list(z.shape)} for a {cfg.resolution} px image; an SD1.5 VAE gives "
                f"[B,4,{lat},{lat}]. Use the SD1.5 VAE (the inpainting checkpoint's own).")
        if cfg.latent_aug_prob > 0:
            try:
                out = self.corrupted_latents(image, [draw_jitter(np.random.default_rng(0), (0, 0, 0, 0))],
                                             torch.ones(1, dtype=torch.bool), torch.Generator().manual_seed(0))
            except (InputError, CheckpointError):
                raise
            except Exception as e:
                raise CheckpointError(
                    f"The inpainting model failed on a test batch ({type(e).__name__}: {e}). The latent "
                    "augmentation needs an SD1.5 inpainting UNet (9 input channels, 768-wide cross-attention).") from e
            if not torch.isfinite(out).all():
                raise CheckpointError("The inpainting model gives non-finite output on a test batch; "
                                      "try precision fp32 or another checkpoint.")

    # ---------------------------------------------------------------------- training

    def gan_active(self, step: int | None = None) -> bool:
        cfg = self.config
        return cfg.disc_factor > 0 and (self.step if step is None else step) >= cfg.disc_start

    def train_step(self) -> float:
        cfg = self.config
        lr = learning_rate(self.step, cfg.lr, warmup=cfg.warmup, total=cfg.steps, final=cfg.lr_final)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group["lr_scale"]
        for group in self.disc_optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        self.disc_optimizer.zero_grad(set_to_none=True)
        self._prepare()
        gan = self.gan_active()
        total, d_total = 0.0, 0.0
        last_layer = self.decoder.conv_out.weight
        for micro in range(cfg.grad_accum):
            mb = self._micro_batch(self.step, micro)
            z = self.corrupted_latents(mb["images"], mb["jitters"], mb["augment"], mb["gen"])
            with distributed.no_sync(self.model, skip=micro < cfg.grad_accum - 1):
                decoded, target = self._decode(self.model, z, mb["images"], mb["masks"])
                nll, _ = reconstruction_nll(decoded, target, self.logvar, l1_weight=cfg.l1_weight,
                                            lpips_weight=cfg.lpips_weight, perceptual=self._perceptual())
                loss = nll
                if gan:
                    self.disc.requires_grad_(False)
                    with self._autocast():
                        g_loss = -self.disc_model(decoded).float().mean()
                    weight = adaptive_weight(nll, g_loss, last_layer, disc_weight=cfg.disc_weight,
                                             reduce=self._global_mean)
                    loss = nll + weight * cfg.disc_factor * g_loss
                    self.disc.requires_grad_(True)
                if not torch.isfinite(loss):
                    raise TrainingDivergedError(
                        f"The loss became {loss.item()} at step {self.step}: lower the learning rate ({cfg.lr}) "
                        "and resume from the last saved state.")
                scaled = loss / cfg.grad_accum
                (self.scaler.scale(scaled) if self.scaler else scaled).backward()
            total += float(loss.detach()) / cfg.grad_accum
            if gan:
                with self._autocast():
                    d_loss = cfg.disc_factor * hinge_d_loss(self.disc_model(target).float(),
                                                            self.disc_model(decoded.detach()).float())
                d_scaled = d_loss / cfg.grad_accum
                (self.disc_scaler.scale(d_scaled) if self.disc_scaler else d_scaled).backward()
                d_total += float(d_loss.detach()) / cfg.grad_accum
        self._average_side_gradients(disc=gan)
        self._optimiser_step(self.optimizer, self.scaler, [p for g in self.optimizer.param_groups for p in g["params"]])
        if gan:
            self._optimiser_step(self.disc_optimizer, self.disc_scaler, list(self.disc.parameters()))
            self.history["d"].append((self.step, distributed.mean_over_ranks(d_total, self.dist)))
        if self.dist.is_main:
            self.ema.update(self.decoder)
        total = distributed.mean_over_ranks(total, self.dist)
        self.history["train"].append((self.step, total))
        self.step += 1
        return total

    def _optimiser_step(self, optimizer, scaler, params) -> None:
        if scaler:
            scaler.unscale_(optimizer)
        if self.config.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, self.config.max_grad_norm)
        if scaler:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()

    def ema_decoder(self) -> MaskedDecoder:
        """A copy of the decoder holding the EMA weights (what is exported)."""
        if self._eval_decoder is None:
            self._eval_decoder = MaskedDecoder(self.decoder.config).to(self.device)
        self.ema.copy_to(self._eval_decoder)
        return self._eval_decoder.eval().requires_grad_(False)

    def _val_batch(self, i: int) -> dict:
        """Held-out image ``i`` with a fixed mask, a fixed jitter and, for every other
        image, a fixed latent augmentation: the same corruption at every evaluation."""
        cfg = self.config
        rng = np.random.default_rng([cfg.seed, 10_000_019, i])
        aug = cfg.latent_aug_prob > 0 and i % 2 == 0
        return {"images": self.val_set.sample(i)[None], "masks": self.val_masks(i)[None],
                "jitters": [draw_jitter(rng, cfg.jitter)], "augment": torch.tensor([aug]),
                "gen": torch.Generator().manual_seed(rng_seed(cfg.seed, 10_000_019, i))}

    @torch.no_grad()
    def validation_loss(self, decoder: MaskedDecoder | None = None) -> float:
        """Mean reconstruction loss (``l1_weight`` L1 + ``lpips_weight`` LPIPS, no
        log-variance) of the held-out images under fixed corruptions (``_val_batch``)."""
        decoder = decoder or self.ema_decoder()
        self._prepare()
        total = 0.0
        for i in range(len(self.val_set)):
            vb = self._val_batch(i)
            z = self.corrupted_latents(vb["images"], vb["jitters"], vb["augment"], vb["gen"])
            decoded, target = self._decode(decoder, z, vb["images"], vb["masks"])
            _, parts = reconstruction_nll(decoded, target, torch.zeros((), device=self.device),
                                          l1_weight=self.config.l1_weight, lpips_weight=self.config.lpips_weight,
                                          perceptual=self._perceptual())
            total += parts["rec"]
        return total / len(self.val_set)

    @torch.no_grad()
    def write_samples(self, name: str) -> Optional[str]:
        """Held-out images: the input with the hole in magenta, the current (EMA) decoder's
        output from the corrupted latent, the original."""
        if not self.dist.is_main:
            return None
        n = min(self.config.sample_count, len(self.val_set))
        decoder = self.ema_decoder()
        shown, results, originals = [], [], []
        for i in range(n):
            vb = self._val_batch(i)
            z = self.corrupted_latents(vb["images"], vb["jitters"], vb["augment"], vb["gen"])
            decoded, _ = self._decode(decoder, z, vb["images"], vb["masks"])
            keep = (1.0 - vb["masks"].round()).unsqueeze(-1)
            shown.append(vb["images"] * keep + (1 - keep) * torch.tensor([1.0, 0.0, 1.0]))
            results.append(model_to_image(decoded).cpu())
            originals.append(vb["images"])
        os.makedirs(os.path.join(self.out_dir, "samples"), exist_ok=True)
        path = os.path.join(self.out_dir, "samples", f"{name}.png")
        sample_grid_png(path, [torch.cat(shown), torch.cat(results), torch.cat(originals)])
        return path

    # ---------------------------------------------------------------------- files

    def save_state(self, path: str | None = None) -> Optional[str]:
        if not self.dist.is_main:
            return None
        path = path or self.state_path
        cpu = lambda sd: {k: v.detach().cpu().clone() for k, v in sd.items()}  # noqa: E731
        state = {
            "format": STATE_FORMAT, "version": STATE_VERSION, "step": self.step,
            "config": json.dumps(asdict(self.config)),
            "decoder": cpu(self.decoder.state_dict()),
            "decoder_config": json.dumps(asdict(self.decoder.config)),
            "ema": self.ema.state_dict(),
            "disc": cpu(self.disc.state_dict()),
            "logvar": self.logvar.detach().cpu().clone(),
            "optimizer": self.optimizer.state_dict(),
            "disc_optimizer": self.disc_optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler else None,
            "disc_scaler": self.disc_scaler.state_dict() if self.disc_scaler else None,
            "history": json.dumps(self.history),
            "world_size": self.dist.world_size,
        }
        write_state(path, state)
        self._last_saved = self.step
        return path

    def resume(self, path: str | None = None) -> None:
        """Restore a state written by ``save_state`` (``torch.load(weights_only=True)``:
        no code from the file runs)."""
        state = read_state(path or self.state_path, STATE_FORMAT, "decoder")
        refuse_changes(resume_changes(state, self.config, _RESUME_FIXED, self.global_batch, self.dist.world_size))
        if json.loads(state["decoder_config"]) != json.loads(json.dumps(asdict(self.decoder.config))):
            raise InputError("The start decoder has another architecture than the run being resumed; resume with "
                             "the same start decoder.")
        self.decoder.load_state_dict(state["decoder"])
        self.ema.load_state_dict(state["ema"])
        self.disc.load_state_dict(state["disc"])
        with torch.no_grad():
            self.logvar.copy_(state["logvar"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.disc_optimizer.load_state_dict(state["disc_optimizer"])
        if self.scaler and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        if self.disc_scaler and state.get("disc_scaler"):
            self.disc_scaler.load_state_dict(state["disc_scaler"])
        self.step = int(state["step"])
        if int(state.get("version", 1)) < 2:
            self._say(OLDER_DRAWS_NOTE)
        self.history = {k: [tuple(x) for x in v] for k, v in json.loads(state["history"]).items()}
        self._last_saved = self.step

    def export(self, path: str | None = None) -> Optional[str]:
        """Write the EMA weights as an Asymmetric VQGAN decoder file (.safetensors, the
        original ldm layout: ``decoder.*`` with the condition branch as
        ``decoder.encoder.layers.N``, ``post_quant_conv.*``) that ASUKA_DecoderLoader loads
        as it is."""
        if not self.dist.is_main:
            return None
        path = path or self.export_path
        meta = {"asuka.decoder.family": "avq", "asuka.decoder.latent": "sd15",
                "asuka.training.steps": str(self.step),
                "asuka.training.images": str(len(self.train_set)),
                "asuka.training.resolution": str(self.config.resolution),
                "asuka.training.lr": repr(self.config.lr),
                "asuka.training.latent_aug_prob": repr(self.config.latent_aug_prob),
                "asuka.training.jitter": json.dumps(list(self.config.jitter)),
                **{k: str(v) for k, v in self.metadata.items()}}
        if self.history["val"]:
            meta["asuka.training.val_loss"] = f"{self.history['val'][-1][1]:.6g}"
        tensors = ldm_state_dict({k: v.detach().cpu().contiguous() for k, v in self.ema.shadow.items()})
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = path + ".tmp.safetensors"
        ckpt_mod.save_safetensors(tensors, tmp, metadata=meta)
        os.replace(tmp, path)
        return path

    def write_curve(self) -> Optional[str]:
        if not self.dist.is_main:
            return None
        path = os.path.join(self.out_dir, "loss.png")
        loss_curve_png(path, self.history["train"], self.history["val"])
        return path

    # ---------------------------------------------------------------------- run

    result_key = "decoder"

    def _log_record(self, step: int, loss: float, rate: float) -> dict:
        gan = self.gan_active(step - 1)
        return {"step": step, "loss": loss, "d_loss": self.history["d"][-1][1] if gan else None,
                "logvar": float(self.logvar.detach()), "lr": self.optimizer.param_groups[-1]["lr"], "s_per_step": rate}

    def _log_line(self, step: int, loss: float, rate: float) -> str:
        return (f"step {step}/{self.config.steps} loss {loss:.5f}"
                + (f" d {self.history['d'][-1][1]:.4f}" if self.gan_active(step - 1) else "")
                + f" lr {self.optimizer.param_groups[-1]['lr']:.3g} ({rate:.2f} s/step)")

    def _final_samples(self):
        return self.write_samples(f"step_{self.step:06d}") if self.config.sample_count > 0 else None

    def _validate(self) -> float:
        v = self.validation_loss()
        self.history["val"].append((self.step, v))
        self._say(f"step {self.step}: held-out reconstruction loss {v:.5f} ({len(self.val_set)} images)")
        return v


__all__ = ["DecoderFrozen", "DecoderTrainConfig", "DecoderTrainer", "FROM_VAE", "check_sd15_decoder",
           "decoder_from_vae", "is_main", "ldm_state_dict", "start_decoder"]
