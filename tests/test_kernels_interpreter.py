"""Runs test_kernels.py under ``TRITON_INTERPRET=1`` in a subprocess (the Triton kernels on CPU tensors).

The variable is read when ``@triton.jit`` decorates a kernel, i.e. when a kernel module is first imported, so
it cannot be switched on safely inside this pytest process without leaking into other test files; a child
process keeps it contained. Also checks, in this process, that the compiled (non-interpreted) launchers
refuse CPU tensors with a clear message.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

_HERE = Path(__file__).resolve().parent


def _child(args: list[str], env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=", *args],
        cwd=_HERE.parent,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


@pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET", "") == "1",
    reason="test_kernels.py already runs interpreted in-process",
)
@pytest.mark.timeout(1500)
def test_kernels_under_interpreter() -> None:
    """The interpreted kernels take minutes of one core; the test ids are dealt round-robin to one child per
    CPU (at most 4), so a 2-core CI machine runs them in about half the time of one child."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    target = str(_HERE / "test_kernels.py")
    collect = _child(["--collect-only", target], env)
    listing, _ = collect.communicate(timeout=600)
    ids = [line for line in listing.splitlines() if line.startswith("tests/test_kernels.py::")]
    assert collect.returncode == 0 and len(ids) >= 50, listing[-4000:]
    shards = max(1, min(4, len(os.sched_getaffinity(0))))
    children = [_child(ids[i::shards], env) for i in range(shards)]
    outs = [child.communicate(timeout=1400)[0] for child in children]
    total = 0
    for child, out in zip(children, outs, strict=True):
        assert child.returncode == 0, out[-6000:]
        passed = re.search(r"(\d+) passed", out)
        assert passed is not None, out[-2000:]
        assert "skipped" not in out, out[-2000:]
        total += int(passed.group(1))
    assert total == len(ids), (total, len(ids))


@pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET", "") == "1", reason="only meaningful for compiled kernels"
)
def test_compiled_launcher_refuses_cpu_tensors() -> None:
    from hyperlane_lab import codecs
    from hyperlane_lab.codecs._kernels import kernel_module

    # another file may have imported the kernels interpreted already
    if kernel_module("quant_common").INTERPRET:  # pragma: no cover
        pytest.skip("kernel modules were imported under TRITON_INTERPRET")
    x = torch.ones(2, 64)
    with pytest.raises(ValueError, match=r"need a CUDA tensor.*backend='torch'"):
        codecs.get("int8").encode(x, backend="triton")


@pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET", "") == "1", reason="runs its own interpreted child process"
)
def test_pdl_probe_kernel_under_interpreter() -> None:
    """bench/pdl_probe.py's GEMV (plain and with its first weight tile loaded early) against float64, its
    2-layer chain against torch.mv, and a misfit shape refused: ``--check`` exits 0 only when all hold."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(_HERE.parent / "bench" / "pdl_probe.py"), "--check"],
        cwd=_HERE.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=250,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert out.count(" ok") == 3 and "misfit refused" in out and out.count("2-layer chain") == 2, out[-2000:]
