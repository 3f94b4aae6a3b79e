"""mDNS advertise/browse over real multicast on 127.0.0.1 (works without changing `lo`'s flags on Linux).

Every test uses its own random service type, so parallel tests (and real workers) never see each other.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from hyperlane_lab.cli import discover as discover_cli
from hyperlane_lab.discovery import DiscoveryManager, WorkerAdvertiser
from hyperlane_lab.discovery.txt import encode_txt
from hyperlane_lab.errors import WorkerError
from hyperlane_lab.types import WorkerInfo

LO = ["127.0.0.1"]
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def service_type() -> str:
    return f"_hl{secrets.token_hex(4)}._tcp.local."


def make_info(worker_id: str = "w0", **kw: object) -> WorkerInfo:
    base = {
        "worker_id": worker_id,
        "host": "0.0.0.0",  # the worker listens on all interfaces; the advertiser picks the address
        "grpc_port": 50051,
        "data_port": 50052,
        "device_kind": "cuda",
        "gpu_name": "NVIDIA H100 80GB HBM3",
        "total_memory": 80 * 2**30,
        "free_memory": 79 * 2**30,
        "compute_capability": "9.0",
        "host_ram": 512 * 2**30,
        "flops": 0.0,
        "mem_bw": 0.0,
        "device": "cuda:0",
    }
    base.update(kw)
    return WorkerInfo(**base)  # type: ignore[arg-type]


def until(cond: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


def test_advertise_discover_update_stop(service_type: str) -> None:
    info = make_info("w0")
    seen = dataclasses.replace(info, host="127.0.0.1")  # what a client must see: the advertised address
    events: list[tuple[str, WorkerInfo]] = []
    adv = WorkerAdvertiser(info, interfaces=LO, service_type=service_type)
    with DiscoveryManager(interfaces=LO, service_type=service_type) as dm:
        dm.on_add(lambda w: events.append(("add", w)))
        dm.on_update(lambda w: events.append(("update", w)))
        dm.on_remove(lambda w: events.append(("remove", w)))
        adv.start()
        try:
            assert adv.addresses == ["127.0.0.1"]
            assert dm.wait_for(1, timeout=10) == [seen]
            assert dm.discovered_workers == {"w0": seen}

            # a shard load: less free memory, shard flag and measured rates change
            loaded = dataclasses.replace(
                info, free_memory=41 * 2**30, shard_loaded=True, flops=7.1e14, mem_bw=3.2e12
            )
            adv.update(loaded)
            want = dataclasses.replace(loaded, host="127.0.0.1")
            until(lambda: dm.discovered_workers.get("w0") == want, 10, "the updated TXT record")
            # and back: zeroconf keeps the stale TXT in its cache ~1 s; the newest one must win
            adv.update(info)
            until(lambda: dm.discovered_workers.get("w0") == seen, 10, "the second update")
        finally:
            adv.stop()
        until(lambda: "w0" not in dm.discovered_workers, 10, "the goodbye to remove the worker")
    # stop_discovery() ended the manager's threads (browser and liveness)
    leftovers = [t.name for t in threading.enumerate() if "liveness" in t.name or service_type[:-7] in t.name]
    assert leftovers == []
    assert [e for e, _ in events] == ["add", "update", "update", "remove"]
    assert events[1][1] == want and events[2][1] == seen and events[3][1] == seen
    assert not adv.running


def test_rapid_nonblocking_updates_end_with_the_last_one(service_type: str) -> None:
    info = make_info("busy", grpc_port=50081)
    with (
        WorkerAdvertiser(
            info, interfaces=LO, advertise_address="127.0.0.1", service_type=service_type
        ) as adv,
        DiscoveryManager(interfaces=LO, service_type=service_type) as dm,
    ):
        dm.wait_for(1, timeout=10)
        t0 = time.monotonic()
        for free in range(1, 9):  # e.g. a burst of on_change callbacks from the worker's event loop
            adv.update(dataclasses.replace(info, free_memory=free * 2**30), wait=False)
        # returned without waiting: 8 blocking updates take >= 8 x 2 x 225 ms (zeroconf's broadcast spacing)
        assert time.monotonic() - t0 < 2.0
        last = dataclasses.replace(info, free_memory=8 * 2**30, host="127.0.0.1")
        until(lambda: dm.discovered_workers.get("busy") == last, 10, "the last of the rapid updates")
        time.sleep(1.5)  # any straggling re-announcement would land now; it must not be an older value
        assert dm.discovered_workers["busy"] == last
        assert adv.info == dataclasses.replace(info, free_memory=8 * 2**30)


def test_async_api(service_type: str) -> None:
    info = make_info("async-w", grpc_port=50061, data_port=50062)

    async def scenario() -> list[WorkerInfo]:
        dm = DiscoveryManager(interfaces=LO, service_type=service_type)
        try:
            async with WorkerAdvertiser(info, interfaces=LO, service_type=service_type) as adv:
                found = await dm.wait_for_async(1, timeout=10)
                await adv.async_update(dataclasses.replace(info, free_memory=1))
                deadline = time.monotonic() + 10
                while dm.discovered_workers["async-w"].free_memory != 1:
                    assert time.monotonic() < deadline, "update not seen"
                    await asyncio.sleep(0.05)
            deadline = time.monotonic() + 10
            while dm.discovered_workers:
                assert time.monotonic() < deadline, "removal not seen"
                await asyncio.sleep(0.05)
            with pytest.raises(TimeoutError, match="found 0 of 1"):
                await dm.wait_for_async(1, timeout=0.3)
            return found
        finally:
            dm.stop_discovery()

    assert asyncio.run(scenario()) == [dataclasses.replace(info, host="127.0.0.1")]


def test_explicit_advertise_address_and_timeout_message(service_type: str) -> None:
    info = make_info("multi-homed", host="10.1.2.3")
    with (
        WorkerAdvertiser(info, interfaces=LO, advertise_address="10.9.8.7", service_type=service_type),
        DiscoveryManager(interfaces=LO, service_type=service_type) as dm,
    ):
        (found,) = dm.wait_for(1, timeout=10)
        assert found == dataclasses.replace(info, host="10.9.8.7")
        with pytest.raises(TimeoutError) as err:
            dm.wait_for(2, timeout=0.2)
    text = str(err.value)
    assert "found 1 of 2" in text and "multi-homed@10.9.8.7:50051" in text
    assert "5353" in text and "StaticDiscovery" in text


def test_duplicate_worker_id_is_refused(service_type: str) -> None:
    """On the same host too (zeroconf's own probes get unicast answers, which another mDNS socket of the host
    may take), and right after the first worker re-announced itself (its next multicast answer is held back
    for up to a second) or refused a twin already."""
    with WorkerAdvertiser(make_info("same"), interfaces=LO, service_type=service_type) as first:
        for _ in range(2):
            twin = WorkerAdvertiser(
                make_info("same", grpc_port=50099), interfaces=LO, service_type=service_type
            )
            with pytest.raises(WorkerError, match="unique worker_id"):
                twin.start()
            assert not twin.running
            first.update(make_info("same", shard_loaded=True))  # a re-announcement just before the next try


def _register_raw(zc: object, infos: list[object]) -> None:
    """Register services with plain zeroconf, all at once (no probing: cooperating responders)."""

    async def reg() -> None:
        for si in infos:
            await zc.async_register_service(si, cooperating_responders=True)  # type: ignore[attr-defined]

    asyncio.run_coroutine_threadsafe(reg(), zc.loop).result(10)  # type: ignore[attr-defined]


def test_malformed_and_foreign_services_are_ignored(service_type: str) -> None:
    from zeroconf import ServiceInfo, Zeroconf

    good = encode_txt(make_info("template", grpc_port=40000))
    bad_txt: dict[str, dict[str, str | None]] = {
        "foreign": {"path": "/", "model": "printer"},
        "wrongversion": {**good, "v": "99"},
        "garbagemem": {**good, "mf": "lots"},
        "badflag": {**good, "sh": "yes"},
        "noport": {k: v for k, v in good.items() if k != "gp"},
        "portmismatch": {**good, "gp": "40001"},
        "novalue": {**good, "mt": None},
    }
    other_type = f"_hlo{secrets.token_hex(3)}._tcp.local."
    raw = Zeroconf(interfaces=LO)
    try:
        infos = [
            ServiceInfo(
                service_type,
                f"{n}.{service_type}",
                port=40000,
                properties=p,
                parsed_addresses=LO,
                server=f"{n}.local.",
            )
            for n, p in bad_txt.items()
        ]
        # a valid worker TXT, but under another service type: must not be seen at all
        infos.append(
            ServiceInfo(
                other_type,
                f"valid-elsewhere.{other_type}",
                port=40000,
                properties=good,
                parsed_addresses=LO,
                server="ve.local.",
            )
        )
        with DiscoveryManager(interfaces=LO, service_type=service_type) as dm:
            _register_raw(raw, infos)
            with WorkerAdvertiser(make_info("ok1"), interfaces=LO, service_type=service_type):
                want = {f"{n}.{service_type}" for n in bad_txt}
                until(
                    lambda: set(dm.ignored_services) >= want,
                    15,
                    "every malformed service to be seen and ignored",
                )
                assert [w.worker_id for w in dm.wait_for(1, timeout=10)] == ["ok1"]
                reasons = dm.ignored_services
                assert set(reasons) == want
                assert "protocol version 99" in reasons[f"wrongversion.{service_type}"]
                assert "'mf'" in reasons[f"garbagemem.{service_type}"]
                assert "'gp'" in reasons[f"noport.{service_type}"]
                assert "SRV port" in reasons[f"portmismatch.{service_type}"]
                # the browser survived all of that: a worker arriving now is still found
                with WorkerAdvertiser(
                    make_info("ok2", grpc_port=50053), interfaces=LO, service_type=service_type
                ):
                    assert [w.worker_id for w in dm.wait_for(2, timeout=10)] == ["ok1", "ok2"]
                assert set(dm.discovered_workers) <= {"ok1", "ok2"}
    finally:
        raw.close()


ADVERTISE_AND_SLEEP = """
import json, sys, time
from hyperlane_lab.discovery import WorkerAdvertiser
from hyperlane_lab.types import WorkerInfo
info = WorkerInfo(**json.loads(sys.argv[1]))
adv = WorkerAdvertiser(info, interfaces=[sys.argv[2]], service_type=sys.argv[3], ttl_s=int(sys.argv[4]))
adv.start()
print("READY", flush=True)
time.sleep(float(sys.argv[5]))  # bounded; the test SIGKILLs it long before
"""


def test_silent_death_is_noticed_by_liveness_check(service_type: str) -> None:
    """A worker killed without goodbye disappears once its short-TTL SRV record expires; a live one stays."""
    dead = make_info("dies", grpc_port=50071)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            ADVERTISE_AND_SLEEP,
            json.dumps(dataclasses.asdict(dead)),
            "127.0.0.1",
            service_type,
            "2",
            "60",
        ],
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    removed: list[str] = []
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "READY"
        with (
            WorkerAdvertiser(make_info("lives"), interfaces=LO, service_type=service_type, ttl_s=2),
            DiscoveryManager(
                interfaces=LO, service_type=service_type, resolve_timeout_s=1.0, liveness_interval_s=0.5
            ) as dm,
        ):
            dm.on_remove(lambda w: removed.append(w.worker_id))
            assert [w.worker_id for w in dm.wait_for(2, timeout=10)] == ["dies", "lives"]
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)
            until(lambda: "dies" not in dm.discovered_workers, 20, "the killed worker to expire")
            time.sleep(3.0)  # > one TTL plus several liveness rounds: the live worker must survive them
            assert list(dm.discovered_workers) == ["lives"]
            assert removed == ["dies"]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)


def test_cli_discover(service_type: str, capsys: pytest.CaptureFixture[str]) -> None:
    info = make_info("cli-w", flops=1.5e14, shard_loaded=True)
    ns = argparse.Namespace(timeout=10.0, json=True, interface=LO, count=1, service_type=service_type)
    with WorkerAdvertiser(info, interfaces=LO, service_type=service_type):
        assert discover_cli.run(ns) == 0
        items = json.loads(capsys.readouterr().out)
        assert items == [{**dataclasses.asdict(info), "host": "127.0.0.1", "address": "127.0.0.1:50051"}]
        table_ns = argparse.Namespace(
            timeout=3.0, json=False, interface=LO, count=0, service_type=service_type
        )
        assert discover_cli.run(table_ns) == 0
        out = capsys.readouterr().out.splitlines()
        assert out[0].startswith("ID") and out[1].split()[:3] == ["cli-w", "127.0.0.1:50051", "cuda:0"]
    empty = argparse.Namespace(
        timeout=0.3, json=False, interface=LO, count=0, service_type=f"_hl{secrets.token_hex(4)}._tcp.local."
    )
    assert discover_cli.run(empty) == 1
    assert "no hyperlane workers found" in capsys.readouterr().err
