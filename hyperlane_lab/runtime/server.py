"""Run a worker: gRPC control plane + TCP data plane on one asyncio loop, until SIGINT/SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import threading
from typing import Any

import grpc

from hyperlane_lab.runtime.busypoll import BusyPollSelector
from hyperlane_lab.runtime.proto_gen import hyperlane_pb2_grpc as pb_grpc
from hyperlane_lab.runtime.service import WorkerService
from hyperlane_lab.runtime.worker import Worker, WorkerConfig
from hyperlane_lab.runtime.worker_config import busy_poll_window_us

__all__ = ["READY_PREFIX", "run_worker", "serve"]

log = logging.getLogger(__name__)
READY_PREFIX = "HYPERLANE_WORKER_READY"
GRPC_OPTIONS = [
    ("grpc.max_receive_message_length", 64 << 20),
    ("grpc.max_send_message_length", 64 << 20),
    ("grpc.so_reuseport", 0),
]


def _advertised_host(config: WorkerConfig) -> str:
    if config.advertise_address:
        return config.advertise_address
    if config.host not in ("0.0.0.0", "::", ""):
        return config.host
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("192.0.2.1", 9))  # no packet is sent; picks the outgoing interface
            return str(s.getsockname()[0])
    except OSError:
        return "127.0.0.1"


def _start_advertiser(worker: Worker, service: WorkerService, config: WorkerConfig) -> Any:
    try:
        from hyperlane_lab.discovery import WorkerAdvertiser, worker_info_from_reply
    except ImportError:
        log.info("discovery is not available; not advertising on mDNS")
        return None
    adv = WorkerAdvertiser(
        worker_info_from_reply(service.info()),
        interfaces=config.interfaces,
        advertise_address=config.advertise_address,
    )
    adv.start()

    def refresh() -> None:
        try:
            adv.update(worker_info_from_reply(service.info()), wait=False)
        except Exception:
            log.exception("mDNS re-announce failed")

    worker.on_change.append(refresh)
    return adv


async def serve(
    config: WorkerConfig,
    stop: asyncio.Event | None = None,
    announce: bool = True,
    selector: BusyPollSelector | None = None,
) -> None:
    """Serve until ``stop`` is set (or SIGINT/SIGTERM). ``selector``: the running loop's busy-polling
    selector, if it has one; it is told when the worker is quiet enough to spin."""
    worker = Worker(config)
    if selector is not None:
        selector.should_spin = worker.quiet
        worker.selector = selector
    qos = None
    if config.cpu_latency_us is not None:
        from hyperlane_lab.runtime.worker import hold_cpu_latency

        try:
            qos = hold_cpu_latency(config.cpu_latency_us)
            log.info("holding a CPU wake-up latency limit of %d µs", config.cpu_latency_us)
        except (OSError, ValueError) as e:
            log.warning("%s", e)
    server = grpc.aio.server(options=GRPC_OPTIONS)
    host = _advertised_host(config)
    service = WorkerService(worker, host)
    pb_grpc.add_WorkerServicer_to_server(service, server)
    bind = f"[{config.host}]" if ":" in config.host else config.host
    port = server.add_insecure_port(f"{bind}:{config.grpc_port}")
    if port == 0:
        raise OSError(f"cannot listen on {config.host}:{config.grpc_port} (port in use?); pick another port")
    worker.grpc_port = port
    await server.start()
    data_port = await worker.start_data_plane()
    advertiser = (
        await asyncio.to_thread(_start_advertiser, worker, service, config) if config.advertise else None
    )
    log.info(
        "worker %s on %s: gRPC %s:%d, data %s:%d",
        worker.worker_id,
        worker.device,
        host,
        port,
        host,
        data_port,
    )
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()

    def request_stop() -> None:
        if stop.is_set():  # a second signal: leave now
            os._exit(1)
        stop.set()
        # a compute step stuck in a kernel must not keep the process alive forever
        threading.Timer(15.0, lambda: os._exit(1)).start()

    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, request_stop)
    if announce:
        print(f"{READY_PREFIX} grpc={port} data={data_port} id={worker.worker_id}", flush=True)
    await stop.wait()
    log.info("worker %s shutting down", worker.worker_id)
    if advertiser is not None:
        await asyncio.to_thread(advertiser.stop)
    await server.stop(grace=1.0)
    await worker.stop()
    if qos is not None:
        qos.close()


def _loop_for(config: WorkerConfig) -> tuple[asyncio.AbstractEventLoop, BusyPollSelector | None]:
    """The worker's event loop (a busy-polling one, see ``busy_poll_window_us``); sets the process's GIL
    switch interval. Called from ``run_worker``: this process is the worker."""
    interval = config.switch_interval_us
    if interval is not None:
        sys.setswitchinterval(interval / 1e6)
        log.info("GIL switch interval %d µs", interval)
    window = busy_poll_window_us(config)
    if window <= 0:
        return asyncio.new_event_loop(), None
    sel = BusyPollSelector(window / 1e6)
    log.info("busy polling for frames up to %d µs after each event", window)
    return asyncio.SelectorEventLoop(sel), sel


def run_worker(config: WorkerConfig) -> int:
    from hyperlane_lab.models.decode_linear import gemv_pins

    try:  # an operator's setting: refused at start, not at the first session
        gemv_pins()
    except ValueError as e:
        print(f"hyperlane worker: {e}", file=sys.stderr)
        return 1
    if config.cpus:
        from hyperlane_lab.runtime.cpus import pin_process, resolve_cpus
        from hyperlane_lab.runtime.worker_config import resolve_device

        try:
            cpus = resolve_cpus(config.cpus, str(resolve_device(config.device)))
        except ValueError as e:
            print(f"hyperlane worker: {e}", file=sys.stderr)
            return 1
        if cpus is not None:
            pin_process(cpus)
    loop, sel = _loop_for(config)
    asyncio.set_event_loop(loop)
    try:
        loop.run_until_complete(serve(config, selector=sel))
    except OSError as e:
        print(f"hyperlane worker: {e}", file=sys.stderr)
        return 1
    finally:  # as asyncio.run does: cancel what is left, close async generators, close the loop
        try:
            left = asyncio.all_tasks(loop)
            for t in left:
                t.cancel()
            loop.run_until_complete(asyncio.gather(*left, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
        except BaseException:  # never hide the run's own outcome behind a clean-up failure
            log.exception("worker event loop clean-up failed")
        finally:
            asyncio.set_event_loop(None)
            loop.close()
    logging.shutdown()
    sys.stdout.flush()
    os._exit(0)  # don't wait for compute threads that are still busy: the worker is done
