"""The small interface every worker-discovery method implements (mDNS or a static list)."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from hyperlane_lab.types import WorkerInfo

__all__ = ["Discovery", "timeout_message"]


@runtime_checkable
class Discovery(Protocol):
    """Finds workers. ``DiscoveryManager`` (mDNS) and ``StaticDiscovery`` (fixed addresses) implement it."""

    def workers(self) -> list[WorkerInfo]:
        """Workers known now, sorted by ``worker_id``."""
        ...

    def wait_for(self, n: int, timeout: float) -> list[WorkerInfo]:
        """Block until at least ``n`` workers are known; return them all (sorted by ``worker_id``).

        Raises ``TimeoutError`` after ``timeout`` seconds, saying how many were found.
        """
        ...


def timeout_message(method: str, wanted: int, found: list[WorkerInfo], timeout: float, hints: str) -> str:
    """The text of the TimeoutError a ``wait_for`` raises: counts, who was found, and what to try."""
    names = ", ".join(f"{w.worker_id}@{w.address}" for w in found) or "none"
    return f"{method}: found {len(found)} of {wanted} wanted workers within {timeout:g} s (found: {names}). {hints}"
