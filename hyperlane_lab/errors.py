"""Exception types. Every message says what was wrong and how to fix it."""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "HyperlaneError",
    "InfeasiblePlanError",
    "ModelLoadError",
    "ProtocolError",
    "WorkerError",
]


class HyperlaneError(Exception):
    """Base class of hyperlane_lab's own errors."""


class ModelLoadError(HyperlaneError, ValueError):
    """A model, its config or its weights could not be loaded as asked."""


class ConfigError(HyperlaneError, ValueError):
    """A typed config (YAML, CLI) has an unknown key or a bad value; the message names the key path."""


class InfeasiblePlanError(HyperlaneError, ValueError):
    """No plan fits the devices' memory; the message lists needed vs available bytes per device."""


class ProtocolError(HyperlaneError):
    """A malformed frame or request arrived from the network."""


class WorkerError(HyperlaneError, RuntimeError):
    """A worker could not be reached or refused a request; the message names its address."""
