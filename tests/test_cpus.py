"""Worker CPU pinning (runtime/cpus.py): the cpulist format, the ``auto`` shares, and real worker
processes kept on the CPUs asked for (every thread)."""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import pytest

from hyperlane_lab.runtime.cpus import MIN_CPUS, _format, auto_cpus, parse_cpu_list, share_of
from hyperlane_lab.runtime.worker_config import WorkerConfig


def test_cpu_list_round_trips_the_kernel_format():
    assert parse_cpu_list("0-3,8,10-11\n") == {0, 1, 2, 3, 8, 10, 11}
    assert parse_cpu_list(" 5 ") == {5}
    assert _format(frozenset({0, 1, 2, 3, 8, 10, 11})) == "0-3,8,10-11"
    for bad, why in (("", "names no CPU"), ("3-1", "0 <= N <= M"), ("a-b", "not N or N-M"), ("-2", "N-M")):
        with pytest.raises(ValueError, match=why):
            parse_cpu_list(bad)


def test_shares_are_disjoint_even_and_cover_every_cpu():
    cpus = frozenset(range(3, 14))  # 11 CPUs
    for peers in range(1, 6):
        shares = [share_of(cpus, peers, i) for i in range(peers)]
        assert frozenset().union(*shares) == cpus and sum(map(len, shares)) == len(cpus)
        assert max(map(len, shares)) - min(map(len, shares)) <= 1
        assert all(max(a) < min(b) for a, b in itertools.pairwise(shares))  # contiguous, in order
    with pytest.raises(ValueError, match="does not exist"):
        share_of(cpus, 2, 2)


def test_shares_keep_a_cores_hyperthreads_together():
    cpus = frozenset(range(8))  # 4 cores, siblings n and n + 4 (the usual Linux numbering)

    def siblings(c):
        return frozenset({c % 4, c % 4 + 4})

    assert [share_of(cpus, 2, i, siblings) for i in range(2)] == [
        frozenset({0, 1, 4, 5}),
        frozenset({2, 3, 6, 7}),
    ]
    assert auto_cpus(1, 4, cpus, lambda i: None, siblings) == frozenset({1, 5})
    assert auto_cpus(0, 8, cpus, lambda i: None, siblings) is None  # 8 GPUs, 4 cores: no pinning


def test_auto_splits_the_cpus_near_each_gpu_among_the_gpus_there():
    allowed = frozenset(range(64))
    numa = {0: range(0, 32), 1: range(0, 32), 2: range(32, 64), 3: range(32, 64)}

    def local(i):
        return frozenset(numa[i])

    got = [auto_cpus(i, 4, allowed, local) for i in range(4)]
    assert got == [
        frozenset(range(0, 16)),
        frozenset(range(16, 32)),
        frozenset(range(32, 48)),
        frozenset(range(48, 64)),
    ]
    # unknown locality (a VM without sysfs PCI data): even shares of every allowed CPU
    assert [auto_cpus(i, 4, allowed, lambda i: None) for i in range(4)] == [
        frozenset(range(16 * i, 16 * i + 16)) for i in range(4)
    ]
    # near CPUs this process may not use are ignored; none usable -> all allowed: here every GPU
    # ends up with CPUs 0-7 near it, so the four share them
    few = frozenset(range(8))
    assert [auto_cpus(i, 4, few, local) for i in range(4)] == [
        frozenset({2 * i, 2 * i + 1}) for i in range(4)
    ]
    # too few CPUs for every share to have MIN_CPUS: none of the four pins
    assert [auto_cpus(i, 4, frozenset(range(MIN_CPUS * 4 - 1)), lambda i: None) for i in range(4)] == [
        None
    ] * 4


def test_worker_config_rejects_a_bad_cpu_list():
    assert WorkerConfig(cpus="auto").cpus == "auto"
    with pytest.raises(ValueError, match="not N or N-M"):
        WorkerConfig(cpus="zero")


def _thread_cpus(pid: int) -> set[frozenset[int]]:
    """The distinct CPU sets of every thread of process ``pid``."""
    out = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        for line in (task / "status").read_text().splitlines():
            if line.startswith("Cpus_allowed_list:"):
                out.add(parse_cpu_list(line.split(":", 1)[1]))
    return out


@pytest.mark.multiprocess
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc")
def test_workers_run_on_the_cpus_asked_for(tmp_path):
    from hyperlane_lab.runtime import LocalCluster
    from hyperlane_lab.runtime.control import WorkerClient
    from hyperlane_lab.runtime.proto_gen import hyperlane_pb2 as pb

    allowed = sorted(os.sched_getaffinity(0))
    one = allowed[-1]
    with (
        LocalCluster(1, cache_dir=tmp_path / "a", cpus=str(one)) as pinned,
        LocalCluster(1, cache_dir=tmp_path / "b", cpus="auto") as cpu_auto,
    ):
        for cl in (pinned, cpu_auto):  # both serve
            c = WorkerClient(cl.addresses[0])
            try:
                assert c.call("Info", pb.InfoRequest()).worker_id == cl.worker_ids[0]
            finally:
                c.close()
        # every thread of the pinned worker (event loop, gRPC, compute, ...) is on that one CPU
        assert _thread_cpus(pinned.procs[0].pid) == {frozenset({one})}
        assert f"pinned to CPUs {one}" in pinned.log_path(0).read_text()
        # "auto" pins CUDA workers only: a CPU worker keeps every CPU it was started with
        assert _thread_cpus(cpu_auto.procs[0].pid) == {frozenset(allowed)}
