"""Which CPUs a worker process runs on (``hyperlane worker --cpus``).

Several workers on one host (one per GPU) hand hidden states to each other over loopback TCP. Linux
wakes a reader on the writer's CPU when it can ("wake-affine": the socket's wake-up says the writer
will sleep soon), so the next stage's event loop often starts reading a prompt-sized frame only
after the previous stage's ``sendmsg`` has copied all of it: the two copies run one after the other
instead of side by side. Workers kept on disjoint CPUs cannot be woken onto each other's CPU.

``--cpus auto`` gives a CUDA worker an even share of the CPUs near its GPU (the GPU's PCI
``local_cpulist`` in sysfs, else every CPU the process may use), shared with the other GPUs that
have the same CPUs near them, in device order, in whole cores (a core's hyperthreads stay in one
share); ``--cpus 0-7,16-23`` names them. Linux only. ``auto`` counts the GPUs this process can see:
workers started with one GPU each in ``CUDA_VISIBLE_DEVICES`` cannot see each other, so give them
explicit lists instead.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable
from pathlib import Path

__all__ = [
    "MIN_CPUS",
    "auto_cpus",
    "parse_cpu_list",
    "pin_process",
    "resolve_cpus",
    "share_of",
    "usable_cpus",
]

log = logging.getLogger(__name__)

MIN_CPUS = 2  # an event loop, a compute and a completion thread: fewer than this is not worth pinning


def usable_cpus(cgroup: Path = Path("/sys/fs/cgroup/cpu.max")) -> int:
    """CPUs this process can keep busy: those it may run on, capped by a cgroup v2 CPU quota (a
    container's ``--cpus``) when there is one."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    with contextlib.suppress(OSError, ValueError):
        quota, period = cgroup.read_text().split()[:2]
        if quota != "max":
            n = min(n, max(1, int(quota) // int(period)))
    return n


def parse_cpu_list(text: str) -> frozenset[int]:
    """``"0-3,8,10-11"`` (the kernel's cpulist format) -> {0, 1, 2, 3, 8, 10, 11}."""
    cpus: set[int] = set()
    for part in text.strip().split(","):
        part = part.strip()
        if not part:
            continue
        lo, sep, hi = part.partition("-")
        try:
            a, b = int(lo), int(hi) if sep else int(lo)
        except ValueError:
            raise ValueError(f"bad CPU list {text!r}: {part!r} is not N or N-M (e.g. 0-7,16-23)") from None
        if a < 0 or b < a:
            raise ValueError(f"bad CPU list {text!r}: {part!r} is not a range N-M with 0 <= N <= M")
        cpus.update(range(a, b + 1))
    if not cpus:
        raise ValueError(f"bad CPU list {text!r}: it names no CPU (e.g. 0-7,16-23)")
    return frozenset(cpus)


def share_of(
    cpus: frozenset[int],
    peers: int,
    index: int,
    siblings: Callable[[int], frozenset[int]] | None = None,
) -> frozenset[int]:
    """The ``index``-th of ``peers`` even shares of ``cpus``, made of whole cores: ``siblings(c)`` = the
    hardware threads of CPU c's core (None: every CPU its own core). Cores go in order of their lowest
    CPU, contiguous runs per share; the first ``cores % peers`` shares get one core more."""
    if not 0 <= index < peers:
        raise ValueError(f"share {index} of {peers} does not exist")
    cores = sorted({(siblings(c) & cpus) | {c} if siblings else frozenset({c}) for c in cpus}, key=min)
    size, extra = divmod(len(cores), peers)
    start = index * size + min(index, extra)
    return frozenset().union(*cores[start : start + size + (1 if index < extra else 0)])


def _siblings(cpu: int) -> frozenset[int]:
    """The hardware threads sharing CPU ``cpu``'s core (sysfs ``thread_siblings_list``), or {cpu}."""
    path = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list")
    try:
        return parse_cpu_list(path.read_text())
    except (OSError, ValueError):
        return frozenset({cpu})


def _gpu_local_cpus(index: int) -> frozenset[int] | None:
    """The CPUs sysfs lists as near CUDA device ``index`` (its PCI ``local_cpulist``), or None."""
    import torch

    p = torch.cuda.get_device_properties(index)
    domain, bus, dev = (getattr(p, f"pci_{k}_id", None) for k in ("domain", "bus", "device"))
    if bus is None or dev is None:
        return None
    path = Path(f"/sys/bus/pci/devices/{domain or 0:04x}:{bus:02x}:{dev:02x}.0/local_cpulist")
    try:
        return parse_cpu_list(path.read_text())
    except (OSError, ValueError):
        return None


def auto_cpus(
    index: int,
    count: int,
    allowed: frozenset[int],
    local: Callable[[int], frozenset[int] | None],
    siblings: Callable[[int], frozenset[int]] | None = None,
) -> frozenset[int] | None:
    """``--cpus auto`` for CUDA device ``index`` of ``count``: its share (whole cores, see ``share_of``)
    of the ``allowed`` CPUs near it (``local(i)``: the CPUs near device i, None = unknown), split with
    the devices that have the same CPUs near them; None when a share would have fewer than
    ``MIN_CPUS`` CPUs (then none of them pins)."""

    def near(i: int) -> frozenset[int]:
        cpus = local(i)
        return ((cpus & allowed) or allowed) if cpus is not None else allowed

    mine = near(index)
    peers = [i for i in range(count) if near(i) == mine]
    shares = [share_of(mine, len(peers), k, siblings) for k in range(len(peers))]
    if min(map(len, shares)) < MIN_CPUS:
        return None
    return shares[peers.index(index)]


def resolve_cpus(spec: str, device: str) -> frozenset[int] | None:
    """The CPUs ``--cpus spec`` means for a worker on ``device`` (a resolved ``cpu`` / ``cuda:N``);
    None = do not pin. Raises ValueError for CPUs this process may not use."""
    if not spec:
        return None
    allowed = frozenset(os.sched_getaffinity(0))
    if spec == "auto":
        if not device.startswith("cuda"):
            log.info("--cpus auto: pins CUDA workers only; this one (%s) runs on any CPU", device)
            return None
        import torch

        index = int(device.partition(":")[2] or 0)
        cpus = auto_cpus(index, torch.cuda.device_count(), allowed, _gpu_local_cpus, _siblings)
        if cpus is None:
            log.info("--cpus auto: fewer than %d CPUs per GPU here; not pinning", MIN_CPUS)
        return cpus
    cpus = parse_cpu_list(spec)
    if not cpus <= allowed:
        raise ValueError(
            f"--cpus {spec}: CPUs {sorted(cpus - allowed)} are not available to this process "
            f"(it may use {_format(allowed)})"
        )
    return cpus


def pin_process(cpus: frozenset[int]) -> None:
    """Keep every thread of this process (and those it starts later) on ``cpus``."""
    tasks = Path("/proc/self/task")
    tids = [int(t) for t in os.listdir(tasks)] if tasks.is_dir() else [0]
    for tid in tids:
        with contextlib.suppress(ProcessLookupError):  # a thread that ended meanwhile
            os.sched_setaffinity(tid, cpus)
    log.info("pinned to CPUs %s", _format(cpus))


def _format(cpus: frozenset[int]) -> str:
    """{0, 1, 2, 5} -> "0-2,5"."""
    out, order = [], sorted(cpus)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and order[j + 1] == order[j] + 1:
            j += 1
        out.append(f"{order[i]}-{order[j]}" if j > i else str(order[i]))
        i = j + 1
    return ",".join(out)
