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


@pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET", "") == "1",
    reason="test_kernels.py already runs interpreted in-process",
)
def test_kernels_under_interpreter() -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(_HERE / "test_kernels.py")],
        cwd=_HERE.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    passed = re.search(r"(\d+) passed", out)
    assert passed is not None and int(passed.group(1)) >= 50, out[-2000:]
    assert "skipped" not in out, out[-2000:]


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
