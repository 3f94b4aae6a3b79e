"""Discovery without multicast: ask a fixed list of ``host:port`` addresses who they are.

    static = StaticDiscovery(["10.0.0.5:50051", "10.0.0.6:50051"], info_fetcher=grpc_info)
    workers = static.wait_for(2, timeout=10.0)

``info_fetcher(address) -> WorkerInfo`` does the asking (the runtime passes a gRPC ``Info`` call);
it should raise on failure and bound its own time (a per-call deadline), since ``wait_for`` cannot
interrupt a call in flight.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

from hyperlane_lab.discovery.base import timeout_message
from hyperlane_lab.types import WorkerInfo

__all__ = ["InfoFetcher", "StaticDiscovery", "parse_address"]

log = logging.getLogger(__name__)

InfoFetcher = Callable[[str], WorkerInfo]


def parse_address(address: str) -> tuple[str, int]:
    """``"host:port"`` or ``"[v6]:port"`` -> (host, port); ValueError saying the expected form."""
    host, sep, port_text = address.strip().rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(
            f"worker address {address!r} is not 'host:port' (e.g. '10.0.0.5:50051' or '[fe80::1]:50051')"
        )
    return host, int(port_text)


class StaticDiscovery:
    """``Discovery`` over a fixed address list, for networks where multicast is blocked.

    Args:
        addresses: ``host:port`` of each worker's gRPC server.
        info_fetcher: ``address -> WorkerInfo``; raises when the worker cannot be reached.
        poll_interval_s: pause between rounds while ``wait_for`` waits for unreachable workers.
    """

    def __init__(
        self, addresses: Sequence[str], info_fetcher: InfoFetcher, poll_interval_s: float = 0.5
    ) -> None:
        if isinstance(addresses, str):
            addresses = [a for a in addresses.split(",") if a.strip()]
        if not addresses:
            raise ValueError("StaticDiscovery needs at least one 'host:port' address")
        for a in addresses:
            parse_address(a)
        self.addresses = [a.strip() for a in addresses]
        if len(set(self.addresses)) != len(self.addresses):
            raise ValueError(f"StaticDiscovery got duplicate addresses: {self.addresses}")
        self.info_fetcher = info_fetcher
        self.poll_interval_s = poll_interval_s
        self.last_errors: dict[str, str] = {}  # address -> why the last fetch failed

    def _fetch_all(self) -> list[WorkerInfo]:
        def one(address: str) -> WorkerInfo | None:
            try:
                info = self.info_fetcher(address)
            except Exception as exc:
                log.debug("static discovery: %s unreachable: %s", address, exc)
                self.last_errors[address] = f"{type(exc).__name__}: {exc}"
                return None
            self.last_errors.pop(address, None)
            return info

        with ThreadPoolExecutor(
            max_workers=min(8, len(self.addresses)), thread_name_prefix="static-disc"
        ) as pool:
            results = list(pool.map(one, self.addresses))
        by_id: dict[str, WorkerInfo] = {}
        for address, info in zip(self.addresses, results):
            if info is None:
                continue
            if info.worker_id in by_id:
                self.last_errors[address] = (
                    f"duplicate worker_id {info.worker_id!r} (also at {by_id[info.worker_id].address})"
                )
                continue
            by_id[info.worker_id] = info
        return sorted(by_id.values(), key=lambda w: w.worker_id)

    def workers(self) -> list[WorkerInfo]:
        """Ask every address once; the workers that answered, sorted by ``worker_id``."""
        return self._fetch_all()

    def wait_for(self, n: int, timeout: float) -> list[WorkerInfo]:
        """Poll the addresses until ``n`` answer; TimeoutError lists the ones that did not and why."""
        if n < 0 or timeout < 0:
            raise ValueError(f"wait_for needs n >= 0 and timeout >= 0, got n={n}, timeout={timeout}")
        if n > len(self.addresses):
            raise ValueError(
                f"wait_for({n}) can never succeed with only {len(self.addresses)} static addresses"
            )
        deadline = time.monotonic() + timeout
        while True:
            found = self._fetch_all()
            remaining = deadline - time.monotonic()
            if len(found) >= n or remaining <= 0:
                break
            time.sleep(min(self.poll_interval_s, remaining))
        if len(found) < n:
            failures = "; ".join(f"{a}: {why}" for a, why in self.last_errors.items()) or "none"
            raise TimeoutError(
                timeout_message(
                    "static discovery",
                    n,
                    found,
                    timeout,
                    f"Unreachable: {failures}. Check that each worker runs and listens on that address "
                    "and that no firewall blocks its gRPC port.",
                )
            )
        return found

    async def wait_for_async(self, n: int, timeout: float) -> list[WorkerInfo]:
        return await asyncio.to_thread(self.wait_for, n, timeout)
