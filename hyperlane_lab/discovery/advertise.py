"""Announce one worker on the LAN as a ``_hyperlane._tcp.local.`` mDNS service.

Call pattern for the worker (its gRPC server is asyncio-based)::

    adv = WorkerAdvertiser(info, interfaces="all", advertise_address=None)
    await adv.async_start()            # after the gRPC and data servers listen
    ...
    await adv.async_update(new_info)   # e.g. after LoadShard: free_memory and shard_loaded changed
    adv.update(new_info, wait=False)   # same, from a plain (non-async) callback on the loop
    ...
    await adv.async_stop()             # before the servers stop: goodbye packets, clients drop it

or, from plain threads / scripts, ``adv.start()`` / ``adv.update(info)`` / ``adv.stop()``, or
``with WorkerAdvertiser(info) as adv:`` / ``async with WorkerAdvertiser(info) as adv:``.

zeroconf always runs on its own event-loop thread here, so a busy worker loop (loading a shard
synchronously, a long forward) never delays mDNS answers; the ``async_*`` methods only move the
blocking calls (the name check and registration probes for ~4 s, goodbyes for ~0.4 s) off the caller's loop.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import logging
import re
import threading
import time
from collections.abc import Sequence
from types import TracebackType
from typing import Any

from hyperlane_lab.discovery.net import Interfaces, bound_ips, local_ipv4_addresses, make_zeroconf
from hyperlane_lab.discovery.txt import SERIAL_KEY, SERVICE_TYPE, encode_txt
from hyperlane_lab.errors import WorkerError
from hyperlane_lab.types import WorkerInfo

__all__ = ["WorkerAdvertiser", "instance_label"]

TWIN_CHECK_MS = 2500  # how long start() asks by multicast for another worker of the same name (see there): a
# responder that multicast its records within the last second holds its answer back until the second is over
# (answers came 1.0-1.4 s after the question on loopback)

log = logging.getLogger(__name__)

_LABEL_RE = re.compile(r"[^A-Za-z0-9_-]")


def instance_label(worker_id: str) -> str:
    """A DNS-safe instance/host label for ``worker_id`` (the exact id travels in the TXT ``id`` key).

    Letters, digits, ``-`` and ``_`` are kept; anything else becomes ``-``; when that changed or
    truncated the id, a short hash of the original keeps distinct ids distinct. At most 63 bytes.
    """
    label = _LABEL_RE.sub("-", worker_id)
    if label == worker_id and len(label) <= 63:
        return label
    digest = hashlib.sha1(worker_id.encode()).hexdigest()[:8]
    return f"{label[:54]}-{digest}"


def _concrete_ip(host: str) -> str | None:
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        return None
    return None if addr.is_unspecified else str(addr)


class WorkerAdvertiser:
    """Registers, updates and withdraws one worker's mDNS service.

    Args:
        info: what to announce; ``info.grpc_port`` becomes the SRV port.
        interfaces: ``"all"`` (default), ``"default"``, or IP(s) of the interfaces to announce on.
        advertise_address: IP(s) (list or comma-separated) to put in the A/AAAA records (multi-homed hosts: the address
            clients should dial). Default: the explicit ``interfaces`` IPs, else ``info.host`` when
            it is a concrete IP, else every non-loopback IPv4 of this host.
        service_type: DNS-SD type; tests use a unique one to stay apart from real workers.
        ttl_s: record TTL; default zeroconf's (120 s host records, 4500 s others). A short TTL
            lets clients notice a worker that died without sending goodbyes sooner.
    """

    def __init__(
        self,
        info: WorkerInfo,
        interfaces: Interfaces = "all",
        advertise_address: str | Sequence[str] | None = None,
        service_type: str = SERVICE_TYPE,
        ttl_s: int | None = None,
    ) -> None:
        encode_txt(info)  # fail now, not on the zeroconf thread
        if ttl_s is not None and ttl_s < 1:
            raise ValueError(f"ttl_s must be >= 1 second, got {ttl_s}")
        self._info = info
        self._interfaces = interfaces
        bound_ips(interfaces)  # validates the interface argument early
        if isinstance(advertise_address, str):  # "ip" or "ip1,ip2"
            advertise_address = [a for a in advertise_address.split(",") if a.strip()]
        self._explicit_addresses = [str(ipaddress.ip_address(a.strip())) for a in advertise_address or ()]
        self.service_type = service_type
        self.ttl_s = ttl_s
        self._label = instance_label(info.worker_id)
        self.service_name = f"{self._label}.{service_type}"
        self._lock = threading.Lock()  # serializes start/announce/stop (network operations)
        self._info_lock = threading.Lock()  # guards self._info against concurrent update() calls
        self._announced: WorkerInfo | None = None  # the info the current records carry
        self._zc: Any = None
        self._service: Any = None
        self._addresses: list[str] = []
        # Serial in the TXT record: starts from the clock so a restarted worker never repeats one.
        self._serial = int(time.time() * 1000)

    # ------------------------------------------------------------------ state

    @property
    def info(self) -> WorkerInfo:
        return self._info

    @property
    def addresses(self) -> list[str]:
        """The addresses announced (empty before ``start``)."""
        return list(self._addresses)

    @property
    def running(self) -> bool:
        return self._zc is not None

    def _pick_addresses(self) -> list[str]:
        if self._explicit_addresses:
            return list(self._explicit_addresses)
        explicit = bound_ips(self._interfaces)
        if explicit:
            return explicit
        host_ip = _concrete_ip(self._info.host)
        if host_ip:
            return [host_ip]
        found = local_ipv4_addresses()
        if found:
            return found
        log.warning(
            "no non-loopback IPv4 address found; advertising worker %s on 127.0.0.1", self._info.worker_id
        )
        return ["127.0.0.1"]

    def _service_info(self, info: WorkerInfo) -> Any:
        from zeroconf import ServiceInfo

        kwargs: dict[str, Any] = {}
        if self.ttl_s is not None:
            kwargs = {"host_ttl": self.ttl_s, "other_ttl": self.ttl_s}
        self._serial += 1
        return ServiceInfo(
            self.service_type,
            self.service_name,
            port=info.grpc_port,
            properties={**encode_txt(info), SERIAL_KEY: str(self._serial)},
            server=f"{self._label}.local.",
            parsed_addresses=self._addresses,
            **kwargs,
        )

    # ------------------------------------------------------------------ sync API

    def start(self) -> None:
        """Check and probe the name, then announce the service (blocks ~4 s). Raises WorkerError on a name clash."""
        from zeroconf import DNSQuestionType, NonUniqueNameException

        with self._lock:
            if self._zc is not None:
                raise RuntimeError(f"advertiser for worker {self._info.worker_id} is already started")
            self._addresses = self._pick_addresses()
            info = self._info
            service = self._service_info(info)
            zc = make_zeroconf(self._interfaces)
            try:
                # zeroconf's probes ask for unicast answers (QU), sent to port 5353 of this host, where every
                # mDNS socket on it listens: a worker with this name on the same host may answer into its own
                # socket. So first ask by multicast (QM), which reaches every socket; a responder answers within
                # its one-per-second multicast limit
                if zc.get_service_info(
                    service.type, service.name, timeout=TWIN_CHECK_MS, question_type=DNSQuestionType.QM
                ):
                    raise NonUniqueNameException(service.name)
                zc.register_service(service, allow_name_change=False)
            except NonUniqueNameException as exc:
                zc.close()
                raise WorkerError(
                    f"another worker already advertises {self.service_name!r} on this network; "
                    f"give each worker a unique worker_id (this one is {self._info.worker_id!r})"
                ) from exc
            except BaseException:
                zc.close()
                raise
            self._zc, self._service, self._announced = zc, service, info
            log.info(
                "advertising worker %s as %s at %s port %d",
                self._info.worker_id,
                self.service_name,
                ",".join(self._addresses),
                self._info.grpc_port,
            )

    def update(self, info: WorkerInfo, wait: bool = True) -> None:
        """Re-announce changed TXT values (same ``worker_id``); before ``start`` it only stores them.

        ``wait=True`` blocks until the re-announcement went out (~0.5 s). ``wait=False`` returns at
        once and announces on a short-lived thread: safe from an asyncio callback. Rapid or
        concurrent calls coalesce, and the last ``info`` given is always the one announced last.
        """
        if info.worker_id != self._info.worker_id:
            raise ValueError(
                f"update() cannot change worker_id ({self._info.worker_id!r} -> {info.worker_id!r}); "
                "stop() this advertiser and start a new one"
            )
        encode_txt(info)
        with self._info_lock:
            if self._zc is not None and info.grpc_port != self._info.grpc_port:
                raise ValueError(
                    "update() cannot change grpc_port of a running advertiser; stop() and start() again"
                )
            self._info = info
        if wait:
            self._announce()
        else:
            threading.Thread(target=self._announce_logged, name="hyperlane-mdns-update", daemon=True).start()

    def _announce(self) -> None:
        """Send the latest ``self._info`` unless it is already what was announced (network ops serialized)."""
        with self._lock:
            info = self._info
            if self._zc is None or info == self._announced:
                return
            service = self._service_info(info)
            self._zc.update_service(service)
            self._service, self._announced = service, info
            log.debug("re-announced worker %s", info.worker_id)

    def _announce_logged(self) -> None:
        try:
            self._announce()
        except Exception:
            log.exception("mDNS re-announce of worker %s failed", self._info.worker_id)

    def stop(self) -> None:
        """Send goodbye packets and close the sockets. Idempotent."""
        with self._lock:
            zc, service = self._zc, self._service
            self._zc = self._service = self._announced = None
            if zc is None:
                return
            try:
                zc.unregister_service(service)
            except Exception:  # goodbyes are best effort: clients also expire the records by TTL
                log.warning("could not send goodbye packets for %s", self.service_name, exc_info=True)
            finally:
                zc.close()
            log.info("stopped advertising worker %s", self._info.worker_id)

    def __enter__(self) -> WorkerAdvertiser:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # ------------------------------------------------------------------ asyncio API

    async def async_start(self) -> None:
        await asyncio.to_thread(self.start)

    async def async_update(self, info: WorkerInfo) -> None:
        await asyncio.to_thread(self.update, info)

    async def async_stop(self) -> None:
        await asyncio.to_thread(self.stop)

    async def __aenter__(self) -> WorkerAdvertiser:
        await self.async_start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.async_stop()
