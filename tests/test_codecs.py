"""Codec registry, wire layout, error bounds (vs float64), NaN/Inf policy and corrupted payloads.

Runs the pure-torch path on CPU; the Triton kernels are compared with it in test_kernels*.py.
"""

from __future__ import annotations

import math
import struct

import numpy as np
import pytest
import scipy.linalg
import torch

from hyperlane_lab import codecs
from hyperlane_lab.codecs import reference as ref
from hyperlane_lab.codecs.base import EncodedTensor
from hyperlane_lab.codecs.measure import error_table, measure_error

DTYPES = [torch.float16, torch.bfloat16, torch.float32]
QUANT = ["int8", "int4", "int4_hadamard", "int4_outlier", "int4_asym", "int4_outlier_asym"]
QMAX = {"int8": 127, "int4": 7, "int4_hadamard": 7, "int4_outlier": 7, "int4_asym": 7, "int4_outlier_asym": 7}
OUTLIER = ("int4_outlier", "int4_outlier_asym")
SHAPES_GS = [((1, 1, 64), 64), ((3, 7, 100), 32), ((3, 7, 100), 64), ((2, 5, 4096), 128), ((4, 40), 128)]


def _rand(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * torch.exp(torch.randn(shape, generator=g))  # heavy-ish tails
    return x.to(dtype)


def _expected_nbytes(name: str, shape: tuple[int, ...], gs: int, k: int = 8) -> int:
    """Independent size formula from the documented layouts."""
    cols = shape[-1] if shape else 1
    rows = math.prod(shape[:-1]) if shape else 1
    n = rows * math.ceil(cols / gs)
    if name == "fp16":
        return 2 * math.prod(shape)
    if name == "int8":
        return 2 * n + n * gs
    side = 4 * rows * min(k, cols) if name in OUTLIER else 0
    head = 4 * n if name.endswith("_asym") else 2 * n  # asymmetric: an fp16 minimum after each scale
    return head + side + n * gs // 2


def _half_ulp(y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Half a unit in the last place of ``dtype`` at |y| (float64), incl. the subnormal floor."""
    fi = torch.finfo(dtype)
    mant = {torch.float16: 10, torch.bfloat16: 7, torch.float32: 23}[dtype]
    a = y.abs().clamp_min(fi.tiny)
    return torch.exp2(torch.floor(torch.log2(a)) - mant) / 2


def _group_scales(p: EncodedTensor) -> torch.Tensor:
    n = codecs.GroupLayout.of(p.shape, p.group_size).n_groups
    return p.data[: 2 * n].view(torch.float16).double()


# ---------------------------------------------------------------- registry


def test_registry_names_and_unknown_name() -> None:
    assert codecs.names() == sorted(
        ["fp16", "int8", "int4", "int4_outlier", "int4_hadamard", "int4_asym", "int4_outlier_asym"]
    )
    with pytest.raises(ValueError, match=r"unknown codec 'int3'.*fp16.*int4.*int8"):
        codecs.get("int3")
    for name in codecs.names():
        c = codecs.get(name, group_size=32)
        assert c.name == name
        assert codecs.get_by_id(c.codec_id, 32).name == name
    assert len({codecs.get(n).codec_id for n in codecs.names()}) == 7
    assert 0 not in {codecs.get(n).codec_id for n in codecs.names()}  # 0 = the frame layer's "raw"
    with pytest.raises(ValueError, match=r"unknown codec id 9.*1=fp16"):
        codecs.get_by_id(9)


def test_bad_group_sizes_and_backend() -> None:
    with pytest.raises(ValueError, match="even"):
        codecs.get("int4", group_size=33)
    with pytest.raises(ValueError, match="power-of-two"):
        codecs.get("int4_hadamard", group_size=96)
    with pytest.raises(ValueError, match="group_size"):
        codecs.get("int8", group_size=0)
    with pytest.raises(ValueError, match="unknown codec backend"):
        codecs.get("int8").encode(torch.ones(4), backend="cuda")


@pytest.mark.parametrize("name", ["fp16", *QUANT])
@pytest.mark.parametrize(("shape", "gs"), [*SHAPES_GS, ((), 64), ((0, 64), 64), ((3, 0), 64), ((5,), 4)])
def test_encoded_nbytes_matches_layout(name: str, shape: tuple[int, ...], gs: int) -> None:
    c = codecs.get(name, gs)
    p = c.encode(_rand(shape, torch.float16))
    assert p.nbytes == c.encoded_nbytes(shape) == _expected_nbytes(name, shape, gs)
    y = c.decode(p)
    assert y.shape == shape and y.dtype == torch.float16


def test_ratio() -> None:
    assert codecs.get("fp16").ratio == 1.0
    assert codecs.get("int8", 64).ratio == pytest.approx(2 * 64 / (64 + 2))
    assert codecs.get("int4", 64).ratio == pytest.approx(2 * 64 / (32 + 2))
    assert codecs.get("int4_outlier", 64).ratio < codecs.get("int4", 64).ratio


# ---------------------------------------------------------------- wire layout, parsed independently


def test_int8_layout_and_round_half_even() -> None:
    # absmax 127 -> scale exactly 1.0; ties must round to even
    vals = [127.0, -0.5, 0.5, 1.5, 2.5, -2.5, 3.49, -126.6]
    x = torch.tensor([vals], dtype=torch.float32)
    p = codecs.get("int8", 8).encode(x, backend="torch")
    raw = bytes(p.buffer())
    (scale,) = struct.unpack("<e", raw[:2])
    q = list(struct.unpack("<8b", raw[2:]))
    assert scale == 1.0
    assert q == [127, 0, 0, 2, 2, -2, 3, -127]


def test_int4_layout_nibbles_and_padding() -> None:
    # absmax 7 -> scale 1.0; 5 values with group 8: 3 padding zeros (nibble 8)
    x = torch.tensor([[7.0, -7.0, 2.5, -1.0, 0.0]], dtype=torch.float16)
    p = codecs.get("int4", 8).encode(x, backend="torch")
    raw = bytes(p.buffer())
    assert struct.unpack("<e", raw[:2])[0] == 1.0
    nibbles = [n for b in raw[2:] for n in (b & 0xF, b >> 4)]  # low nibble = even element
    assert [n - 8 for n in nibbles] == [7, -7, 2, -1, 0, 0, 0, 0]
    assert torch.equal(codecs.get("int4", 8).decode(p), torch.tensor([[7.0, -7.0, 2.0, -1.0, 0.0]]).half())


def test_fp16_layout_and_dtypes() -> None:
    c = codecs.get("fp16")
    x16 = _rand((2, 3), torch.float16)
    assert bytes(c.encode(x16).buffer()) == x16.numpy().tobytes()
    xb = _rand((2, 3), torch.bfloat16)
    pb = c.encode(xb)
    assert torch.equal(c.decode(pb), xb)  # bf16 travels as bf16: exact
    x32 = _rand((4, 50), torch.float32)
    y32 = c.decode(c.encode(x32))
    assert y32.dtype == torch.float32
    assert torch.equal(y32, x32.half().float())


def test_payload_does_not_alias_input() -> None:
    for name in ["fp16", "int8"]:
        x = _rand((2, 64), torch.float16)
        c = codecs.get(name)
        p = c.encode(x)
        before = c.decode(p).clone()
        x.add_(1.0)
        assert torch.equal(c.decode(p), before)


# ---------------------------------------------------------------- error bounds vs float64


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("shape", "gs"), SHAPES_GS)
@pytest.mark.parametrize("name", ["int8", "int4"])
def test_roundtrip_error_bound(name: str, shape: tuple[int, ...], gs: int, dtype: torch.dtype) -> None:
    x = _rand(shape, dtype, seed=gs)
    x.view(-1)[:3] = torch.tensor([1e-6, -3e-8, 0.0], dtype=dtype)  # tiny values, subnormal scales
    c = codecs.get(name, gs)
    p = c.encode(x)
    y = c.decode(p)
    assert y.shape == x.shape and y.dtype == dtype
    x64 = ref.grouped(x.reshape(-1, shape[-1]).double(), gs).double()
    y64 = ref.grouped(y.reshape(-1, shape[-1]).double(), gs).double()
    s = _group_scales(p)
    # the scale is the smallest fp16 >= absmax / qmax: within one fp16 ulp above it
    lower = x64.abs().amax(dim=1) / QMAX[name]
    assert torch.all(s >= lower)
    assert torch.all(s <= torch.maximum(lower * (1 + 2**-10), torch.full_like(s, 2.0**-24)))
    bound = s[:, None] * (0.5 + 1e-5) + _half_ulp(y64, dtype)
    assert torch.all((x64 - y64).abs() <= bound)


@pytest.mark.parametrize("dtype", DTYPES)
def test_hadamard_group_l2_bound(dtype: torch.dtype) -> None:
    gs = 64
    x = _rand((6, 200), dtype, seed=3)
    x[:, 5] = 40.0  # an outlier channel
    c = codecs.get("int4_hadamard", gs)
    p = c.encode(x)
    y = c.decode(p)
    x64 = ref.grouped(x.double(), gs)
    y64 = ref.grouped(y.double(), gs)
    s = _group_scales(p)
    # orthonormal rotation: per-group L2 error = L2 error in the rotated domain <= sqrt(gs) * s / 2
    err = (x64 - y64).norm(dim=1)
    slack = 1e-5 * x64.norm(dim=1) + math.sqrt(gs) * _half_ulp(y64, dtype).amax(dim=1)
    assert torch.all(err <= math.sqrt(gs) * s * 0.5 + slack)


def test_hadamard_rows_matches_scipy() -> None:
    for gs in [2, 8, 64, 128]:
        v = torch.randn(5, gs)
        h = torch.from_numpy(scipy.linalg.hadamard(gs)).double() / math.sqrt(gs)
        torch.testing.assert_close(ref.hadamard_rows(v).double(), v.double() @ h, rtol=0, atol=1e-5)
        torch.testing.assert_close(ref.hadamard_rows(ref.hadamard_rows(v)), v, rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("name", "shift", "beats", "factor"), [
    ("int4_outlier", 0.0, "int4", 0.5),
    ("int4_outlier_asym", 0.5, "int4_outlier", 1.0),  # off-centre groups: asymmetric levels fit them
])  # fmt: skip
def test_outlier_codec_bounds_and_gain(
    name: str, shift: float, beats: str, factor: float, dtype: torch.dtype
) -> None:
    gs = 64
    x = _rand((4, 256), dtype, seed=5) + shift
    x[:, 17] = 300.0
    x[2, 200] = -900.0
    c = codecs.get(name, gs)
    p = c.encode(x)
    y = c.decode(p)
    x64, y64 = x.double(), y.double()
    err = (x64 - y64).abs()
    assert p.outliers == 8
    # the massive channels travel as fp16: error = fp16 rounding only
    assert err[:, 17].max() <= 300 * 2**-11 and err[2, 200] <= 900 * 2**-11
    # everything else: within its group's int4 half step (groups computed with outliers removed)
    s = _group_scales(p).reshape(4, -1).repeat_interleave(gs, dim=1)[:, :256]
    assert torch.all(err <= s * (0.5 + 1e-5) + _half_ulp(y64, dtype) + x64.abs() * 2**-11)
    other = codecs.get(beats, gs)
    assert err.norm() < factor * (other.decode(other.encode(x)).double() - x64).norm()


def _group_minimums(p: EncodedTensor) -> torch.Tensor:
    n = codecs.GroupLayout.of(p.shape, p.group_size).n_groups
    return p.data[2 * n : 4 * n].view(torch.float16).double()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("shape", "gs"), SHAPES_GS)
def test_asymmetric_roundtrip_error_bound(shape: tuple[int, ...], gs: int, dtype: torch.dtype) -> None:
    """int4_asym, checked in float64: the minimum is the largest fp16 <= the group's min, the scale the
    smallest fp16 >= (max - minimum) / 15, and every value decodes within half a step."""
    x = _rand(shape, dtype, seed=gs) + 0.75  # off-centre groups, where asymmetric levels pay
    x.view(-1)[:3] = torch.tensor([1e-6, -3e-8, 0.0], dtype=dtype)
    c = codecs.get("int4_asym", gs)
    p = c.encode(x)
    y = c.decode(p)
    assert y.shape == x.shape and y.dtype == dtype
    x64 = ref.grouped(x.reshape(-1, shape[-1]).double(), gs)
    y64 = ref.grouped(y.reshape(-1, shape[-1]).double(), gs)
    s, m = _group_scales(p), _group_minimums(p)
    lo, hi = x64.amin(dim=1), x64.amax(dim=1)
    assert torch.all(m <= lo) and torch.all(m.half().double() == m)
    # nothing between m and lo is an fp16: the next fp16 above m is beyond lo
    assert torch.all(torch.nextafter(m.half(), torch.tensor(float("inf")).half()).double() > lo)
    step = (hi - m) / 15
    assert torch.all(s >= step * (1 - 2**-23))
    assert torch.all(s <= torch.maximum(step * (1 + 2**-10), torch.full_like(s, 2.0**-24)))
    bound = s[:, None] * (0.5 + 1e-5) + _half_ulp(y64, dtype) + (x64 - m[:, None]).abs() * 2**-23
    assert torch.all((x64 - y64).abs() <= bound)
    # a tighter fit than the symmetric int4 on the same off-centre data
    sym = codecs.get("int4", gs)
    assert (y.double() - x.double()).norm() < (sym.decode(sym.encode(x)).double() - x.double()).norm()


def test_asymmetric_layout() -> None:
    # a group of 0..15 (+ 2): minimum 2, scale 1, q = value - 2
    x = torch.arange(2.0, 18.0)[None]
    p = codecs.get("int4_asym", 16).encode(x, backend="torch")
    raw = bytes(p.buffer())
    assert struct.unpack("<2e", raw[:4]) == (1.0, 2.0)
    nibbles = [n for b in raw[4:] for n in (b & 0xF, b >> 4)]
    assert nibbles == list(range(16))
    assert torch.equal(codecs.get("int4_asym", 16).decode(p), x)


def test_extreme_values_stay_finite() -> None:
    x = torch.tensor([[65504.0, -65504.0, 1.0, 60000.0]], dtype=torch.float16)
    for name in QUANT:
        y = codecs.get(name, 4).decode(codecs.get(name, 4).encode(x))
        assert torch.isfinite(y).all(), name
    z = torch.zeros(3, 128, dtype=torch.bfloat16)
    for name in QUANT:
        c = codecs.get(name)
        assert torch.equal(c.decode(c.encode(z)), z)


def test_scalar_and_single_token() -> None:
    for name in codecs.names():
        c = codecs.get(name)
        s = torch.tensor(3.0)
        ys = c.decode(c.encode(s))
        assert ys.shape == () and abs(float(ys) - 3.0) <= 3.0 / QMAX.get(name, 1e9)
        tok = _rand((1, 1, 4096), torch.bfloat16)
        yt = c.decode(c.encode(tok))
        assert yt.shape == (1, 1, 4096) and yt.dtype == torch.bfloat16


# ---------------------------------------------------------------- NaN / Inf


@pytest.mark.parametrize("name", ["fp16", *QUANT])
def test_nonfinite_raises_with_index(name: str) -> None:
    x = _rand((2, 3, 100), torch.float16)
    x[1, 2, 37] = float("nan")
    c = codecs.get(name, 32)
    with pytest.raises(ValueError, match=r"NaN/Inf at index \(1, 2, 37\).*stage upstream"):
        c.encode(x)
    x[1, 2, 37] = float("inf")
    with pytest.raises(ValueError, match=r"NaN/Inf at index \(1, 2, 37\)"):
        c.encode(x)


@pytest.mark.parametrize("name", ["fp16", *QUANT])
def test_nonfinite_defer_and_send(name: str) -> None:
    x = _rand((3, 64), torch.float32)
    x[1, 10] = float("nan")
    c = codecs.get(name, 32)
    deferred = c.encode(x, check_finite="defer")
    with pytest.raises(ValueError, match="NaN/Inf"):
        deferred.to_host()
    y = c.decode(c.encode(x, check_finite=False))
    assert torch.isnan(y[1, 10])
    if name in ("int8", "int4", "int4_hadamard", "int4_asym"):
        assert torch.isnan(y[1, :32]).all()  # the whole group is lost, by design
    if name in ("fp16", *OUTLIER):
        assert torch.isnan(y).sum() == 1  # only the NaN itself
    assert torch.isfinite(y[0]).all() and torch.isfinite(y[2]).all() and torch.isfinite(y[1, 32:]).all()


@pytest.mark.parametrize("name", QUANT)
def test_deferred_check_names_the_row(name: str) -> None:
    """The deferred finite check reads the payload to say where the NaN was (outlier codecs: from the
    side channel, which sits after the per-group section, 2 or 4 bytes a group)."""
    x = _rand((8, 256), torch.float32)
    x[5, 77] = float("nan")
    with pytest.raises(ValueError, match=r"row 5\b"):
        codecs.get(name, 32).encode(x, check_finite="defer").to_host()


def test_asymmetric_range_errors_name_the_group() -> None:
    x = torch.zeros(2, 32)
    x[0, :16] = 70000.0  # fine for int4_asym: minimum 0, scale 70000 / 15
    x[1, 20] = -65510.0  # below the fp16 minimum's range
    with pytest.raises(ValueError, match=r"row 1, columns 16..31 .*min >= -65504"):
        codecs.get("int4_asym", 16).encode(x)
    # the outlier variant sends each row's largest |x| as fp16: 70000 cannot go
    with pytest.raises(ValueError, match=r"7e\+04 at index \(0, 0\) is beyond fp16"):
        codecs.get("int4_outlier_asym", 16).encode(x)
    y = codecs.get("int4_asym", 16).decode(codecs.get("int4_asym", 16).encode(x[:1]))
    assert torch.allclose(y, x[:1], rtol=0, atol=70000 / 15 / 2 + 1)


def test_out_of_fp16_scale_range_raises() -> None:
    x = torch.ones(2, 64)
    x[0, 3] = 1e9  # > 65504 * 127: no fp16 scale can represent it
    with pytest.raises(ValueError, match="out of the 'int8' codec's range"):
        codecs.get("int8").encode(x)
    with pytest.raises(ValueError, match="NaN/Inf"):  # fp16 codec: overflows to inf when rounded
        codecs.get("fp16").encode(x)


# ---------------------------------------------------------------- corrupted payloads, wire rebuild


@pytest.mark.parametrize("name", codecs.names())
def test_rebuild_from_header_and_bytes(name: str) -> None:
    c = codecs.get(name, 32)
    x = _rand((3, 7, 100), torch.bfloat16)
    p = c.encode(x)
    body = bytes(p.buffer())  # what crosses the wire
    rebuilt = EncodedTensor(p.codec, p.codec_id, p.group_size, p.shape, p.dtype, memoryview(body), p.outliers)
    receiver = codecs.get_by_id(p.codec_id, p.group_size)
    assert torch.equal(receiver.decode(rebuilt), c.decode(p))


@pytest.mark.parametrize("name", codecs.names())
def test_decode_frame_payload(name: str) -> None:
    c = codecs.get(name, 32)
    x = _rand((2, 3, 100), torch.float32)
    p = c.encode(x)
    body = p.buffer()
    y = codecs.decode_frame_payload(c.codec_id, p.group_size, p.shape, torch.float32, body)
    assert torch.equal(y, c.decode(p))
    with pytest.raises(ValueError, match="expected"):
        codecs.decode_frame_payload(c.codec_id, p.group_size, p.shape, "float32", body[:-2])


@pytest.mark.parametrize("name", codecs.names())
def test_check_frame_payload_says_what_decode_would_refuse(name: str) -> None:
    """``check_frame_payload`` (a GPU worker's host-side check before it decodes a device copy) accepts
    what decodes and refuses, with decode's message, a body of the wrong length or an outlier column
    past the row; a trusted decode of a good body equals the checked one."""
    c = codecs.get(name, 32)
    x = _rand((3, 100), torch.float16)
    p = c.encode(x)
    body = bytes(p.buffer())
    args = (c.codec_id, p.group_size, p.shape, "float16")
    codecs.check_frame_payload(*args, body)
    assert torch.equal(
        codecs.decode_frame_payload(*args, torch.tensor(list(body), dtype=torch.uint8), trusted=True),
        codecs.decode_frame_payload(*args, body),
    )
    with pytest.raises(ValueError, match=f"expected {len(body)} bytes, got {len(body) - 2}"):
        codecs.check_frame_payload(*args, body[:-2])
    if "outlier" in name:
        raw = bytearray(body)
        n_groups = 3 * 4
        at = c.head_bytes(n_groups)  # type: ignore[attr-defined]
        raw[at : at + 2] = struct.pack("<H", 100)  # column 100 of a 100-wide row
        with pytest.raises(ValueError, match="outlier column 100"):
            codecs.check_frame_payload(*args, bytes(raw))
        with pytest.raises(ValueError, match="outlier column 100"):
            codecs.decode_frame_payload(*args, bytes(raw))  # untrusted decode checks as well
        with pytest.raises(RuntimeError, match="out of bounds"):  # trusted: the check is skipped
            codecs.decode_frame_payload(*args, bytes(raw), trusted=True)


@pytest.mark.parametrize("name", codecs.names())
def test_corrupted_payloads_rejected(name: str) -> None:
    c = codecs.get(name, 32)
    p = c.encode(_rand((3, 100), torch.float16))
    n = p.nbytes
    short = EncodedTensor(
        p.codec, p.codec_id, p.group_size, p.shape, p.dtype, bytes(p.buffer())[:-1], p.outliers
    )
    with pytest.raises(ValueError, match=f"expected {n} bytes, got {n - 1}"):
        c.decode(short)
    wrong_shape = EncodedTensor(p.codec, p.codec_id, p.group_size, (3, 200), p.dtype, p.data, p.outliers)
    with pytest.raises(ValueError, match=f"got {n}"):
        c.decode(wrong_shape)
    other = codecs.get("int8" if name != "int8" else "int4", 32)
    with pytest.raises(ValueError, match="was encoded by codec"):
        other.decode(p)
    if name != "fp16":
        with pytest.raises(ValueError, match="group_size"):
            codecs.get(name, 64).decode(p)


def test_corrupted_outlier_index_rejected() -> None:
    c = codecs.get("int4_outlier", 32)
    p = c.encode(_rand((2, 100), torch.float16))
    raw = bytearray(p.buffer())
    n_groups = 2 * 4
    raw[2 * n_groups : 2 * n_groups + 2] = struct.pack("<H", 100)  # column 100 of a 100-wide row
    bad = EncodedTensor(p.codec, p.codec_id, p.group_size, p.shape, p.dtype, bytes(raw), p.outliers)
    with pytest.raises(ValueError, match="outlier column 100"):
        c.decode(bad)


def test_dtype_header_validated() -> None:
    p = codecs.get("int8").encode(torch.ones(64))
    with pytest.raises(ValueError, match="unsupported activation dtype"):
        codecs.get("int8").decode(EncodedTensor(p.codec, p.codec_id, 64, p.shape, "int32", p.data))
    with pytest.raises(ValueError, match="unsupported activation dtype"):
        codecs.get("int8").encode(torch.ones(64, dtype=torch.float64))


# ---------------------------------------------------------------- measurement helper


def test_measure_error_orders_codecs() -> None:
    x = _rand((8, 512), torch.float16, seed=11)
    res = {r.codec: r for r in measure_error(x, group_size=64, backend="torch")}
    assert res["fp16"].rel_l2 == 0.0 and res["fp16"].ratio == 1.0
    assert res["int8"].rel_l2 < res["int4"].rel_l2 < 0.2
    y = codecs.get("int4").decode(codecs.get("int4").encode(x)).double()
    expect = float((y - x.double()).norm() / x.double().norm())
    assert res["int4"].rel_l2 == pytest.approx(expect)
    table = error_table(res.values())
    assert table.count("\n") == 1 + len(codecs.names()) and "int4_hadamard" in table
    assert np.isinf(res["fp16"].snr_db)


# ------------------------------------------------------------------------------ wire-mode decode specs


@pytest.mark.parametrize(
    "case, args, want",
    [
        # first stage: ids, raw only; its own hand-off codec goes into the spec
        ("ids", (0, 0, torch.int64, (2, 1), torch.float16, True, False, "int8", 32), ((0, 0, 2, 32), 16)),
        ("ids with a codec", (2, 64, torch.int64, (2, 1), torch.float16, True, False), None),
        ("raw hidden", (0, 0, torch.float16, (2, 1, 64), torch.float16, False, False), ((0, 0, 0, 0), 256)),
        ("raw of another dtype", (0, 0, torch.float32, (2, 1, 64), torch.float16, False, False), None),
        ("fp16 frames", (1, 0, torch.bfloat16, (1, 1, 64), torch.bfloat16, False, True), ((1, 0, 0, 0), 128)),
        ("fp16 into a 32-bit stage", (1, 0, torch.float32, (1, 1, 64), torch.float32, False, True), None),
        ("fp16 out of a 32-bit stage", (0, 0, torch.float32, (1, 1, 64), torch.float32, False, False, "fp16"),
         None),
        ("int8 in, int4 out", (2, 64, torch.float32, (1, 1, 64), torch.float16, False, False, "int4", 32),
         ((2, 64, 3, 32), 2 + 64)),
        # outlier codecs: where their selection is one kernel (rows <= 16,384 values, <= 32 outliers)
        ("int4_outlier in", (4, 64, torch.float16, (1, 1, 64), torch.float16, False, True),
         ((4, 64, 0, 0), 2 + 32 + 4 * 8)),
        ("int4_outlier out", (0, 0, torch.float16, (1, 1, 64), torch.float16, False, False, "int4_outlier"),
         ((0, 0, 4, 64), 128)),
        ("int4_outlier_asym in", (7, 32, torch.float16, (2, 1, 64), torch.float16, False, True),
         ((7, 32, 0, 0), 4 * 4 + 64 + 4 * 2 * 8)),
        ("int4_asym in", (6, 32, torch.float16, (1, 1, 64), torch.float16, False, True), ((6, 32, 0, 0), 8 + 32)),
        ("int4_outlier wider than the kernel", (4, 64, torch.float16, (1, 1, 20000), torch.float16, False, True),
         None),
        ("ids in, a stage too wide for int4_outlier out", (0, 0, torch.int64, (1, 1), torch.float16, True, False,
                                                            "int4_outlier", 64, 20000), None),
        ("ids in, int4_outlier out", (0, 0, torch.int64, (1, 1), torch.float16, True, False, "int4_outlier", 64,
                                      4096), ((0, 0, 4, 64), 8)),
        ("last stage: its codec is not used", (0, 0, torch.float16, (1, 1, 64), torch.float16, False, True,
                                               "int4_outlier"), ((0, 0, 0, 0), 128)),
    ],
)  # fmt: skip
def test_frame_wire_spec_decides_which_decode_frames_take_the_wire_graph(case, args, want):
    """The rule the GPU worker applies to each decode frame (models/decode_wire.frame_wire_spec):
    the spec of the graph to replay and the payload length the frame must have (a frame of another
    length is refused), or None for frames the staged path takes."""
    from hyperlane_lab.models.decode_wire import WireSpec, frame_wire_spec

    got = frame_wire_spec(*args)
    if want is None:
        assert got is None, case
    else:
        assert got == (WireSpec(*want[0]), want[1]), case
        if args[0] >= 2:  # the codec's own payload length for that shape
            c = codecs.get_by_id(args[0], args[1])
            assert got[1] == c.encoded_nbytes(args[3], args[2])


def test_frame_wire_spec_refuses_a_group_the_codec_refuses():
    from hyperlane_lab.models.decode_wire import frame_wire_spec

    with pytest.raises(ValueError, match="group_size must be even"):
        frame_wire_spec(3, 33, torch.float16, (1, 1, 64), torch.float16, False, False)
