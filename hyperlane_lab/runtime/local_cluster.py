"""LocalCluster: n real worker processes on this machine (127.0.0.1, free ports), for tests,
notebooks and the demo. Torn down on exit, on error, and when the parent process dies."""

from __future__ import annotations

import ctypes
import logging
import os
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path

from hyperlane_lab.models.decode_linear import env_flag
from hyperlane_lab.runtime.server import READY_PREFIX

__all__ = ["LocalCluster", "armed_choice"]

log = logging.getLogger(__name__)


def _die_with_parent() -> None:  # runs in the child between fork and exec (Linux)
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _default_devices(n: int) -> list[str]:
    try:
        import torch

        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    except ImportError:
        count = 0
    return [f"cuda:{i % count}" if count else "cpu" for i in range(n)]


_ARMED_FLAGS = ("--armed-graphs", "--no-armed-graphs")  # the worker's switch, by its full names


def armed_choice(devices: Sequence[str], args: Sequence[str], environ: Mapping[str, str]) -> bool:
    """Whether the workers arm decode steps (models/decode_armed.py). Never without a CUDA worker or on a
    host without ordered stores (not x86-64): nothing would arm. Otherwise, asked for (``--armed-graphs``,
    ``HYPERLANE_ARMED_GRAPHS=1``) or refused (``--no-armed-graphs``, ``=0``): as told. Unset: on when every
    worker has a CUDA device of its own, the deployment armed steps are for (a waiting gate holds its GPU's
    compute stream, so workers sharing a GPU would time-slice against it), or when they share GPUs through the
    CUDA Multi-Process Service (``mps_active``: their kernels then run side by side, a gate beside a step)."""
    from hyperlane_lab.models.decode_armed import host_orders_stores  # imports torch

    cuda = [_gpu_name(d) for d in devices if d.startswith("cuda")]
    if not cuda or not host_orders_stores():  # nothing would arm: CPU workers, or no ordered stores
        return False
    said = [a for a in args if a in _ARMED_FLAGS]
    if said:
        return said[-1] == "--armed-graphs"  # the worker's parser keeps the last (no abbreviations)
    if environ.get("HYPERLANE_ARMED_GRAPHS") is not None:
        return env_flag("HYPERLANE_ARMED_GRAPHS", False, environ)
    return len(cuda) == len(devices) and (len(set(cuda)) == len(cuda) or mps_active(environ))


def mps_active(environ: Mapping[str, str]) -> bool:
    """Whether CUDA processes started with ``environ`` reach a running MPS control daemon (its ``control`` socket in
    ``CUDA_MPS_PIPE_DIRECTORY``, default ``/tmp/nvidia-mps``, takes a connection). Several workers on one GPU then share one context
    and run kernels concurrently instead of time-slicing (``bench/with_mps.sh`` starts one for a command)."""
    path = os.path.join(environ.get("CUDA_MPS_PIPE_DIRECTORY") or "/tmp/nvidia-mps", "control")
    if not os.path.exists(path):
        return False
    try:  # a socket left behind by a daemon that died refuses the connection
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(0.5)
            s.connect(path)
    except OSError:
        return False
    return True


def _gpu_name(device: str) -> str:
    return "cuda:0" if device == "cuda" else device


def _stop_processes(procs: list[subprocess.Popen[bytes]], timeout: float = 10.0) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for p in procs:
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)


