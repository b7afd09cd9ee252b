"""What the aligner and the masked-decoder trainers share: the run folder's files, the
training state's save / load / resume checks, and the run loop (train to ``config.steps``;
log, validate, sample and save on rank 0 as configured; save the state when interrupted).

A trainer subclasses :class:`TrainerBase` and provides ``config``, ``dist``, ``out_dir``,
``export_name``, ``progress``, ``log``, ``history``, ``step``, ``_last_saved``,
``preflight()``, ``train_step()``, ``save_state()``, ``export()``, ``write_samples(name)``,
``write_curve()``, ``_validate()`` and the hooks ``_log_record`` / ``_log_line``.
"""

from __future__ import annotations

import json
import os
import time

import torch

from ..errors import CheckpointError, InputError
from ..masks import MaskGenerator
from ..runtime import report
from . import distributed


def _norm(v):
    return list(v) if isinstance(v, (list, tuple)) else v


def write_state(path: str, state: dict) -> str:
    """``torch.save`` to ``path`` through a temporary file (never a half-written state)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)
    return path


def read_state(path: str, fmt: str, what: str) -> dict:
    """A state written by ``write_state`` with ``format == fmt``, loaded with
    ``weights_only=True`` (no code from the file runs)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise InputError(f"No training state at '{path}' to resume from.") from None
    except Exception as e:
        raise CheckpointError(f"Could not read the training state '{path}': {e}") from None
    if not isinstance(state, dict) or state.get("format") != fmt:
        raise CheckpointError(f"'{path}' is not an ASUKA {what} training state.")
    return state


def resume_changes(state: dict, config, fixed, global_batch: int, world_size: int) -> list[str]:
    """The settings in ``fixed`` that differ from the saved run's, and the global batch
    (batch size x processes) if it differs: a run resumes on another number of processes
    as long as the global batch stays the same."""
    saved = json.loads(state["config"])
    changed = [f"{k} {saved[k]} -> {getattr(config, k)}" for k in fixed
               if k in saved and _norm(saved[k]) != _norm(getattr(config, k))]
    world = int(state.get("world_size", 1))
    if "batch_size" in saved and saved["batch_size"] * world != global_batch:
        changed.append(f"global batch (batch_size x processes) {saved['batch_size']} x {world} -> "
                       f"{config.batch_size} x {world_size}")
    return changed


def refuse_changes(changed: list[str]) -> None:
    if changed:
        raise InputError(
            "These settings differ from the run being resumed, so it could not continue the same way: "
            + ", ".join(changed) + ". Use the original values (or start a new run in a new folder).")


OLDER_DRAWS_NOTE = ("note: this state was written by an older version, which drew its batches differently; "
                    "the run continues with the new draws (the weights and optimiser state are kept).")


class TrainerBase:
    """Files and run loop shared by the trainers (see the module docstring)."""

    result_key = "model"       # the exported file's key in ``run()``'s result

    def _init_common(self, config, train_set, val_set, *, device, dist, out_dir, progress, log, export_name,
                     metadata) -> None:
        self.config = config
        self.train_set, self.val_set = train_set, val_set
        self.device = torch.device(device)
        self.dist = dist if dist is not None else distributed.current(self.device)
        self.out_dir = out_dir
        self.progress = progress
        self.log = log
        self.export_name = export_name
        self.metadata = dict(metadata or {})

    def _make_masks(self, object_masks) -> None:
        """``masks`` for training (seed) and ``val_masks`` for the held-out images (seed + 1)."""
        cfg = self.config
        self.masks = MaskGenerator(cfg.resolution, seed=cfg.seed, hole_ratio=tuple(cfg.hole_ratio),
                                   object_masks=object_masks)
        self.val_masks = MaskGenerator(cfg.resolution, seed=cfg.seed + 1, hole_ratio=tuple(cfg.hole_ratio),
                                       object_masks=self.masks.object_masks or None)

    def _autocast(self):
        if self.config.precision == "fp32":
            return torch.autocast(self.device.type, enabled=False)
        dtype = torch.bfloat16 if self.config.precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    @property
    def state_path(self) -> str:
        return os.path.join(self.out_dir, "training_state.pt")

    @property
    def export_path(self) -> str:
        return os.path.join(self.out_dir, self.export_name)

    def _log_record(self, step: int, loss: float, rate: float) -> dict:
        raise NotImplementedError

    def _log_line(self, step: int, loss: float, rate: float) -> str:
        raise NotImplementedError

    def _close(self) -> None:
        """Release what the run holds (data workers)."""

    def _final_samples(self):
        return self.write_samples(f"step_{self.step:06d}")

    def run(self) -> dict:
        """Train from the current step to ``config.steps``; validate, save, sample and
        export as configured. Interrupted (Cancel, Ctrl-C, an error), it saves the
        state first so the run can be resumed."""
        cfg = self.config
        main = self.dist.is_main
        os.makedirs(self.out_dir, exist_ok=True)
        self.preflight()
        if main and not self.history["val"] and cfg.val_every > 0:
            self._validate()
        log_path = os.path.join(self.out_dir, "log.jsonl")
        t0, start = time.time(), self.step
        try:
            while self.step < cfg.steps:
                loss = self.train_step()
                s = self.step
                rate = (time.time() - t0) / max(1, s - start)
                report(self.progress, s, cfg.steps)
                if not main:   # rank 0 logs, validates, samples and saves; the others train on
                    continue
                with open(log_path, "a", encoding="utf-8") as f:
                    f.write(json.dumps(self._log_record(s, loss, rate)) + "\n")
                if cfg.log_every and (s % cfg.log_every == 0 or s == cfg.steps):
                    self.log(self._log_line(s, loss, rate))
                if cfg.val_every and s % cfg.val_every == 0 and s != cfg.steps:
                    self._validate()
                if cfg.sample_every and s % cfg.sample_every == 0 and s != cfg.steps:
                    self.write_samples(f"step_{s:06d}")
                if cfg.save_every and s % cfg.save_every == 0:
                    self.save_state()
                    self.export()
                    self.write_curve()
        except BaseException:
            self._close()
            if main and self.step > start and self._last_saved != self.step:
                self.save_state()
                self.log(f"stopped at step {self.step}; state saved to {self.state_path} (resume with it)")
            raise
        self._close()
        train_loss = self.history["train"][-1][1] if self.history["train"] else None
        if not main:
            distributed.barrier(self.dist)   # until rank 0 has written the results
            return {self.result_key: None, "state": None, "loss_curve": None, "samples": None, "steps": self.step,
                    "train_loss": train_loss, "val_loss": None, "seconds": time.time() - t0}
        if cfg.val_every:
            self._validate()
        self.save_state()
        export = self.export()
        samples = self._final_samples()
        curve = self.write_curve()
        distributed.barrier(self.dist)
        return {self.result_key: export, "state": self.state_path, "loss_curve": curve, "samples": samples,
                "steps": self.step, "train_loss": train_loss,
                "val_loss": self.history["val"][-1][1] if self.history["val"] else None,
                "seconds": time.time() - t0}
