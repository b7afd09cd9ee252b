"""Errors a user can act on.

Every message says what went wrong *and* what to do about it, because it ends up in
ComfyUI's error dialog in front of someone who wired a graph by hand.
"""

from __future__ import annotations


class AsukaError(ValueError):
    """Base class: a problem with the user's files or inputs, never a bug in the pack."""


class CheckpointError(AsukaError):
    """A model file is missing, unsafe, corrupt, or not the kind of model that was asked for."""


class InputError(AsukaError):
    """Tensors given to a model have the wrong shape, size, batch, range or content."""
