"""Discovery over real multicast between network namespaces, and self-tests of the netns harness."""

from __future__ import annotations

import dataclasses
import json
import subprocess
from collections.abc import Iterator

import pytest

from hyperlane_lab.types import WorkerInfo

try:
    from tests.netns import LineReader, NetnsLab, netem_available, netns_available
except ImportError:  # tests/ is on sys.path (pytest's default rootdir handling), not the repo root
    from netns import LineReader, NetnsLab, netem_available, netns_available  # type: ignore[no-redef]

pytestmark = pytest.mark.netns


@pytest.fixture
def require_netns() -> Iterator[None]:
    ok, why = netns_available()
    if not ok:
        pytest.skip(f"netns tests need root + iproute2 + namespaces: {why}")
    yield


def _netns_names() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


TCP_SERVER = """
import socket, sys, time
srv = socket.create_server((sys.argv[1], int(sys.argv[2])))
srv.settimeout(30)
print("READY", flush=True)
conn, _ = srv.accept()
conn.settimeout(30)
n, t0 = 0, None
while True:
    chunk = conn.recv(1 << 16)
    if t0 is None:
        t0 = time.monotonic()
    if not chunk:
        break
    n += len(chunk)
conn.sendall(str(n).encode())
conn.close()
"""

TCP_CLIENT = """
import socket, sys, time
nbytes = int(sys.argv[3])
t0 = time.monotonic()
c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=30)
t_conn = time.monotonic() - t0
t1 = time.monotonic()
c.sendall(b"x" * nbytes)
c.shutdown(socket.SHUT_WR)
reply = c.recv(64).decode()
print(reply, t_conn, time.monotonic() - t1)
"""


def _transfer(lab: NetnsLab, src: int, dst: int, nbytes: int, port: int = 40123) -> tuple[int, float, float]:
    """Send ``nbytes`` over TCP from host src to host dst: (bytes the receiver counted, connect s, transfer s)."""
    server = lab.python_popen(dst, TCP_SERVER, args=[lab.ip(dst), str(port)])
    LineReader(server).expect(lambda line: line == "READY", timeout=20)
    out = lab.python(src, TCP_CLIENT, args=[lab.ip(dst), str(port), str(nbytes)], timeout=60).stdout.split()
    server.wait(timeout=20)
    return int(out[0]), float(out[1]), float(out[2])


def test_lab_connects_hosts_isolates_and_cleans_up(require_netns: None) -> None:
    with NetnsLab(2) as lab:
        names = {*lab.namespaces, lab.bridge_ns}
        assert names <= _netns_names()
        addrs = lab.run(0, ["ip", "-4", "-br", "addr", "show", "dev", "eth0"]).stdout
        assert "10.77.0.1/24" in addrs
        received, _, _ = _transfer(lab, 0, 1, 100_000)
        assert received == 100_000
        # nothing of the lab leaks into the root namespace
        root = subprocess.run(["ip", "-4", "-br", "addr"], capture_output=True, text=True, timeout=10).stdout
        assert "10.77.0." not in root
        sleeper = lab.popen(1, ["sleep", "30"])
    assert not names & _netns_names()
    assert sleeper.poll() is not None  # processes started in the lab were stopped

    with pytest.raises(RuntimeError, match="boom"), NetnsLab(1) as lab2:  # cleanup also after a failure
        names2 = {*lab2.namespaces, lab2.bridge_ns}
        raise RuntimeError("boom")
    assert not names2 & _netns_names()


def test_rate_shaping_limits_throughput(require_netns: None) -> None:
    nbytes, rate_bps = 1_500_000, 8e6
    with NetnsLab(2) as lab:
        shaped = lab.shape(0, rate="8mbit", direction="egress")
        qdiscs = lab.run(0, ["tc", "qdisc", "show", "dev", "eth0"]).stdout
        assert shaped["qdisc"] in qdiscs
        received, _, seconds = _transfer(lab, 0, 1, nbytes)
    assert received == nbytes
    # Lower bound only (a slow machine can only make it slower): bytes beyond the bucket's burst
    # cannot leave faster than the rate.
    floor = (nbytes - int(shaped["burst_bytes"])) * 8 / rate_bps
    assert seconds >= 0.9 * floor, (
        f"{nbytes} B took {seconds:.3f} s, faster than 8 Mbit/s allows ({floor:.3f} s)"
    )


