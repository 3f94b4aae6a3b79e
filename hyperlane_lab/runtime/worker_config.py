"""A worker's configuration and what it needs to know about its machine (device, memory, the
CPU wake-up latency request)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from hyperlane_lab.runtime.frame import MAX_STRIPES
from hyperlane_lab.runtime.stripes import MIN_PART

__all__ = [
    "WorkerConfig",
    "busy_poll_window_us",
    "compute_spin_window_us",
    "device_memory",
    "hold_cpu_latency",
    "resolve_device",
]


@dataclass
class WorkerConfig:
    host: str = "0.0.0.0"  # where gRPC and the data plane listen
    grpc_port: int = 50051  # 0 = any free port
    data_port: int | None = None  # None = grpc_port + 1 (or any free port when grpc_port is 0)
    device: str = "auto"  # auto | cpu | cuda:N
    worker_id: str = ""
    cache_dir: str = ""  # blob cache (shipped shards in its shards/); default ~/.cache/hyperlane_lab/blobs
    advertise: bool = True  # register on mDNS (zeroconf)
    advertise_address: str | None = None  # address put in the mDNS record (multi-homed hosts)
    interfaces: str = "all"  # zeroconf interfaces: all | default | comma-separated IPs
    max_payload: int = 1 << 31
    memory_limit: int = 0  # bytes this worker may use (0 = the device's free memory)
    session_ttl_s: float = 600.0  # close sessions idle this long (a client died without closing)
    # ask the OS to keep CPU wake-up latency under this many µs while the worker runs (Linux PM QoS,
    # /dev/cpu_dma_latency; needs root): an idle core waking from a deep C-state can add 100+ µs to
    # every hop. None = leave the system's power management alone.
    cpu_latency_us: int | None = None
    # busy polling (see runtime/busypoll.py): after a frame, poll the sockets without sleeping for
    # up to this many µs while nothing is in flight here; saves an idle vCPU's wake-up (tens of µs
    # on VMs) per hop at the cost of a core while it spins. 0 = off (block in epoll as usual).
    # None = auto (``busy_poll_window_us``): on for a CUDA worker on a host with enough CPUs, else off
    busy_poll_us: int | None = None
    # the compute thread (runtime/hot_thread.py): for this many µs after each call it runs, wait for the
    # next one spinning in native code (GIL released) instead of sleeping, so that a prompt chunk's host
    # path runs on a warm core (bench/host_cold.py). 0 = off. None = auto (``compute_spin_window_us``): on
    # for a CUDA worker whose event loop busy-polls and that has 6 CPUs per GPU (2 x H200: +2.5-3.7 points on a
    # chunked 2-stage prompt in two A/B runs, decode unchanged; bench/gpu_notes.md, eighteenth session); costs a core
    compute_spin_us: int | None = None
    # the worker process's GIL switch interval (sys.setswitchinterval) in µs. None = Python's
    # default (5 ms). Shorter made every split pipeline slower in bench/RESULTS.md (more forced
    # GIL hand-offs between the loop and completion threads); kept for experiments.
    switch_interval_us: int | None = None
    # the CPUs this worker's threads run on (runtime/cpus.py): "" = any, "auto" = a CUDA worker's
    # share of the CPUs near its GPU (several workers on one host then never share a CPU), or a
    # list such as "0-7,16-23"
    cpus: str = ""
    # GPU workers: enqueue a prompt chunk whose CUDA graph is captured on the event loop thread (as decode
    # steps are) instead of handing it to the compute thread. None = ``HYPERLANE_PROMPT_ON_LOOP`` (default
    # off): experimental; within noise of the default on 2 H200s (bench/gpu_notes.md, twelfth session)
    prompt_on_loop: bool | None = None
    # GPU workers: upload prompt chunks and codec frames into device buffers kept for reuse (runtime/staging.py)
    # instead of a new allocation per upload. None = ``HYPERLANE_STAGING_POOL`` (default off): experimental;
    # within noise of the default on 2 H200s (bench/gpu_notes.md, twelfth session)
    staging_pool: bool | None = None
    # GPU workers: copy a prompt chunk's hidden state from its frame body straight into the input buffer of the
    # prompt graph that will replay it (one H2D copy, no device allocation, no graph input copy) when that graph
    # is captured. None = ``HYPERLANE_DIRECT_PROMPT_UPLOAD`` (default off): experimental; on 4 H200s, run as
    # A, B, B, A, it moved the chunked prompt by +0.4 points: nothing (bench/RESULTS.md, twenty-first session)
    direct_prompt_upload: bool | None = None
    # GPU workers: enqueue a session's next decode step behind a gate kernel before its frame arrives, while it
    # is the worker's only session (models/decode_armed.py); the frame then only writes pinned inputs and a
    # flag. None = ``HYPERLANE_ARMED_GRAPHS`` (default off): experimental
    armed_graphs: bool | None = None
    # a worker holding every layer runs its token loop's next step without sending the frame to its own socket:
    # the GPU completion thread enqueues it at once (outbox.ring_here). None = ``HYPERLANE_LOCAL_RING``
    # (default on); off sends it through the socket as a multi-stage ring does (for A/B runs)
    local_ring: bool | None = None
    # connections a tensor frame of ``stripe_from`` bytes or more is split over on its way to the next stage
    # (runtime/stripes.py; each written and read by its own thread). None = ``HYPERLANE_STRIPES`` (default 1,
    # off) and ``HYPERLANE_STRIPE_FROM`` (default 4 MB): experimental, for prompt hand-offs on fast links
    stripes: int | None = None
    stripe_from: int | None = None

    def __post_init__(self) -> None:
        if self.cpus not in ("", "auto"):
            from hyperlane_lab.runtime.cpus import parse_cpu_list

            parse_cpu_list(self.cpus)  # ValueError with the expected format
        if self.busy_poll_us is not None and not 0 <= self.busy_poll_us <= 1_000_000:
            raise ValueError(
                f"busy_poll_us must be 0 (off) to 1000000 µs (spinning holds a core), got {self.busy_poll_us}"
            )
        if self.compute_spin_us is not None and not 0 <= self.compute_spin_us <= 1_000_000:
            raise ValueError(
                f"compute_spin_us must be 0 (off) to 1000000 µs (spinning holds a core), got {self.compute_spin_us}"
            )
        if self.switch_interval_us is not None and self.switch_interval_us <= 0:
            raise ValueError(f"switch_interval_us must be > 0 µs, got {self.switch_interval_us}")
        if self.stripes is not None and not 1 <= self.stripes <= MAX_STRIPES:
            raise ValueError(f"stripes must be 1 (off) to {MAX_STRIPES} connections, got {self.stripes}")
        if self.stripe_from is not None and self.stripe_from < MIN_PART:
            raise ValueError(f"stripe_from must be at least {MIN_PART} bytes, got {self.stripe_from}")


AUTO_BUSY_POLL_US = 20_000  # the auto window (bench/RESULTS.md, twelfth session)
# busy polling spins two threads of a CUDA worker: its loop and its completion wait
AUTO_BUSY_POLL_CPUS_PER_GPU = 4


def _usable_cpus_per_gpu(config: WorkerConfig) -> float:
    """Usable CPUs (``cpus.usable_cpus``: the affinity, capped by a container's CPU quota) per GPU the worker
    shares them with: every GPU this process can see, or only its own when it was given CPUs of its own
    (``cpus``, pinned before the loop is made)."""
    from hyperlane_lab.runtime.cpus import usable_cpus

    gpus = 1 if config.cpus else max(1, torch.cuda.device_count())
    return usable_cpus() / gpus


def busy_poll_window_us(config: WorkerConfig) -> int:
    """The busy-polling window this worker uses: ``busy_poll_us`` when given; else (auto)
    ``AUTO_BUSY_POLL_US`` for a CUDA worker with at least ``AUTO_BUSY_POLL_CPUS_PER_GPU`` usable CPUs
    per GPU (``_usable_cpus_per_gpu``). 0 otherwise (CPU workers need their cores for compute). A worker
    started with one GPU in ``CUDA_VISIBLE_DEVICES`` cannot see the others: give it ``--cpus`` or an
    explicit ``--busy-poll-us``."""
    if config.busy_poll_us is not None:
        return config.busy_poll_us
    if resolve_device(config.device).type != "cuda":
        return 0
    return AUTO_BUSY_POLL_US if _usable_cpus_per_gpu(config) >= AUTO_BUSY_POLL_CPUS_PER_GPU else 0


AUTO_COMPUTE_SPIN_US = 20_000  # the auto window of the compute thread's spin (eighteenth session's A/B)
# a third spinning thread (the compute thread, while the loop also polls): two CPUs more than busy polling's
# rule, so at most half a GPU's CPUs spin. The A/B ran with 16 CPUs per GPU.
AUTO_COMPUTE_SPIN_CPUS_PER_GPU = AUTO_BUSY_POLL_CPUS_PER_GPU + 2


def compute_spin_window_us(config: WorkerConfig) -> int:
    """How long the compute thread spins for its next call: ``compute_spin_us`` when given; else (auto)
    ``AUTO_COMPUTE_SPIN_US`` for a CUDA worker whose event loop busy-polls (``busy_poll_window_us`` > 0, so
    ``--busy-poll-us 0`` turns both off) and that has at least ``AUTO_COMPUTE_SPIN_CPUS_PER_GPU`` usable CPUs
    per GPU; 0 otherwise."""
    if config.compute_spin_us is not None:
        return config.compute_spin_us
    if config.busy_poll_us == 0 or resolve_device(config.device).type != "cuda":
        return 0
    # enough CPUs for the spin are enough for auto busy polling too (6 >= 4): one read of the CPU budget
    return AUTO_COMPUTE_SPIN_US if _usable_cpus_per_gpu(config) >= AUTO_COMPUTE_SPIN_CPUS_PER_GPU else 0


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    d = torch.device(device)
    if d.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device} asked for, but this machine has no CUDA; use --device cpu")
        if d.index is not None and d.index >= torch.cuda.device_count():
            raise ValueError(
                f"device {device} does not exist: this machine has {torch.cuda.device_count()} GPUs"
            )
    elif d.type != "cpu":
        raise ValueError(f"unsupported device {device!r}; use cpu or cuda:N")
    return d


def _meminfo() -> tuple[int, int]:
    total = avail = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key == "MemTotal":
                total = int(rest.split()[0]) * 1024
            elif key == "MemAvailable":
                avail = int(rest.split()[0]) * 1024
    except OSError:
        pass
    return total, avail


def hold_cpu_latency(us: int) -> Any:
    """Keep a Linux PM QoS CPU-latency request of ``us`` µs for as long as the returned file stays
    open (closing it, or the process ending, withdraws it). Raises PermissionError/OSError with a
    hint when the system does not allow it."""
    if us < 0:
        raise ValueError(f"cpu latency must be >= 0 µs, got {us}")
    try:
        f = open("/dev/cpu_dma_latency", "wb", buffering=0)  # noqa: SIM115 (held open on purpose)
    except OSError as e:
        raise type(e)(
            f"cannot set a CPU wake-up latency limit ({e}); it needs Linux and write access to "
            "/dev/cpu_dma_latency (root), or drop --cpu-latency-us"
        ) from e
    f.write(int(us).to_bytes(4, "little", signed=True))
    return f


def device_memory(device: torch.device) -> tuple[int, int]:
    """(total, free) bytes of the device; host RAM for the CPU."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return int(total), int(free)
    return _meminfo()
