"""Network-namespace lab for tests: N hosts on one virtual Ethernet segment, with real multicast.

    from tests.netns import NetnsLab, netns_available   # or `from netns import ...`

    ok, why = netns_available()
    with NetnsLab(3) as lab:                 # hosts 10.77.0.1 .. 10.77.0.3 (lab.ip(i))
        lab.shape(0, rate="1gbit")           # tc on host 0's link (netem when the kernel has it)
        p = lab.python_popen(0, CODE, args=["x"])   # `ip netns exec <ns> python -c CODE x`
        r = lab.run(2, ["ip", "-br", "addr"])       # CompletedProcess
    # every namespace, veth, bridge and process of the lab is gone here, even after an exception

Topology: one namespace per host (``<tag>-h<i>``) whose ``eth0`` is a veth into a bridge that lives
in its own namespace (``<tag>-br``), so the host's root namespace and interfaces are never touched.
``<tag>`` is ``hlt<pid>x<random>``: parallel runs never clash, and namespaces left by a dead run
(its pid gone) are deleted by the next lab. IGMP snooping is off on the bridge and each host has
``224.0.0.0/4 dev eth0``, so mDNS (224.0.0.251:5353) reaches every host.
"""

from __future__ import annotations

import contextlib
import functools
import os
import queue
import re
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

__all__ = ["LineReader", "NetnsLab", "netem_available", "netns_available"]

REPO_ROOT = Path(__file__).resolve().parents[1]
PREFIX = "hlt"
_CMD_TIMEOUT_S = 15.0


