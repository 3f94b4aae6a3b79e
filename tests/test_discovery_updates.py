"""TXT updates reach a DiscoveryManager: from an advertiser in another process, after the cache-flush
second of RFC 6762 §10.2 has come into play, and via the liveness thread's cache re-read.

Regression: a worker re-announcing seconds after it was discovered (a shard load) was never seen as
updated, because zeroconf keeps the old TXT record one more second restamped with the new record's
``created``, and the manager picked the old one (see ``hyperlane_lab/discovery/records.py``).
"""

from __future__ import annotations

import dataclasses
import json
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from hyperlane_lab.discovery import DiscoveryManager, WorkerAdvertiser
from hyperlane_lab.discovery.records import DNS_CLASS_IN, DNS_TYPE_TXT, freshest_txt
from hyperlane_lab.discovery.txt import SERIAL_KEY, encode_txt, parse_txt_wire
from hyperlane_lab.types import WorkerInfo

LO = ["127.0.0.1"]
REPO = Path(__file__).resolve().parents[1]

BASE = WorkerInfo(
    worker_id="sub-w0",
    host="0.0.0.0",
    grpc_port=50161,
    data_port=50162,
    device_kind="cuda",
    gpu_name="NVIDIA H100 80GB HBM3",
    total_memory=80 * 2**30,
    free_memory=79 * 2**30,
    compute_capability="9.0",
    host_ram=512 * 2**30,
    device="cuda:0",
)
LOADED = dataclasses.replace(BASE, free_memory=41 * 2**30, shard_loaded=True, flops=7.1e14, mem_bw=3.2e12)

# The worker side: announce, then apply "update"/"revert" commands read from stdin (bounded waits).
ADVERTISER = """
import dataclasses, json, select, sys
from hyperlane_lab.discovery import WorkerAdvertiser
from hyperlane_lab.types import WorkerInfo
base = WorkerInfo(**json.loads(sys.argv[1]))
loaded = WorkerInfo(**json.loads(sys.argv[2]))
adv = WorkerAdvertiser(base, interfaces=["127.0.0.1"], service_type=sys.argv[3])
adv.start()
print("READY", flush=True)
while select.select([sys.stdin], [], [], 60)[0]:
    cmd = sys.stdin.readline().strip()
    if not cmd:
        break  # stdin closed by the test
    adv.update(loaded if cmd == "update" else base, wait=cmd != "update")  # the worker uses wait=False
    print("DONE", cmd, flush=True)
adv.stop()
print("STOPPED", flush=True)
"""


def until(cond: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


def read_line(proc: subprocess.Popen[str], timeout: float) -> str:
    """The next stdout line of ``proc`` within ``timeout`` s (a thread keeps the wait bounded)."""
    box: list[str] = []
    reader = threading.Thread(
        target=lambda: box.append(proc.stdout.readline() if proc.stdout else ""), daemon=True
    )
    reader.start()
    reader.join(timeout)
    if not box:
        raise AssertionError(f"advertiser subprocess printed nothing within {timeout} s")
    return box[0].strip()


@pytest.fixture
def service_type() -> str:
    return f"_hl{secrets.token_hex(4)}._tcp.local."


@pytest.fixture
def advertiser_proc(service_type: str) -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            ADVERTISER,
            json.dumps(dataclasses.asdict(BASE)),
            json.dumps(dataclasses.asdict(LOADED)),
            service_type,
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)


def test_update_from_advertiser_in_another_process(
    service_type: str, advertiser_proc: subprocess.Popen[str]
) -> None:
    events: list[tuple[str, WorkerInfo]] = []
    # no liveness thread: its periodic cache re-read would mask a wrong pick on the update event
    with DiscoveryManager(interfaces=LO, service_type=service_type, liveness_interval_s=None) as dm:
        dm.on_add(lambda w: events.append(("add", w)))
        dm.on_update(lambda w: events.append(("update", w)))
        dm.on_remove(lambda w: events.append(("remove", w)))
        assert read_line(advertiser_proc, 30) == "READY"
        seen = dataclasses.replace(BASE, host="127.0.0.1")
        assert dm.wait_for(1, timeout=15) == [seen]
        # > 1 s after the record was cached: the update takes zeroconf's cache-flush path (the bug)
        time.sleep(2.0)
        assert advertiser_proc.stdin is not None
        advertiser_proc.stdin.write("update\n")
        advertiser_proc.stdin.flush()
        assert read_line(advertiser_proc, 15) == "DONE update"
        want = dataclasses.replace(LOADED, host="127.0.0.1")
        until(lambda: dm.discovered_workers.get(BASE.worker_id) == want, 10, "the shard-loaded TXT update")
        # back to the first values, again well after the last copy was cached
        time.sleep(1.5)
        advertiser_proc.stdin.write("revert\n")
        advertiser_proc.stdin.flush()
        assert read_line(advertiser_proc, 15) == "DONE revert"
        until(lambda: dm.discovered_workers.get(BASE.worker_id) == seen, 10, "the reverting TXT update")
        advertiser_proc.stdin.close()  # the advertiser says goodbye and exits
        assert read_line(advertiser_proc, 15) == "STOPPED"
        until(lambda: BASE.worker_id not in dm.discovered_workers, 10, "the goodbye to remove the worker")
    assert [e for e, _ in events] == ["add", "update", "update", "remove"]
    assert [w for _, w in events] == [seen, want, seen, seen]


