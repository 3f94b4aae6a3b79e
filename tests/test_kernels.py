"""Triton kernels vs the pure-torch reference: bitwise-equal payloads (scales and packed values) and
bit-exact dequantized outputs.

Where this runs: on CUDA when a GPU is present (compiled kernels, in this process); on CPU only when
``TRITON_INTERPRET=1`` was set before the kernel modules were imported. ``test_kernels_interpreter.py``
re-runs this file in a subprocess with the variable set. Why a subprocess: ``@triton.jit`` reads the variable
once, when a kernel module is imported, so setting it inside the main pytest process would leak into every
other test file (and on a GPU machine turn the real kernels into slow interpreted Python for the whole run).
"""

from __future__ import annotations

import os

import pytest
import torch

from hyperlane_lab import codecs
from hyperlane_lab.codecs import reference as ref
from hyperlane_lab.codecs._kernels import kernel_module
from hyperlane_lab.codecs.base import resolve_backend

INTERPRET = os.environ.get("TRITON_INTERPRET", "") == "1"
DEVICE = "cpu" if INTERPRET else ("cuda" if torch.cuda.is_available() else None)
pytestmark = [
    pytest.mark.skipif(
        DEVICE is None,
        reason="needs CUDA or TRITON_INTERPRET=1 (test_kernels_interpreter.py runs it that way)",
    ),
    # the interpreter's numpy warns on the deliberate overflow/NaN inputs of _special_values
    pytest.mark.filterwarnings("ignore::RuntimeWarning"),
]

DTYPES = [torch.float16, torch.bfloat16, torch.float32]
CASES = [  # (codec, shape, group size); last dims not multiples of the group included
    ("int8", (1, 1, 64), 64),
    ("int8", (3, 7, 100), 32),
    ("int8", (3, 7, 100), 128),
    ("int8", (2, 5, 4096), 64),
    ("int4", (1, 1, 64), 64),
    ("int4", (3, 7, 100), 32),
    ("int4", (2, 3, 100), 128),
    ("int4", (2, 5, 4096), 128),
    ("int4", (4, 90), 30),  # group size not a power of two
    ("int4_hadamard", (1, 1, 64), 64),
    ("int4_hadamard", (3, 7, 100), 32),
    ("int4_hadamard", (2, 5, 4096), 128),
    ("int4_outlier", (1, 1, 64), 32),
    ("int4_outlier", (3, 7, 100), 64),
]


def _rand(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * torch.exp(2 * torch.randn(shape, generator=g))
    return x.to(dtype).to(DEVICE)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({2: torch.int16, 4: torch.int32}[t.element_size()])


def assert_same_output(a: torch.Tensor, b: torch.Tensor) -> None:
    """Bit-exact, except that any NaN matches any NaN (torch on CUDA and the kernels may differ in NaN bits)."""
    assert a.shape == b.shape and a.dtype == b.dtype
    nan_a, nan_b = torch.isnan(a), torch.isnan(b)
    assert torch.equal(nan_a, nan_b)
    assert torch.equal(_bits(a)[~nan_a], _bits(b)[~nan_b])


def _special_values(dtype: torch.dtype) -> torch.Tensor:
    """Rows of 32 values: exact ties, tiny (subnormal-scale) groups, zeros, fp16 extremes, NaN/Inf groups."""
    big = 65504.0 if dtype == torch.float16 else 3.0e38
    rows = [
        [7.0, -7.0] + [k + 0.5 for k in range(-8, 7)] + [0.25 * k for k in range(15)],  # ties at scale 1
        [127.0] + [k + 0.5 for k in range(-60, 60, 4)] + [1.0],
        [3e-8, -1e-7, 6e-8] + [0.0] * 29,
        [0.0] * 32,
        [65504.0, -65504.0, 60000.0] + [1.0] * 29,
        [big] + [1.0] * 31,  # out of range for fp32/bf16 inputs: a bad group
        [float("nan")] + [1.0] * 31,
        [float("inf"), float("-inf")] + [2.0] * 30,
    ]
    return torch.tensor(rows, dtype=torch.float32).to(dtype).to(DEVICE)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("name", "shape", "gs"), CASES)
def test_payload_and_output_match_reference(
    name: str, shape: tuple[int, ...], gs: int, dtype: torch.dtype
) -> None:
    x = _rand(shape, dtype, seed=sum(shape) + gs)
    c = codecs.get(name, gs)
    p_tri = c.encode(x, backend="triton")
    p_ref = c.encode(x, backend="torch")
    assert p_tri.data.device.type == x.device.type
    assert torch.equal(p_tri.data, p_ref.data)
    y_tri = c.decode(p_tri, backend="triton")
    assert_same_output(y_tri, c.decode(p_ref, backend="torch"))
    if DEVICE == "cuda" and name != "int4_outlier":  # the CPU reference gives the same bytes too
        assert torch.equal(p_tri.data.cpu(), c.encode(x.cpu(), backend="torch").data)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", ["int8", "int4", "int4_hadamard", "int4_outlier"])
