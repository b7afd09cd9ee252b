"""Errors a user can act on.

Every message says what went wrong *and* what to do about it, because it ends up in
ComfyUI's error dialog in front of someone who wired a graph by hand.
"""

from __future__ import annotations

import math


class AsukaError(ValueError):
    """Base class: a problem with the user's files, inputs or settings, that the message says how to
    fix; never a bug in the pack."""


class CheckpointError(AsukaError):
    """A model file is missing, unsafe, corrupt, or not the kind of model that was asked for."""


class InputError(AsukaError):
    """Tensors given to a model have the wrong shape, size, batch, range or content."""


def finite_number(name: str, value, *, minimum: float | None = None) -> float:
    """``value`` as a float, or an :class:`InputError` naming ``name`` when it is not a
    finite number (or is below ``minimum``)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{name} must be a number, got {value!r}.") from None
    if not math.isfinite(number) or (minimum is not None and number < minimum):
        bound = f" >= {minimum:g}" if minimum is not None else ""
        raise InputError(f"{name} must be a finite number{bound}, got {number}.")
    return number



class ModelStateError(AsukaError):
    """A model is loaded or patched in a way the node cannot work with (for example weights
    that the host streams on demand); the message names the setting to change."""


class GradientError(AsukaError):
    """A pass that needs gradients got none: something on the model runs without autograd."""


class TrainingDivergedError(AsukaError, FloatingPointError):
    """The training loss stopped being a finite number (usually: the learning rate is too high)."""
