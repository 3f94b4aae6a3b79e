"""``hyperlane worker [PORT]``: serve one stage of a model on this machine's device."""

from __future__ import annotations

import argparse

__all__ = ["add_parser", "run"]


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0 µs, got {value}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0 µs, got {value}")
    return value


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    # no abbreviated options: LocalCluster reads its workers' flags (--armed-graphs / --no-armed-graphs) by name
    p = sub.add_parser("worker", help="start a worker (one per GPU)", allow_abbrev=False)
    p.add_argument(
        "port", nargs="?", type=int, default=50051, help="gRPC port (default 50051; 0 = any free port)"
    )
    p.add_argument("--data-port", type=int, default=None, help="TCP data-plane port (default PORT+1)")
    p.add_argument("--host", default="0.0.0.0", help="address to listen on (default all interfaces)")
    p.add_argument("--device", default="auto", help="cpu, cuda:N, or auto (default)")
    p.add_argument("--id", default="", help="worker id (default hostname + random suffix)")
    p.add_argument(
        "--cache-dir",
        default="",
        help="blob cache, shipped shards included (default ~/.cache/hyperlane_lab/blobs)",
    )
    p.add_argument("--no-advertise", action="store_true", help="do not register on mDNS")
    p.add_argument("--advertise-address", default=None, help="address to put in the mDNS record")
    p.add_argument(
        "--interfaces", default="all", help="mDNS interfaces: all, default, or comma-separated IPs"
    )
    p.add_argument(
        "--memory-limit-gib", type=float, default=0.0, help="memory this worker may use (0 = all free)"
    )
    p.add_argument(
        "--session-ttl", type=float, default=600.0, help="close sessions idle this many seconds (0 = never)"
    )
    p.add_argument(
        "--cpu-latency-us",
        type=_non_negative_int,
        default=None,
        help="hold a Linux PM QoS limit on CPU wake-up latency (µs; 0 = no deep C-states) while "
        "running: cuts per-hop latency on servers whose idle cores sleep deeply (needs root)",
    )
    p.add_argument(
        "--busy-poll-us",
        type=_non_negative_int,
        default=None,
        help="after each frame, poll the sockets without sleeping for up to this many µs while "
        "nothing is in flight (saves a sleeping CPU's wake-up per hop, costs a core; 0 = off, "
        "at most 1000000; default: 20000 for a CUDA worker with at least 4 usable CPUs per GPU this "
        "process can see, or of its own with --cpus, else off)",
    )
    p.add_argument(
        "--compute-spin-us",
        type=_non_negative_int,
        default=None,
        help="after each step, the compute thread waits for the next one spinning (native code, GIL "
        "released) for up to this many µs instead of sleeping, so a prompt chunk's host path runs on "
        "a warm core (costs a core while it spins; 0 = off, at most 1000000). Default: 20000 on a GPU "
        "worker whose event loop busy-polls (see --busy-poll-us) and that has at least 6 usable CPUs "
        "per GPU, else off",
    )
    p.add_argument(
        "--switch-interval-us",
        type=_positive_int,
        default=None,
        help="the process's GIL switch interval in µs (default: Python's, 5000; shorter measured "
        "slower, see bench/RESULTS.md)",
    )
    p.add_argument(
        "--cpus",
        default="",
        help="keep the worker on these CPUs: a list (0-7,16-23) or auto (a CUDA worker's share of "
        "the CPUs near its GPU, split among the GPUs this process can see, so workers on one host never "
        "share a core; with one GPU per worker in CUDA_VISIBLE_DEVICES give lists); default: any CPU",
    )
    p.add_argument(
        "--prompt-on-loop",
        action="store_true",
        default=None,
        help="GPU workers: enqueue prompt chunks whose CUDA graph is captured on the event loop, as decode "
        "steps are, saving a thread hand-off per chunk (experimental; default: HYPERLANE_PROMPT_ON_LOOP, off)",
    )
    p.add_argument(
        "--staging-pool",
        action="store_true",
        default=None,
        help="GPU workers: upload prompt chunks into device buffers kept for reuse instead of allocating one "
        "per upload (experimental; default: HYPERLANE_STAGING_POOL, off)",
    )
    p.add_argument(
        "--direct-prompt-upload",
        action="store_true",
        default=None,
        help="GPU workers: copy a prompt chunk's hidden state straight into the input of the captured prompt "
        "graph that replays it, instead of a new device buffer and a second copy (experimental; default: "
        "HYPERLANE_DIRECT_PROMPT_UPLOAD, off)",
    )
    p.add_argument(
        "--armed-graphs",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="GPU workers: enqueue a lone session's next decode step before its frame arrives, behind a "
        "kernel that waits for a flag the frame sets; for one worker per GPU (default: "
        "HYPERLANE_ARMED_GRAPHS, off; LocalCluster and `hyperlane run --workers N` turn it on when every "
        "worker has a GPU of its own)",
    )
    p.add_argument(
        "--local-ring",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="a worker holding every layer runs its token loop's next step without sending the frame to its own "
        "socket (default: HYPERLANE_LOCAL_RING, on; --no-local-ring sends it through the socket)",
    )
    p.add_argument(
        "--stripes",
        type=_positive_int,
        default=None,
        help="send tensor frames of 4 MB or more (HYPERLANE_STRIPE_FROM bytes) to the next stage split over "
        "this many connections, each written by its own thread (experimental; default: HYPERLANE_STRIPES, 1 = off)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import logging

    from hyperlane_lab.runtime.server import run_worker
    from hyperlane_lab.runtime.worker import WorkerConfig

    if args.verbose == 0:
        logging.getLogger().setLevel(logging.INFO)
    cfg = WorkerConfig(
        host=args.host,
        grpc_port=args.port,
        data_port=args.data_port,
        device=args.device,
        worker_id=args.id,
        cache_dir=args.cache_dir,
        advertise=not args.no_advertise,
        advertise_address=args.advertise_address,
        interfaces=args.interfaces,
        memory_limit=int(args.memory_limit_gib * 2**30),
        session_ttl_s=args.session_ttl,
        cpu_latency_us=args.cpu_latency_us,
        busy_poll_us=args.busy_poll_us,
        compute_spin_us=args.compute_spin_us,
        switch_interval_us=args.switch_interval_us,
        cpus=args.cpus,
        prompt_on_loop=args.prompt_on_loop,
        staging_pool=args.staging_pool,
        direct_prompt_upload=args.direct_prompt_upload,
        armed_graphs=args.armed_graphs,
        local_ring=args.local_ring,
        stripes=args.stripes,
    )
    return run_worker(cfg)
