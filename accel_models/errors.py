"""Errors raised for bad input: a config, a checkpoint or a model the zoo does not support.

Each is a ``ValueError`` (the input is wrong, not the program) whose message says what is wrong and what
to do about it.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A config.json (or generation_config.json) is malformed, incomplete or inconsistent."""


class CheckpointError(ValueError):
    """A checkpoint cannot be loaded: missing, unexpected, mis-shaped or unreadable tensors, pickle formats."""


class UnsupportedModelError(ConfigError):
    """The checkpoint's architecture has no implementation in the zoo (a ``ConfigError``, so a caller that
    catches bad configs catches this too)."""


__all__ = ["CheckpointError", "ConfigError", "UnsupportedModelError"]