def test_delay_shaping_adds_latency(require_netns: None) -> None:
    ok, why = netem_available()
    if not ok:
        pytest.skip(f"delay shaping needs netem: {why}")
    with NetnsLab(2) as lab:
        lab.shape(0, delay="40ms", rate="1gbit")  # both directions: a round trip crosses 40 ms twice
        _, connect_s, _ = _transfer(lab, 0, 1, 1000)
    assert connect_s >= 0.9 * 0.080, f"TCP connect took {connect_s * 1e3:.1f} ms, below the 80 ms shaped RTT"


ADVERTISER = """
import json, select, sys
from hyperlane_lab.discovery import WorkerAdvertiser
from hyperlane_lab.types import WorkerInfo
info = WorkerInfo(**json.loads(sys.argv[1]))
adv = WorkerAdvertiser(info, interfaces=json.loads(sys.argv[2]), service_type=sys.argv[3], ttl_s=int(sys.argv[4]))
adv.start()
print("READY", ",".join(adv.addresses), flush=True)
select.select([sys.stdin], [], [], 60)  # until the test closes stdin (bounded)
adv.stop()
print("STOPPED", flush=True)
"""

BROWSER = """
import dataclasses, json, select, sys
from hyperlane_lab.discovery import DiscoveryManager
dm = DiscoveryManager(interfaces=json.loads(sys.argv[1]), service_type=sys.argv[2],
                      resolve_timeout_s=1.0, liveness_interval_s=0.5)
dm.on_remove(lambda w: print(json.dumps({"removed": w.worker_id}), flush=True))
with dm:
    found = dm.wait_for(int(sys.argv[3]), timeout=30)
    print(json.dumps({"found": [dataclasses.asdict(w) for w in found]}), flush=True)
    select.select([sys.stdin], [], [], 60)
"""


@pytest.mark.slow
def test_mdns_discovery_between_namespaces(require_netns: None) -> None:
    """Advertisers in hosts 0 and 1, a DiscoveryManager in host 2: found over real multicast; a goodbye
    and a silent death (SIGKILL, short TTL) both remove the worker."""
    service_type = "_hlnetns._tcp.local."  # the lab is a private segment: no other traffic to avoid
    infos = [
        WorkerInfo(
            worker_id=f"ns-worker-{i}",
            host="0.0.0.0",
            grpc_port=50051,
            data_port=50052,
            device_kind="cuda",
            gpu_name=f"Fake GPU {i}",
            total_memory=(24 + 56 * i) * 2**30,
            free_memory=(20 + 50 * i) * 2**30,
            compute_capability="8.9" if i == 0 else "9.0",
            host_ram=64 * 2**30,
            flops=1e14 * (i + 1),
            mem_bw=1e12,
            device="cuda:0",
        )
        for i in range(2)
    ]
    with NetnsLab(3) as lab:
        interfaces = ["all", [lab.ip(1)]]  # host 0 picks its address itself, host 1 is told
        advertisers = [
            lab.python_popen(
                i,
                ADVERTISER,
                args=[json.dumps(dataclasses.asdict(infos[i])), json.dumps(interfaces[i]), service_type, "2"],
            )
            for i in range(2)
        ]
        for i, proc in enumerate(advertisers):
            line = LineReader(proc).expect(lambda s: s.startswith("READY"), timeout=30)
            assert line == f"READY {lab.ip(i)}"
        browser = lab.python_popen(2, BROWSER, args=[json.dumps("all"), service_type, "2"])
        events = LineReader(browser)
        found = json.loads(events.expect(lambda s: s.startswith('{"found"'), timeout=40))["found"]
        want = [dataclasses.asdict(dataclasses.replace(infos[i], host=lab.ip(i))) for i in range(2)]
        assert found == want

        # graceful stop: goodbye packets
        assert advertisers[0].stdin is not None
        advertisers[0].stdin.close()
        assert json.loads(events.expect(lambda s: "removed" in s, timeout=15)) == {"removed": "ns-worker-0"}
        # silent death: no goodbye; the 2 s TTL lapses and the liveness query goes unanswered
        advertisers[1].kill()
        advertisers[1].wait(timeout=10)
        assert json.loads(events.expect(lambda s: "removed" in s, timeout=30)) == {"removed": "ns-worker-1"}