def _txt(info: WorkerInfo, serial: int | None) -> bytes:
    props = encode_txt(info)
    if serial is not None:
        props[SERIAL_KEY] = str(serial)
    return b"".join(bytes([len(e)]) + e for e in (f"{k}={v}".encode() for k, v in props.items()))


@pytest.mark.parametrize("serials", [(5, 6), (None, None)], ids=["with-serial", "no-serial"])
@pytest.mark.parametrize("cached_first", ["old", "new"])
def test_freshest_txt_after_cache_flush(serials: tuple[int | None, int | None], cached_first: str) -> None:
    """Replays zeroconf's handling of a cache-flush TXT update on a real DNSCache (no network)."""
    from zeroconf import DNSCache, DNSText

    name = "w._hltest._tcp.local."
    unique_in = DNS_CLASS_IN | 0x8000  # cache-flush bit, as the advertiser sends it
    t0 = 1_000_000.0
    old = DNSText(name, DNS_TYPE_TXT, unique_in, 4500, _txt(BASE, serials[0]), created=t0)
    now = t0 + 5000.0  # the update arrives 5 s later
    new = DNSText(name, DNS_TYPE_TXT, unique_in, 4500, _txt(LOADED, serials[1]), created=now)
    cache = DNSCache()
    if cached_first == "old":
        cache.async_add_records([old])
        cache.async_mark_unique_records_older_than_1s_to_expire(
            {(name, DNS_TYPE_TXT, DNS_CLASS_IN)}, [new], now
        )
        cache.async_add_records([new])
    else:  # the other dict order, to show the choice does not depend on it
        cache.async_add_records([new, old])
        cache.async_mark_unique_records_older_than_1s_to_expire(
            {(name, DNS_TYPE_TXT, DNS_CLASS_IN)}, [new], now
        )
    live = [
        r for r in cache.get_all_by_details(name, DNS_TYPE_TXT, DNS_CLASS_IN) if not r.is_expired(now + 10)
    ]
    assert len(live) == 2  # the premise: for a second both records are live
    assert parse_txt_wire(freshest_txt(cache, name, now + 10) or b"")[b"sh"] == b"1"
    # once the old copy expired only the new one is left
    assert parse_txt_wire(freshest_txt(cache, name, now + 1500) or b"")[b"sh"] == b"1"
    assert freshest_txt(cache, "other._hltest._tcp.local.", now) is None


def test_liveness_thread_rereads_a_txt_update_it_was_not_told_about(service_type: str) -> None:
    """A newer TXT record put straight into the manager's cache (no event fires) reaches the table
    within a few liveness intervals."""
    from zeroconf import DNSText

    with (
        WorkerAdvertiser(BASE, interfaces=LO, service_type=service_type) as adv,
        DiscoveryManager(interfaces=LO, service_type=service_type, liveness_interval_s=0.2) as dm,
    ):
        dm.wait_for(1, timeout=15)
        updates: list[WorkerInfo] = []
        dm.on_update(updates.append)
        zc = dm._zc
        record = DNSText(adv.service_name, DNS_TYPE_TXT, DNS_CLASS_IN | 0x8000, 4500, _txt(LOADED, 2**62))
        zc.loop.call_soon_threadsafe(zc.cache.async_add_records, [record])
        want = dataclasses.replace(LOADED, host="127.0.0.1")
        until(lambda: dm.discovered_workers.get(BASE.worker_id) == want, 10, "the liveness re-read")
        assert updates == [want]