class LocalCluster:
    def __init__(
        self,
        n: int,
        devices: Sequence[str] | None = None,
        host: str = "127.0.0.1",
        cache_dir: str | os.PathLike[str] | None = None,
        advertise: bool = False,
        threads_per_worker: int = 1,
        startup_timeout: float = 60.0,
        extra_args: Sequence[str] = (),
        env: dict[str, str] | None = None,
        cpus: str = "",
    ) -> None:
        """``cpus``: every worker's ``--cpus`` ("auto": each CUDA worker on its own share of the
        CPUs near its GPU; "" = any CPU). Armed decode steps are on when every worker has a GPU of its
        own (``armed_choice``; ``extra_args=["--no-armed-graphs"]`` turns them off)."""
        if n < 1:
            raise ValueError(f"a LocalCluster needs at least one worker, got {n}")
        self.n = n
        self.devices = list(devices) if devices else _default_devices(n)
        if len(self.devices) != n:
            raise ValueError(f"{n} workers but {len(self.devices)} devices given")
        self.host, self.advertise, self.threads = host, advertise, threads_per_worker
        self.startup_timeout, self.extra_args, self.env = startup_timeout, list(extra_args), env or {}
        if cpus:
            self.extra_args += ["--cpus", cpus]
        workers_env = {**os.environ, **self.env}
        gpus = [_gpu_name(d) for d in self.devices if d.startswith("cuda")]
        shared = sorted({d for d in gpus if gpus.count(d) > 1})
        self.armed = armed_choice(self.devices, self.extra_args, workers_env)
        told = any(a in _ARMED_FLAGS for a in self.extra_args)
        if self.armed and not told:  # the default (or the environment's) made explicit for the workers
            self.extra_args.append("--armed-graphs")
        if self.armed and shared and not mps_active(workers_env):
            log.warning(
                "armed decode steps with several workers on %s: their waiting gate kernels time-slice the "
                "GPU against each other (correct, slower); give each worker its own GPU",
                ", ".join(shared),
            )
        self._tmp = Path(tempfile.mkdtemp(prefix="hyperlane-cluster-"))
        self.cache_dir = Path(cache_dir) if cache_dir else self._tmp / "cache"
        self.procs: list[subprocess.Popen[bytes]] = []
        self.addresses: list[str] = []
        self.data_ports: list[int] = []
        self.worker_ids: list[str] = []
        self._finalizer = weakref.finalize(self, LocalCluster._cleanup, self.procs, self._tmp)

    @staticmethod
    def _cleanup(procs: list[subprocess.Popen[bytes]], tmp: Path) -> None:
        _stop_processes(procs)
        shutil.rmtree(tmp, ignore_errors=True)

    def log_path(self, i: int) -> Path:
        return self._tmp / f"worker-{i}.log"

    def start(self) -> LocalCluster:
        tag = uuid.uuid4().hex[:6]
        env = {**os.environ, "OMP_NUM_THREADS": str(self.threads), "PYTHONUNBUFFERED": "1", **self.env}
        for i, dev in enumerate(self.devices):
            cmd = [
                sys.executable,
                "-m",
                "hyperlane_lab.cli.main",
                "-v",
                "worker",
                "0",
                "--host",
                self.host,
                "--data-port",
                "0",
                "--device",
                dev,
                "--cache-dir",
                str(self.cache_dir),
                "--id",
                f"local{i}-{tag}",
                *([] if self.advertise else ["--no-advertise"]),
                *self.extra_args,
            ]
            logf = open(self.log_path(i), "wb")  # noqa: SIM115 - owned by the child
            p = subprocess.Popen(
                cmd,
                stdout=subprocess.PIPE,
                stderr=logf,
                stdin=subprocess.DEVNULL,
                env=env,
                preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
            )
            logf.close()
            self.procs.append(p)
        try:
            for i, p in enumerate(self.procs):
                grpc_port, data_port, wid = self._wait_ready(i, p)
                self.addresses.append(f"{self.host}:{grpc_port}")
                self.data_ports.append(data_port)
                self.worker_ids.append(wid)
        except BaseException:
            self.stop()
            raise
        log.info(
            "local cluster up: %s%s", ", ".join(self.addresses), "; decode steps armed" if self.armed else ""
        )
        return self

    def _wait_ready(self, i: int, p: subprocess.Popen[bytes]) -> tuple[int, int, str]:
        assert p.stdout is not None
        sel = selectors.DefaultSelector()
        sel.register(p.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + self.startup_timeout
        buf = b""
        while time.monotonic() < deadline:
            if p.poll() is not None:
                raise RuntimeError(f"worker {i} exited with code {p.returncode}:\n{self._tail(i)}")
            if sel.select(timeout=0.2):
                chunk = os.read(p.stdout.fileno(), 4096)
                buf += chunk
                for line in buf.decode(errors="replace").splitlines():
                    if line.startswith(READY_PREFIX):
                        fields = dict(kv.split("=", 1) for kv in line.split()[1:])
                        threading.Thread(target=self._drain, args=(p,), daemon=True).start()
                        return int(fields["grpc"]), int(fields["data"]), fields["id"]
        raise TimeoutError(
            f"worker {i} did not become ready within {self.startup_timeout:.0f}s:\n{self._tail(i)}"
        )

    @staticmethod
    def _drain(p: subprocess.Popen[bytes]) -> None:
        assert p.stdout is not None
        for _ in iter(lambda: p.stdout.read(4096), b""):  # type: ignore[union-attr]
            pass

    def _tail(self, i: int, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path(i).read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def stop_worker(self, i: int) -> None:
        _stop_processes([self.procs[i]])

    def stop(self) -> None:
        _stop_processes(self.procs)

    def close(self) -> None:
        self._finalizer()

    @property
    def alive(self) -> list[bool]:
        return [p.poll() is None for p in self.procs]

    def __enter__(self) -> LocalCluster:
        return self.start() if not self.procs else self

    def __exit__(self, *exc: object) -> None:
        self.close()
