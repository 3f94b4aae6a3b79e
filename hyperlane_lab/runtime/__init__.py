"""Distributed runtime: workers (gRPC control + TCP data plane), the client, a local cluster."""

from __future__ import annotations

from typing import Any

__all__ = ["AutoDistributedModel", "LocalCluster", "Worker", "WorkerClient", "WorkerConfig"]

_LAZY = {
    "AutoDistributedModel": "hyperlane_lab.runtime.client",
    "LocalCluster": "hyperlane_lab.runtime.local_cluster",
    "Worker": "hyperlane_lab.runtime.worker",
    "WorkerConfig": "hyperlane_lab.runtime.worker",
    "WorkerClient": "hyperlane_lab.runtime.control",
}


def __getattr__(name: str) -> Any:
    import importlib

    if name not in _LAZY:
        raise AttributeError(name)
    return getattr(importlib.import_module(_LAZY[name]), name)
