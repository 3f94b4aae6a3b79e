"""Browse the LAN for hyperlane workers (mDNS / DNS-SD) and keep a live table of them.

    with DiscoveryManager() as dm:              # starts browsing
        workers = dm.wait_for(2, timeout=5.0)   # list[WorkerInfo], sorted by worker_id
        dm.on_remove(lambda w: print("left:", w.worker_id))

Each service of ``service_type`` is resolved (SRV + TXT + A), its TXT decoded strictly
(``txt.decode_txt``); a service that does not decode is logged at DEBUG, listed in
``ignored_services`` and otherwise ignored. A worker that sends goodbye packets is removed at once
and ``on_remove`` fires. A worker that died silently (killed, cable pulled) is removed when its
records expire: zeroconf's browser only drops a service when its PTR expires, and zeroconf raises
every PTR TTL to at least 1125 s, so a liveness thread also checks each worker's SRV record (host
TTL, 120 s by default, ``WorkerAdvertiser(ttl_s=...)`` to shorten): once it expired, the worker is
queried and, when it does not answer within ``resolve_timeout_s``, removed.
Updates: a re-announced TXT record fires ``on_update``; the values are read with
``records.freshest_txt`` (zeroconf's cache holds the old and new record side by side for a second,
see that module). Every ``liveness_interval_s`` the thread also compares each worker's current
cached TXT with the one its table entry was decoded from and re-reads it when they differ, so the
table converges on what the cache holds even if an update event was handled too early.
Callbacks run on zeroconf's browser thread: keep them short and never call ``stop_discovery`` from one.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any

from hyperlane_lab.discovery.base import timeout_message
from hyperlane_lab.discovery.net import (
    Interfaces,
    bound_ips,
    choose_address,
    local_ipv4_addresses,
    make_zeroconf,
)
from hyperlane_lab.discovery.records import DNS_TYPE_SRV, freshest_txt, live_records
from hyperlane_lab.discovery.txt import SERVICE_TYPE, decode_txt, parse_txt_wire
from hyperlane_lab.types import WorkerInfo

__all__ = ["MDNS_HINTS", "DiscoveryManager", "WorkerCallback"]

log = logging.getLogger(__name__)

WorkerCallback = Callable[[WorkerInfo], None]

MDNS_HINTS = (
    "Check that the workers run and advertise on this LAN; that UDP port 5353 and multicast group "
    "224.0.0.251 pass the firewall on both ends (e.g. `sudo ufw allow 5353/udp`) and the switch / Wi-Fi "
    "(client isolation blocks it); that you browse on the right interface (interfaces=['<LAN IP>'], "
    "`hyperlane discover --interface <LAN IP>`). Where multicast is blocked, list the workers "
    "explicitly with StaticDiscovery(['host:port', ...])."
)


class DiscoveryManager:
    """Live table of hyperlane workers seen via mDNS; implements the ``Discovery`` protocol.

    Args:
        interfaces: ``"all"`` (default), ``"default"``, or IP(s) of the interfaces to browse on.
        service_type: DNS-SD type to browse (tests use a unique one).
        resolve_timeout_s: how long to wait for a service's SRV/TXT/A records once its PTR arrived.
        liveness_interval_s: how often to look for workers whose SRV record expired (None: never).
    """

    def __init__(
        self,
        interfaces: Interfaces = "all",
        service_type: str = SERVICE_TYPE,
        resolve_timeout_s: float = 3.0,
        liveness_interval_s: float | None = 5.0,
    ) -> None:
        bound_ips(interfaces)  # validate early
        self.interfaces = interfaces
        self.service_type = service_type
        self.resolve_timeout_s = resolve_timeout_s
        self.liveness_interval_s = liveness_interval_s
        self._stop_liveness = threading.Event()
        self._liveness: threading.Thread | None = None
        self._cond = threading.Condition()
        self._workers: dict[str, WorkerInfo] = {}  # worker_id -> info
        self._name_of: dict[str, str] = {}  # worker_id -> mDNS service name
        self._id_of: dict[str, str] = {}  # mDNS service name -> worker_id
        self._txt_of: dict[str, bytes | None] = {}  # mDNS service name -> TXT RDATA last decoded for it
        self._ignored: dict[str, str] = {}  # service name -> why it was ignored
        self._callbacks: dict[str, list[WorkerCallback]] = {"add": [], "update": [], "remove": []}
        self._zc: Any = None
        self._browser: Any = None
        self._local_ips: list[str] = []

    # ------------------------------------------------------------------ lifecycle

    @property
    def running(self) -> bool:
        return self._zc is not None

    def start_discovery(self) -> None:
        """Open the mDNS sockets and start browsing (clears the previous table). Idempotent."""
        from zeroconf import DNSQuestionType, ServiceBrowser

        with self._cond:
            if self._zc is not None:
                return
            self._workers.clear()
            self._name_of.clear()
            self._id_of.clear()
            self._txt_of.clear()
            self._ignored.clear()
            self._local_ips = bound_ips(self.interfaces) or local_ipv4_addresses(include_loopback=True)
            zc = make_zeroconf(self.interfaces)
            try:
                # QM questions: answers come back by multicast. A unicast (QU) answer goes to port 5353 of the
                # asking host, where every mDNS socket of that host listens (workers beside a client, or several
                # workers): the kernel hands it to one of them, often not the one that asked, and the
                # browse then waits for its next query (~1 s later)
                self._browser = ServiceBrowser(
                    zc, self.service_type, handlers=[self._on_state_change], question_type=DNSQuestionType.QM
                )
            except BaseException:
                zc.close()
                raise
            self._zc = zc
            if self.liveness_interval_s is not None:
                self._stop_liveness = threading.Event()
                self._liveness = threading.Thread(
                    target=self._liveness_loop,
                    args=(zc, self._stop_liveness),
                    name="hyperlane-discovery-liveness",
                    daemon=True,
                )
                self._liveness.start()
        log.debug("browsing %s on %s", self.service_type, self.interfaces)

    def stop_discovery(self) -> None:
        """Stop browsing and close the sockets; the last table stays readable. Idempotent."""
        if threading.current_thread() in (self._browser, self._liveness):
            raise RuntimeError(
                "stop_discovery() was called from a discovery callback; call it from another thread"
            )
        with self._cond:
            zc, browser, liveness = self._zc, self._browser, self._liveness
            self._zc = self._browser = self._liveness = None
            self._stop_liveness.set()
        if liveness is not None:
            liveness.join(timeout=self.resolve_timeout_s + 5)
        if browser is not None:
            browser.cancel()
        if zc is not None:
            zc.close()

    def __enter__(self) -> DiscoveryManager:
        self.start_discovery()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop_discovery()

    # ------------------------------------------------------------------ table

    @property
    def discovered_workers(self) -> dict[str, WorkerInfo]:
        """A snapshot copy ``{worker_id: WorkerInfo}`` (safe to read while the browser updates it)."""
        with self._cond:
            return dict(self._workers)

    @property
    def ignored_services(self) -> dict[str, str]:
        """Services of our type that did not decode: ``{service name: reason}`` (for debugging)."""
        with self._cond:
            return dict(self._ignored)

    def workers(self) -> list[WorkerInfo]:
        with self._cond:
            return sorted(self._workers.values(), key=lambda w: w.worker_id)

    # ------------------------------------------------------------------ callbacks

    def on_add(self, fn: WorkerCallback) -> WorkerCallback:
        """Call ``fn(info)`` when a worker appears (usable as a decorator)."""
        self._callbacks["add"].append(fn)
        return fn

    def on_update(self, fn: WorkerCallback) -> WorkerCallback:
        """Call ``fn(new_info)`` when a known worker re-announces different values."""
        self._callbacks["update"].append(fn)
        return fn

    def on_remove(self, fn: WorkerCallback) -> WorkerCallback:
        """Call ``fn(last_info)`` when a worker leaves (goodbye packets or TTL expiry)."""
        self._callbacks["remove"].append(fn)
        return fn

    def _fire(self, event: str, info: WorkerInfo) -> None:
        for fn in list(self._callbacks[event]):
            try:
                fn(info)
            except Exception:
                log.exception("discovery %s callback %r failed for worker %s", event, fn, info.worker_id)

    # ------------------------------------------------------------------ waiting

    def wait_for(self, n: int, timeout: float) -> list[WorkerInfo]:
        """Block until at least ``n`` workers are known (starts browsing if needed); return all of them.

        Raises ``TimeoutError`` saying how many were found, with firewall / multicast hints.
        """
        if n < 0 or timeout < 0:
            raise ValueError(f"wait_for needs n >= 0 and timeout >= 0, got n={n}, timeout={timeout}")
        self.start_discovery()
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self._workers) < n:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            found = sorted(self._workers.values(), key=lambda w: w.worker_id)
        if len(found) < n:
            raise TimeoutError(self._timeout_text(n, found, timeout))
        return found

    async def wait_for_async(self, n: int, timeout: float) -> list[WorkerInfo]:
        """``wait_for`` for asyncio code: never blocks the event loop."""
        if n < 0 or timeout < 0:
            raise ValueError(f"wait_for_async needs n >= 0 and timeout >= 0, got n={n}, timeout={timeout}")
        if not self.running:
            await asyncio.to_thread(self.start_discovery)
        loop = asyncio.get_running_loop()
        changed = asyncio.Event()

        def poke(_info: WorkerInfo) -> None:
            loop.call_soon_threadsafe(changed.set)

        self._callbacks["add"].append(poke)
        try:
            deadline = loop.time() + timeout
            while len(self.discovered_workers) < n:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    await asyncio.wait_for(changed.wait(), remaining)
                except asyncio.TimeoutError:
                    break
                changed.clear()
        finally:
            self._callbacks["add"].remove(poke)
        found = self.workers()
        if len(found) < n:
            raise TimeoutError(self._timeout_text(n, found, timeout))
        return found

    def _timeout_text(self, n: int, found: list[WorkerInfo], timeout: float) -> str:
        text = timeout_message("mDNS discovery", n, found, timeout, MDNS_HINTS)
        ignored = self.ignored_services
        if ignored:
            text += f" Ignored {len(ignored)} malformed {self.service_type} service(s): " + "; ".join(
                f"{name}: {why}" for name, why in sorted(ignored.items())
            )
        return text

    # ------------------------------------------------------------------ browser thread

    def _on_state_change(self, zeroconf: Any, service_type: str, name: str, state_change: Any) -> None:
        """ServiceBrowser handler (browser thread). Never raises: one bad service must not stop browsing."""
        from zeroconf import ServiceStateChange

        try:
            if state_change is ServiceStateChange.Removed:
                self._remove(name, "goodbye or TTL expiry")
            else:
                self._resolve(zeroconf, service_type, name)
        except Exception:
            log.exception("discovery: unexpected error handling %s %s", state_change, name)

    def _resolve(self, zc: Any, service_type: str, name: str) -> None:
        from zeroconf import IPVersion

        si = self._query(zc, service_type, name)
        if si is None:
            self._ignore(name, f"did not resolve within {self.resolve_timeout_s:g} s")
            return
        try:
            # not si.properties: right after an update it may still be the old record (records.py says why)
            txt = freshest_txt(zc.cache, name)
            properties = parse_txt_wire(txt) if txt is not None else si.properties
            host = choose_address(si.parsed_addresses(IPVersion.All), self._local_ips)
            info = decode_txt(properties, host, srv_port=si.port)
        except ValueError as exc:
            self._ignore(name, str(exc))
            return
        self._store(name, info, txt)

    def _query(self, zc: Any, service_type: str, name: str) -> Any:
        """The service's records, asked for with multicast answers (QM: see start_discovery), or None."""
        from zeroconf import DNSQuestionType

        timeout = int(self.resolve_timeout_s * 1000)
        return zc.get_service_info(service_type, name, timeout=timeout, question_type=DNSQuestionType.QM)

    def _liveness_loop(self, zc: Any, stop: threading.Event) -> None:
        """Drop workers whose SRV record expired and who do not answer a fresh query, and re-read
        workers whose cached TXT record differs from the one in the table (liveness thread)."""
        assert self.liveness_interval_s is not None
        while not stop.wait(self.liveness_interval_s):
            with self._cond:
                known = dict(self._txt_of)
            for name, txt_used in known.items():
                if stop.is_set():
                    return
                if live_records(zc.cache, name, DNS_TYPE_SRV):
                    txt = freshest_txt(zc.cache, name)
                    if txt is not None and txt != txt_used:  # an update the table missed: cache-only re-read
                        log.debug("discovery: %s has a newer TXT record than the table; re-reading", name)
                        try:
                            self._resolve(zc, self.service_type, name)
                        except Exception:  # zeroconf closing under us during stop_discovery
                            if stop.is_set():
                                return
                            log.debug("re-reading %s failed", name, exc_info=True)
                    continue
                try:
                    si = self._query(zc, self.service_type, name)
                except Exception:  # zeroconf closing under us during stop_discovery
                    if stop.is_set():
                        return
                    log.debug("liveness query for %s failed", name, exc_info=True)
                    continue
                if si is None:
                    self._remove(name, "records expired and no answer: it stopped without goodbye")
                else:
                    self._resolve(zc, self.service_type, name)

    def _ignore(self, name: str, reason: str) -> None:
        log.debug("discovery: ignoring service %s: %s", name, reason)
        with self._cond:
            self._ignored[name] = reason
        self._remove(name, "its record became invalid")  # a known worker whose TXT turned bad is gone

    def _store(self, name: str, info: WorkerInfo, txt: bytes | None = None) -> None:
        with self._cond:
            owner = self._name_of.get(info.worker_id)
            if owner is not None and owner != name:
                self._ignored[name] = f"duplicate worker_id {info.worker_id!r}, already announced by {owner}"
                log.warning(
                    "discovery: %s repeats worker_id %r of %s; ignoring it", name, info.worker_id, owner
                )
                return
            old_id = self._id_of.get(name)
            if old_id is not None and old_id != info.worker_id:  # same service, new id: treat as leave + join
                old = self._workers.pop(old_id, None)
                self._name_of.pop(old_id, None)
            else:
                old = self._workers.get(info.worker_id)
            self._workers[info.worker_id] = info
            self._name_of[info.worker_id] = name
            self._id_of[name] = info.worker_id
            self._txt_of[name] = txt
            self._ignored.pop(name, None)
            self._cond.notify_all()
        if old is None:
            log.info("discovered worker %s at %s", info.worker_id, info.address)
            self._fire("add", info)
        elif old.worker_id != info.worker_id:
            self._fire("remove", old)
            self._fire("add", info)
        elif old != info:
            log.debug("worker %s updated", info.worker_id)
            self._fire("update", info)

    def _remove(self, name: str, why: str) -> None:
        with self._cond:
            worker_id = self._id_of.pop(name, None)
            self._txt_of.pop(name, None)
            info = self._workers.pop(worker_id, None) if worker_id is not None else None
            if worker_id is not None:
                self._name_of.pop(worker_id, None)
            if info is None and why.startswith("goodbye"):
                self._ignored.pop(name, None)
            self._cond.notify_all()
        if info is not None:
            log.info("worker %s left (%s)", info.worker_id, why)
            self._fire("remove", info)
