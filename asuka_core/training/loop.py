"""The aligner training loop (pure PyTorch).

The frozen models come in as callables (see :class:`FrozenModels`), so the same loop
runs behind ComfyUI's loaders (``nodes/training_glue.py``), in a script, or on tiny test
models. One optimiser step:

1. a batch of training crops, one generated mask each (``asuka_core.masks``), the
   masked image (hole pixels grey, as ComfyUI's InpaintModelConditioning makes it);
2. the MAE prior of each image, computed from the visible pixels, or with probability
   p (``schedule.substitution_probability``) from the whole image (the paper's
   "reconstruction prior");
3. ``z0 = latent_in(encode(image))``, a timestep ``t`` uniform over the model's discrete
   steps, ``sigma = sigmas[t]``, ``x = z0 + sigma * eps``;
4. ``eps_hat = denoiser(x, sigma, aligner(prior), encode(masked image), mask)`` and the
   standard epsilon loss ``mean((eps_hat - eps)^2)`` (``x / sqrt(sigma^2 + 1)`` is the DDPM
   ``sqrt(abar) z0 + sqrt(1 - abar) eps``, so this is the loss SD1.5 was trained with);
5. backward into the aligner only, gradient accumulation, clipping, AdamW, EMA.

All randomness of step ``s`` is drawn from generators seeded with ``(seed, s)`` (per
sample: ``data.BatchMaker``), so a run resumed from a saved state continues exactly as if
it had never stopped, and the batches can be made ahead in DataLoader workers
(``TrainConfig.workers``) without changing them. Under ``torchrun`` each process trains
its shard of every global batch and DistributedDataParallel averages the gradients
(``distributed.py``); rank 0 validates, writes samples and saves.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..aligner import MAE_WIDTH, TARGET_FLUX_CLIP, TARGET_SD15, TARGET_WIDTHS, Aligner, load_aligner, save_aligner
from ..errors import CheckpointError, InputError, TrainingDivergedError
from ..mae import preprocess
from ..runtime import Progress
from . import distributed
from .data import BatchMaker, BatchStream, ImageSet, rng_seed
from .ema import EMA
from .plot import loss_curve_png, sample_grid_png
from .schedule import learning_rate
from .trainer_base import OLDER_DRAWS_NOTE, TrainerBase, _norm, read_state, refuse_changes, resume_changes, write_state

STATE_FORMAT = "asuka-aligner-training"
STATE_VERSION = 2   # 2: per-sample random draws (data.BatchMaker), world size stored
PRECISIONS = ("fp32", "bf16", "fp16")
# Settings that decide which images, masks, noise and timesteps a step sees: a resumed
# run must keep them, or it would not continue the same run.
# The batch size is checked as the global batch (batch size x processes), so a run can be
# resumed on another number of GPUs with the same global batch.
_RESUME_FIXED = ("grad_accum", "seed", "resolution", "holdout_seed", "hole_ratio",
                 "p_start", "p_end", "p_steps")

Encode = Callable[[torch.Tensor], torch.Tensor]
"""IMAGE ``[B, H, W, 3]`` 0..1 -> raw VAE latent ``[B, 4, H/8, W/8]`` (no grad needed)."""
Denoiser = Callable[..., torch.Tensor]
"""``denoiser(x, sigma, context, masked_latent, mask) -> eps_hat``: ``x`` ``[B,4,h,w]`` in
the model's latent space, ``sigma`` ``[B]``, ``context`` ``[B, 256, 768]`` (gradients must
flow back through it), ``masked_latent`` the raw latent of the masked image, ``mask``
``[B, H, W]`` 1 = hole."""


@dataclass
class FrozenModels:
    """What the loop needs from the frozen side."""

    prior: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    """``prior(image, mask) -> [B, 256, 512]`` MAE features (``mae_prior(mae)``); mask 1 = hole."""
    encode: Encode
    denoiser: Denoiser
    sigmas: torch.Tensor                # [T] the denoiser's discrete sigmas, ascending in t
    latent_in: Callable[[torch.Tensor], torch.Tensor] = lambda z: z   # raw latent -> model space
    sampler: Optional[Callable[..., torch.Tensor]] = None
    """Optional ``sampler(context, image, mask, seed) -> IMAGE``: the inpainting graph's
    result with these aligner tokens (for the sample images)."""
    latent_channels: int = 4
    prepare: Optional[Callable[[], None]] = None
    """Called before each step and evaluation (e.g. to have ComfyUI put the frozen
    models back on the GPU if something else was loaded meanwhile)."""


@dataclass
class TrainConfig:
    steps: int = 20000
    batch_size: int = 4
    grad_accum: int = 1
    lr: float = 1e-4
    warmup: int = 500
    lr_final: float = 1.0               # 1 = constant after warm-up; < 1 = cosine to lr * lr_final
    weight_decay: float = 0.01
    betas: tuple = (0.9, 0.999)
    max_grad_norm: float = 1.0          # 0 = no clipping
    ema_decay: float = 0.999
    p_start: float = 1.0
    p_end: float = 0.1
    p_steps: int = 2000
    resolution: int = 512
    hole_ratio: tuple = (0.1, 0.75)
    seed: int = 0
    holdout_seed: int = 0
    precision: str = "bf16"
    val_every: int = 500
    val_timesteps: int = 4              # timesteps per held-out image, evenly spread
    save_every: int = 1000
    sample_every: int = 1000
    sample_count: int = 4
    log_every: int = 10
    workers: int = 0                    # DataLoader worker processes making batches ahead (0: in the loop)
    prefetch: int = 2                   # batches each worker keeps ready

    def check(self) -> None:
        problems = []
        for name in ("steps", "batch_size", "grad_accum"):
            if int(getattr(self, name)) < 1:
                problems.append(f"{name} must be at least 1 (got {getattr(self, name)})")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            problems.append(f"lr must be a positive number (got {self.lr})")
        for name in ("workers", "prefetch"):
            if int(getattr(self, name)) < 0:
                problems.append(f"{name} must be at least 0 (got {getattr(self, name)})")
        if self.precision not in PRECISIONS:
            problems.append(f"precision must be one of {', '.join(PRECISIONS)} (got {self.precision!r})")
        if not 0.0 <= self.ema_decay < 1.0:
            problems.append(f"ema_decay must be in [0, 1) (got {self.ema_decay})")
        for name in ("p_start", "p_end"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                problems.append(f"{name} must be in [0, 1] (got {getattr(self, name)})")
        if self.resolution < 64 or self.resolution % 64:
            problems.append(f"resolution must be a multiple of 64 (got {self.resolution})")
        if problems:
            raise InputError("Training settings: " + "; ".join(problems) + ".")


def new_aligner(seed: int = 0, *, width: int = TARGET_WIDTHS[TARGET_SD15], depth: int = 4) -> Aligner:
    """A freshly initialised SD1.5 aligner (the released layout: Linear 512 -> 768, four
    single-stream blocks, LayerNorm), float32 on the CPU. Linear layers get PyTorch's
    default initialisation, the q/k norm scales 1, the final LayerNorm (1, 0)."""
    model = Aligner(width, depth, TARGET_SD15)
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        for m in model.modules():
            if isinstance(m, (nn.Linear, nn.LayerNorm)):
                m.reset_parameters()
        for name, p in model.named_parameters():
            if name.endswith(".scale"):
                with torch.no_grad():
                    p.fill_(1.0)
    finally:
        torch.random.set_rng_state(gen_state)
    return model.train()


def warm_start_aligner(source) -> Aligner:
    """The aligner to start training from: an SD1.5 aligner file as it is, or the released
    FLUX CLIP-branch aligner (``asuka_alignment_clip.pt``) re-labelled as SD1.5. The two
    have the same layout (768 wide, four blocks; the CLIP file's unused modulation tensors
    are dropped) and the CLIP branch was trained towards CLIP-L's final-layer-normed space,
    the space SD1.5 cross-attends to. Whether starting there helps a real run is untested.
    float32, CPU, in training mode."""
    aligner = load_aligner(source, dtype=torch.float32)
    if aligner.target == TARGET_FLUX_CLIP:
        sd15 = Aligner(aligner.width, aligner.depth, TARGET_SD15)
        sd15.load_state_dict(aligner.state_dict())
        aligner = sd15
    aligner.expect_target(TARGET_SD15, TARGET_FLUX_CLIP, where="Training --init")
    return aligner.float().train()


def mae_prior(mae: nn.Module) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The frozen MAE (``asuka_core.mae.MAE``) as a prior function: the official
    preprocessing (256x256 squash, hole pixels blanked) and the features after decoder
    block 6, computed wherever the MAE currently is."""
    @torch.no_grad()
    def prior(images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        dev = next(mae.parameters()).device
        pixels, mask256 = preprocess(images.to(dev), masks.to(dev))
        return mae.features_prepared(pixels, mask256)

    return prior


def masked_image(image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Hole pixels (mask rounded to 1) set to 0.5 grey, as InpaintModelConditioning does."""
    keep = (1.0 - mask.round()).unsqueeze(-1)
    return (image - 0.5) * keep + 0.5


class AlignerTrainer(TrainerBase):
    """Trains an SD1.5 aligner. ``run()`` trains to ``config.steps``; ``resume(path)``
    first restores a state written by ``save_state``."""

    def __init__(self, config: TrainConfig, models: FrozenModels, train_set: ImageSet, val_set: ImageSet, *,
                 out_dir: str, device: torch.device | str = "cpu", aligner: Aligner | None = None,
                 object_masks=None, progress: Progress = None, log: Callable[[str], None] = print,
                 export_name: str = "asuka_sd15_aligner.safetensors", metadata: dict | None = None,
                 dist: distributed.DistInfo | None = None):
        config.check()
        if len(train_set) == 0 or len(val_set) == 0:
            raise InputError("Training needs at least one training and one held-out image.")
        self._init_common(config, train_set, val_set, device=device, dist=dist, out_dir=out_dir, progress=progress,
                          log=log, export_name=export_name, metadata=metadata)
        self.models = models
        self.aligner = (aligner if aligner is not None else new_aligner(config.seed)).to(self.device).float()
        self.aligner.requires_grad_(True).train()
        if self.aligner.target != TARGET_SD15:
            raise CheckpointError(f"Can only train an SD1.5 aligner (target sd15); got {self.aligner}.")
        res = config.resolution
        self._make_masks(object_masks)
        self.batches = BatchMaker(train_set, self.masks, config.batch_size, config.grad_accum, config.seed,
                                  len(models.sigmas), (models.latent_channels, res // 8, res // 8),
                                  config.p_start, config.p_end, config.p_steps, self.dist)
        self.stream = BatchStream(self.batches, config.workers, config.prefetch)
        decay, no_decay = [], []
        for name, p in self.aligner.named_parameters():
            (decay if p.ndim >= 2 else no_decay).append(p)
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=config.lr, betas=tuple(config.betas))
        self.ema = EMA(self.aligner, config.ema_decay)
        self.scaler = torch.amp.GradScaler(self.device.type) if config.precision == "fp16" else None
        self.step = 0
        self.history: dict[str, list] = {"train": [], "val": [], "p": []}
        self._last_saved = -1
        self._eval_aligner: Aligner | None = None
        self._ddp: nn.Module | None = None
        self._val_inputs: list | None = None
        self.timings: dict[str, float] | None = None
        """Set to a dict to collect seconds per phase of ``train_step`` ("data": waiting
        for the batch, "backward", "optimizer"; forward passes are timed by the caller)."""

    # ---------------------------------------------------------------------- batches

    @torch.no_grad()
    def _prior(self, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        return self.models.prior(images, masks).float().to(self.device)

    @torch.no_grad()
    def _latents(self, images: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        both = self.models.encode(torch.cat([images, masked_image(images, masks)]))
        z0_raw, masked = both.float().to(self.device).chunk(2)
        return self.models.latent_in(z0_raw).float(), masked

    def _prepare(self) -> None:
        if self.models.prepare is not None:
            self.models.prepare()

    def _micro_batch(self, step: int, micro: int) -> dict:
        """This process's share of micro-batch ``micro`` of ``step`` (``data.BatchMaker``)."""
        return self.stream.get(step * self.config.grad_accum + micro)

    def _timed(self, name: str):
        if self.timings is None:
            return contextlib.nullcontext()
        return _Clock(self.timings, name, self.device)

    @property
    def trained_module(self) -> nn.Module:
        """The aligner as trained: in DistributedDataParallel under torchrun."""
        if self._ddp is None:
            self._ddp = distributed.wrap(self.aligner, self.dist)
        return self._ddp

    def _inputs(self, images, masks, prior_masks):
        """What the frozen models give for a batch: prior features, z0, masked-image latent."""
        features = self._prior(images, prior_masks)
        z0, masked = self._latents(images, masks)
        return features, z0, masked

    def _loss_from(self, aligner: Aligner, inputs, masks, t, noise):
        features, z0, masked = inputs
        noise = noise.to(self.device)
        sigma = self.models.sigmas.to(self.device, torch.float32)[t.to(self.device)]
        x = z0 + sigma.view(-1, 1, 1, 1) * noise
        with self._autocast():
            context = aligner(features)
            eps_hat = self.models.denoiser(x, sigma, context, masked, masks.to(self.device))
        return F.mse_loss(eps_hat.float(), noise)

    def _loss(self, aligner: Aligner, images, masks, prior_masks, t, noise_gen=None, noise=None):
        inputs = self._inputs(images, masks, prior_masks)
        if noise is None:
            noise = torch.randn(inputs[1].shape, generator=noise_gen)
        return self._loss_from(aligner, inputs, masks, t, noise)

    # ---------------------------------------------------------------------- checks

    def preflight(self) -> None:
        """One tiny forward pass (no update) that turns wiring problems into clear errors
        before any training: latent shape, denoiser output, MAE feature width."""
        cfg = self.config
        self._prepare()
        image = self.val_set.sample(0)[None]
        mask = self.val_masks(0)[None]
        feats = self._prior(image, mask)
        if tuple(feats.shape[1:]) != (256, MAE_WIDTH):
            raise CheckpointError(f"The MAE gives features {list(feats.shape)}; the aligner needs [B,256,{MAE_WIDTH}].")
        z0, masked = self._latents(image, mask)
        lat = cfg.resolution // 8
        if tuple(z0.shape[1:]) != (self.models.latent_channels, lat, lat):
            raise CheckpointError(
                f"The VAE gives latents {list(z0.shape)} for a {cfg.resolution} px image; an SD1.5 VAE gives "
                f"[B,4,{lat},{lat}]. Use the VAE of the SD1.5 inpainting checkpoint.")
        try:
            with torch.no_grad():
                out = self._loss(self.aligner, image, mask, mask, torch.zeros(1, dtype=torch.long),
                                 noise=torch.zeros_like(z0))
        except RuntimeError as e:
            # Only a shape mismatch between the aligner's tokens and the UNet is the user's
            # files; anything else is raised as it is.
            if not any(w in str(e) for w in ("shape", "size of tensor", "mat1 and mat2")):
                raise
            raise CheckpointError(
                f"The inpainting model failed on a test batch ({type(e).__name__}: {e}). It must be an SD1.5 "
                "inpainting UNet (9 input channels, 768-wide cross-attention).") from e
        if not torch.isfinite(out):
            raise CheckpointError("The inpainting model gives non-finite output on a test batch; "
                                  "try precision fp32 or another checkpoint.")

    # ---------------------------------------------------------------------- training

    def train_step(self) -> float:
        cfg = self.config
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate(self.step, cfg.lr, warmup=cfg.warmup, total=cfg.steps, final=cfg.lr_final)
        self.optimizer.zero_grad(set_to_none=True)
        self._prepare()
        total, p = 0.0, 0.0
        module = self.trained_module
        for micro in range(cfg.grad_accum):
            with self._timed("data"):
                mb = self._micro_batch(self.step, micro)
            p = mb["p"]
            prior_masks = torch.where(mb["substitute"][:, None, None], torch.zeros_like(mb["masks"]), mb["masks"])
            last = micro == cfg.grad_accum - 1
            with distributed.no_sync(module, skip=not last):
                loss = self._loss(module, mb["images"], mb["masks"], prior_masks, mb["t"], noise=mb["noise"])
                if not torch.isfinite(loss):
                    raise TrainingDivergedError(
                        f"The loss became {loss.item()} at step {self.step}: the learning rate ({cfg.lr}) is "
                        "probably too high. Resume from the last saved state with a lower one.")
                scaled = loss / cfg.grad_accum
                with self._timed("backward"):
                    (self.scaler.scale(scaled) if self.scaler else scaled).backward()
            total += float(loss.detach()) / cfg.grad_accum
        with self._timed("optimizer"):
            if self.scaler:
                self.scaler.unscale_(self.optimizer)
            if cfg.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(self.aligner.parameters(), cfg.max_grad_norm)
            if self.scaler:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
            if self.dist.is_main:
                self.ema.update(self.aligner)
        total = distributed.mean_over_ranks(total, self.dist)
        self.history["train"].append((self.step, total))
        self.history["p"].append((self.step, p))
        self.step += 1
        return total

    def ema_aligner(self) -> Aligner:
        """A copy of the aligner holding the EMA weights (what is exported)."""
        if self._eval_aligner is None:
            self._eval_aligner = new_aligner(0, width=self.aligner.width, depth=self.aligner.depth).to(self.device)
        self.ema.copy_to(self._eval_aligner)
        return self._eval_aligner.eval()

    @torch.no_grad()
    def validation_loss(self, aligner: Aligner | None = None) -> float:
        """Mean epsilon loss over the held-out images, each with a fixed mask, fixed
        noise and ``val_timesteps`` evenly spread timesteps, with the real (masked) prior.
        The same numbers every time: comparable across the run."""
        aligner = aligner or self.ema_aligner()
        self._prepare()
        cfg, n_t = self.config, max(1, self.config.val_timesteps)
        steps = len(self.models.sigmas)
        total, count = 0.0, 0
        if self._val_inputs is None:
            # Fixed images and masks through frozen models: computed once for the whole run.
            self._val_inputs = []
            for i in range(len(self.val_set)):
                image, mask = self.val_set.sample(i)[None], self.val_masks(i)[None]
                self._val_inputs.append((self._inputs(image, mask, mask), mask))
        for i, (inputs, mask) in enumerate(self._val_inputs):
            gen = torch.Generator().manual_seed(rng_seed(cfg.seed, 10_000_019, i))
            for k in range(n_t):
                t = torch.tensor([int((k + 0.5) * steps / n_t)])
                noise = torch.randn(inputs[1].shape, generator=gen)
                total += float(self._loss_from(aligner, inputs, mask, t, noise))
                count += 1
        return total / count

    def write_samples(self, name: str) -> Optional[str]:
        if self.models.sampler is None:
            return None
        n = min(self.config.sample_count, len(self.val_set))
        images = self.val_set.batch(range(n))
        masks = self.val_masks.batch(range(n))
        with torch.no_grad():
            context = self.ema_aligner()(self._prior(images, masks))
            result = self.models.sampler(context, images, masks, self.config.seed)
        keep = (1.0 - masks.round()).unsqueeze(-1)
        shown = images * keep + (1 - keep) * torch.tensor([1.0, 0.0, 1.0])  # hole in magenta
        os.makedirs(os.path.join(self.out_dir, "samples"), exist_ok=True)
        path = os.path.join(self.out_dir, "samples", f"{name}.png")
        sample_grid_png(path, [shown, result.float().cpu(), images])
        return path

    # ---------------------------------------------------------------------- files

    def save_state(self, path: str | None = None) -> str:
        path = path or self.state_path
        state = {
            "format": STATE_FORMAT, "version": STATE_VERSION, "step": self.step,
            "config": json.dumps(asdict(self.config)),
            "aligner": {k: v.detach().cpu().clone() for k, v in self.aligner.state_dict().items()},
            "ema": self.ema.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler else None,
            "history": json.dumps(self.history),
            "world_size": self.dist.world_size,
            "prescaled": bool(self.train_set.cache_dir),
        }
        write_state(path, state)
        self._last_saved = self.step
        return path

    def resume(self, path: str | None = None) -> None:
        """Restore a state written by ``save_state`` (loaded with ``weights_only=True``:
        no code from the file runs)."""
        state = read_state(path or self.state_path, STATE_FORMAT, "aligner")
        changed = resume_changes(state, self.config, _RESUME_FIXED, self.batches.global_batch, self.dist.world_size)
        if bool(state.get("prescaled", False)) != bool(self.train_set.cache_dir):
            changed.append(f"pre-scaled image cache {'on' if state.get('prescaled') else 'off'} -> "
                           f"{'on' if self.train_set.cache_dir else 'off'}")
        refuse_changes(changed)
        self.aligner.load_state_dict(state["aligner"])
        self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
        if int(state.get("version", 1)) < 2:
            self.log(OLDER_DRAWS_NOTE)
        self.history = {k: [tuple(x) for x in v] for k, v in json.loads(state["history"]).items()}
        self._last_saved = self.step

    def export(self, path: str | None = None) -> str:
        """Write the EMA weights as an SD1.5 aligner (.safetensors, ``asuka.target = sd15``)
        that ASUKA_AlignerLoader loads as it is."""
        path = path or self.export_path
        meta = {"asuka.training.steps": str(self.step),
                "asuka.training.images": str(len(self.train_set)),
                "asuka.training.resolution": str(self.config.resolution),
                "asuka.training.lr": repr(self.config.lr),
                **{k: str(v) for k, v in self.metadata.items()}}
        if self.history["val"]:
            meta["asuka.training.val_loss"] = f"{self.history['val'][-1][1]:.6g}"
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.ema.shadow.items()}
        tmp = path + ".tmp.safetensors"
        save_aligner(tensors, tmp, target=TARGET_SD15, metadata=meta)
        os.replace(tmp, path)
        return path

    def write_curve(self) -> str:
        path = os.path.join(self.out_dir, "loss.png")
        loss_curve_png(path, self.history["train"], self.history["val"])
        return path

    # ---------------------------------------------------------------------- run

    result_key = "aligner"

    def _log_record(self, step: int, loss: float, rate: float) -> dict:
        return {"step": step, "loss": loss, "p": self.history["p"][-1][1],
                "lr": self.optimizer.param_groups[0]["lr"], "s_per_step": rate}

    def _log_line(self, step: int, loss: float, rate: float) -> str:
        return (f"step {step}/{self.config.steps} loss {loss:.5f} p {self.history['p'][-1][1]:.2f} "
                f"lr {self.optimizer.param_groups[0]['lr']:.3g} ({rate:.2f} s/step)")

    def _close(self) -> None:
        self.stream.close()

    def _validate(self) -> float:
        v = self.validation_loss()
        self.history["val"].append((self.step, v))
        self.log(f"step {self.step}: held-out loss {v:.5f} ({len(self.val_set)} images)")
        return v


class _Clock:
    """Adds the seconds spent in a ``with`` block to ``timings[name]`` (CUDA synchronised)."""

    def __init__(self, timings: dict, name: str, device: torch.device):
        self.timings, self.name, self.cuda = timings, name, device.type == "cuda"

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
        self.t0 = time.perf_counter()

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
        self.timings[self.name] = self.timings.get(self.name, 0.0) + time.perf_counter() - self.t0