def _ip(*args: str, timeout: float = _CMD_TIMEOUT_S, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise RuntimeError(f"`ip {' '.join(args)}` failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def _netns_list() -> list[str]:
    out = _ip("netns", "list", check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


@functools.lru_cache(maxsize=1)
def netns_available() -> tuple[bool, str]:
    """(True, "") when this process can build a lab: root, iproute2, netns + veth + bridge support."""
    if os.name != "posix" or not sys.platform.startswith("linux"):
        return False, "network namespaces need Linux"
    if os.geteuid() != 0:
        return False, "network namespaces need root (run the netns tests as root)"
    if shutil.which("ip") is None:
        return False, "`ip` (iproute2) is not installed: apt-get install -y iproute2"
    probe = f"{PREFIX}{os.getpid()}xprobe-p"
    try:
        _ip("netns", "add", probe)
        try:
            _ip("-n", probe, "link", "add", "br0", "type", "bridge")
            _ip("-n", probe, "link", "add", "v0", "type", "veth", "peer", "name", "v1")
        finally:
            _ip("netns", "del", probe, check=False)
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
        return False, f"cannot create a network namespace with a bridge and veth pair here: {exc}"
    return True, ""


@functools.lru_cache(maxsize=1)
def netem_available() -> tuple[bool, str]:
    """(True, "") when the kernel has the netem qdisc (needed for delay/jitter/loss shaping)."""
    ok, why = netns_available()
    if not ok:
        return ok, why
    probe = f"{PREFIX}{os.getpid()}xnetem-p"
    try:
        _ip("netns", "add", probe)
        try:
            _ip("-n", probe, "link", "add", "v0", "type", "veth", "peer", "name", "v1")
            proc = subprocess.run(
                [
                    "ip",
                    "netns",
                    "exec",
                    probe,
                    "tc",
                    "qdisc",
                    "add",
                    "dev",
                    "v0",
                    "root",
                    "netem",
                    "delay",
                    "1ms",
                ],
                capture_output=True,
                text=True,
                timeout=_CMD_TIMEOUT_S,
            )
        finally:
            _ip("netns", "del", probe, check=False)
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
        return False, f"cannot probe netem: {exc}"
    if proc.returncode != 0:
        return False, f"this kernel has no netem qdisc (sch_netem): {proc.stderr.strip()}"
    return True, ""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def cleanup_stale(prefix: str = PREFIX) -> list[str]:
    """Delete lab namespaces whose creating process is gone (a run that was SIGKILLed). Returns them."""
    pattern = re.compile(rf"^{re.escape(prefix)}(\d+)x[0-9a-z]+-")
    removed = []
    for name in _netns_list():
        m = pattern.match(name)
        if m and not _pid_alive(int(m.group(1))):
            _kill_netns_pids(name)
            _ip("netns", "del", name, check=False)
            removed.append(name)
    return removed


def _kill_netns_pids(name: str) -> None:
    """SIGKILL the processes inside one of our lab namespaces (only ever ours: its name is unique)."""
    out = _ip("netns", "pids", name, check=False).stdout
    for pid in (int(p) for p in out.split() if p.isdigit()):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _rate_bits(rate: str) -> float:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(bit|kbit|mbit|gbit|tbit)?", rate.strip().lower())
    if not m:
        raise ValueError(f"rate {rate!r} is not like '100mbit' or '1gbit'")
    scale = {None: 1, "bit": 1, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9, "tbit": 1e12}[m.group(2)]
    return float(m.group(1)) * scale


class LineReader:
    """Reads a subprocess's stdout lines on a thread so a test can wait for one with a timeout."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self._q: queue.Queue[str | None] = queue.Queue()
        self._thread = threading.Thread(target=self._pump, daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._q.put(line.rstrip("\n"))
        self._q.put(None)

    def expect(self, predicate: Callable[[str], bool], timeout: float) -> str:
        """The first new line satisfying ``predicate``; TimeoutError (with what was seen) otherwise."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                line = self._q.get(timeout=remaining)
            except queue.Empty:
                break
            if line is None:
                raise EOFError(
                    f"process exited ({self.proc.poll()}) before the expected line; saw {self.lines}"
                )
            self.lines.append(line)
            if predicate(line):
                return line
        raise TimeoutError(f"no expected line within {timeout:g} s; saw {self.lines}")


class NetnsLab:
    """``n_hosts`` namespaces on one bridge, addressed ``<subnet>.1`` .. ``<subnet>.n`` /24."""

    def __init__(self, n_hosts: int, subnet: str = "10.77.0", prefix: str = PREFIX) -> None:
        if not 1 <= n_hosts <= 200:
            raise ValueError(f"NetnsLab supports 1..200 hosts, got {n_hosts}")
        if not re.fullmatch(r"10\.\d{1,3}\.\d{1,3}", subnet):
            raise ValueError(f"subnet {subnet!r} must be a private '10.x.y' prefix")
        self.n_hosts = n_hosts
        self.subnet = subnet
        self.prefix = prefix
        self.tag = f"{prefix}{os.getpid()}x{secrets.token_hex(3)}"
        self.bridge_ns = f"{self.tag}-br"
        self.namespaces = [f"{self.tag}-h{i}" for i in range(n_hosts)]
        self._created: list[str] = []
        self._procs: list[subprocess.Popen[str]] = []
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ build / teardown

    def ip(self, i: int) -> str:
        return f"{self.subnet}.{i + 1}"

    def ns(self, i: int) -> str:
        return self.namespaces[i]

    def __enter__(self) -> NetnsLab:
        ok, why = netns_available()
        if not ok:
            raise RuntimeError(f"NetnsLab unavailable: {why}")
        cleanup_stale(self.prefix)
        try:
            self._build()
        except BaseException:
            self.cleanup()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()

    def _add_ns(self, name: str) -> None:
        _ip("netns", "add", name)
        self._created.append(name)
        _ip("-n", name, "link", "set", "lo", "up")

    def _build(self) -> None:
        br = self.bridge_ns
        self._add_ns(br)
        # No IGMP snooping: without a querier on the segment it could stop forwarding multicast.
        _ip("-n", br, "link", "add", "br0", "type", "bridge", "mcast_snooping", "0")
        _ip("-n", br, "link", "set", "br0", "up")
        for i, ns in enumerate(self.namespaces):
            self._add_ns(ns)
            _ip("-n", br, "link", "add", f"p{i}", "type", "veth", "peer", "name", "eth0", "netns", ns)
            _ip("-n", br, "link", "set", f"p{i}", "master", "br0")
            _ip("-n", br, "link", "set", f"p{i}", "up")
            _ip("-n", ns, "addr", "add", f"{self.ip(i)}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "multicast", "on", "up")
            _ip("-n", ns, "route", "add", "224.0.0.0/4", "dev", "eth0")

    def cleanup(self) -> None:
        """Stop our processes, then delete our namespaces (and with them the veths and bridge)."""
        with self._lock:
            procs, self._procs = self._procs, []
            created, self._created = self._created, []
        for p in procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):  # each was started in its own session/group
                    os.killpg(p.pid, signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=3)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=5)
        for name in reversed(created):
            _kill_netns_pids(name)
            _ip("netns", "del", name, check=False)

    # ------------------------------------------------------------------ running things inside

    def _exec_argv(self, i: int, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.ns(i), *argv]

    @staticmethod
    def _env(extra: dict[str, str] | None) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
        env["PYTHONUNBUFFERED"] = "1"
        env.update(extra or {})
        return env

    def run(
        self,
        i: int,
        argv: Sequence[str],
        timeout: float = 30.0,
        check: bool = True,
        input: str | None = None,
        env: dict[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` inside host ``i``'s namespace and wait (bounded by ``timeout``)."""
        proc = subprocess.run(
            self._exec_argv(i, argv),
            capture_output=True,
            text=True,
            timeout=timeout,
            input=input,
            env=self._env(env),
        )
        if check and proc.returncode != 0:
            raise RuntimeError(
                f"{list(argv)} in {self.ns(i)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
            )
        return proc

    def popen(self, i: int, argv: Sequence[str], env: dict[str, str] | None = None) -> subprocess.Popen[str]:
        """Start ``argv`` in host ``i``'s namespace (stdin/stdout pipes, text); killed at cleanup."""
        proc = subprocess.Popen(
            self._exec_argv(i, argv),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=self._env(env),
            start_new_session=True,
        )
        with self._lock:
            self._procs.append(proc)
        return proc

    def python(
        self, i: int, code: str, args: Sequence[str] = (), timeout: float = 30.0
    ) -> subprocess.CompletedProcess[str]:
        return self.run(i, [sys.executable, "-c", code, *args], timeout=timeout)

    def python_popen(self, i: int, code: str, args: Sequence[str] = ()) -> subprocess.Popen[str]:
        return self.popen(i, [sys.executable, "-c", code, *args])

    # ------------------------------------------------------------------ link shaping

    def shape(
        self,
        i: int,
        rate: str | None = None,
        delay: str | None = None,
        jitter: str | None = None,
        loss: str | None = None,
        direction: str = "both",
    ) -> dict[str, object]:
        """Shape host ``i``'s link with tc (egress = leaving host i, ingress = arriving at host i).

        delay/jitter/loss need netem (``netem_available()``); a rate alone uses netem when present,
        else a token bucket (tbf). Returns {"qdisc": kind, "burst_bytes": tbf burst or 0}.
        """
        if direction not in ("both", "egress", "ingress"):
            raise ValueError(f"direction must be 'both', 'egress' or 'ingress', got {direction!r}")
        if rate is None and delay is None and loss is None:
            raise ValueError("shape() needs at least one of rate, delay, loss")
        if jitter is not None and delay is None:
            raise ValueError("jitter needs a delay")
        has_netem = netem_available()[0]
        if (delay or loss) and not has_netem:
            raise RuntimeError(f"delay/loss shaping needs netem: {netem_available()[1]}")
        if has_netem:
            qdisc: list[str] = ["netem"]
            if delay:
                qdisc += ["delay", delay] + ([jitter] if jitter else [])
            if loss:
                qdisc += ["loss", loss]
            if rate:
                qdisc += ["rate", rate]
            burst = 0
        else:
            assert rate is not None
            # Token bucket: a burst of ~1 ms of traffic (>= 16 KiB so a full-size frame always fits).
            burst = max(16 * 1024, int(_rate_bits(rate) / 8 / 1000))
            qdisc = ["tbf", "rate", rate, "burst", str(burst), "latency", "200ms"]
        targets = []
        if direction in ("both", "egress"):
            targets.append((self.ns(i), "eth0"))
        if direction in ("both", "ingress"):
            targets.append((self.bridge_ns, f"p{i}"))
        for ns, dev in targets:
            proc = subprocess.run(
                ["ip", "netns", "exec", ns, "tc", "qdisc", "replace", "dev", dev, "root", *qdisc],
                capture_output=True,
                text=True,
                timeout=_CMD_TIMEOUT_S,
            )
            if proc.returncode != 0:
                raise RuntimeError(f"tc on {ns}/{dev} failed: {proc.stderr.strip()}")
        return {"qdisc": qdisc[0], "burst_bytes": burst}

    def unshape(self, i: int) -> None:
        for ns, dev in ((self.ns(i), "eth0"), (self.bridge_ns, f"p{i}")):
            subprocess.run(
                ["ip", "netns", "exec", ns, "tc", "qdisc", "del", "dev", dev, "root"],
                capture_output=True,
                timeout=_CMD_TIMEOUT_S,
            )