def test_special_values_match_reference(name: str, dtype: torch.dtype) -> None:
    x = _special_values(dtype)
    c = codecs.get(name, 16)
    p_tri = c.encode(x, backend="triton", check_finite=False)
    p_ref = c.encode(x, backend="torch", check_finite=False)
    assert torch.equal(p_tri.data, p_ref.data)
    assert_same_output(c.decode(p_tri, backend="triton"), c.decode(p_ref, backend="torch"))


@pytest.mark.parametrize("bits", [8, 4])
def test_flag_counts_bad_groups(bits: int) -> None:
    gs = 16
    x = _special_values(torch.float32)  # 8 rows x 2 groups
    qmax = ref.QMAX[bits]
    # independent count: a group is bad when it holds NaN/Inf or a value beyond 65504 * qmax
    groups = x.cpu().double().reshape(-1, gs)
    expected = int(sum(1 for g in groups if not torch.isfinite(g).all() or g.abs().max() > 65504 * qmax))
    assert expected == 3  # the 3e38, NaN and Inf groups of _special_values
    n = groups.shape[0]
    scales = torch.empty(n, dtype=torch.int16, device=DEVICE)
    flag = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    if bits == 8:
        q = torch.empty(n * gs, dtype=torch.int8, device=DEVICE)
        kernel_module("quant_int8").quantize(x, scales, q, gs, flag)
    else:
        q = torch.empty(n * gs // 2, dtype=torch.uint8, device=DEVICE)
        kernel_module("quant_int4").quantize(x, scales, q, gs, False, flag)
    assert int(flag.item()) == expected
    assert int((scales == ref.NAN16_BITS).sum()) == expected


@pytest.mark.parametrize("gs", [2, 4, 32, 128])
def test_hadamard_rotate_matches_reference(gs: int) -> None:
    v = _rand((9, gs), torch.float32, seed=gs)
    assert torch.equal(kernel_module("hadamard").rotate(v), ref.hadamard_rows(v))


def test_finite_check_on_device() -> None:
    x = _rand((4, 64), torch.float16, seed=1)
    x[2, 5] = float("nan")
    for name in ["int8", "int4", "int4_hadamard"]:
        c = codecs.get(name, 32)
        with pytest.raises(ValueError, match=r"NaN/Inf at index \(2, 5\)"):
            c.encode(x, backend="triton")
        deferred = c.encode(x, backend="triton", check_finite="defer")  # no sync, no raise
        with pytest.raises(ValueError, match=r"row 2, columns 0\.\.31"):
            deferred.to_host()


def test_launcher_checks() -> None:
    q8 = kernel_module("quant_int8")
    q4 = kernel_module("quant_int4")
    x = _rand((2, 64), torch.float16, seed=2)
    scales = torch.empty(2, dtype=torch.int16, device=DEVICE)
    q = torch.empty(128, dtype=torch.int8, device=DEVICE)
    with pytest.raises(ValueError, match=r"dtype torch\.int32"):
        q8.quantize(x.to(torch.int32), scales, q, 64)
    with pytest.raises(ValueError, match="contiguous"):
        q8.quantize(_rand((64, 2), torch.float16, seed=3).t(), scales, q, 64)
    with pytest.raises(ValueError, match="expected 2"):
        q8.quantize(x, scales[:1], q, 64)
    with pytest.raises(ValueError, match="even group_size"):
        q4.quantize(x, scales, torch.empty(64, dtype=torch.uint8, device=DEVICE), 63)


def test_auto_backend_choice() -> None:
    x = torch.ones(2, 64, device=DEVICE)
    assert resolve_backend("auto", x) == ("triton" if DEVICE == "cuda" else "torch")


def test_decode_moves_host_bytes_to_device() -> None:
    x = _rand((3, 200), torch.bfloat16, seed=4)
    c = codecs.get("int4", 64)
    host = c.encode(x, backend="triton").to_host()
    y = c.decode(host, device=DEVICE, backend="triton")
    assert y.device.type == DEVICE
    assert_same_output(y.cpu(), c.decode(host, backend="torch"))
    err = (y.double().cpu() - x.double().cpu()).abs().max()
    top = float(x.double().abs().max()) * (1 + 2**-9)  # bounds every group's absmax and |y|
    assert err <= top / 7 * (0.5 + 1e-5) + top * 2**-8  # half step + half a bf16 ulp
