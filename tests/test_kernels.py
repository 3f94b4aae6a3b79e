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
CASES = [  # (codec, shape, group size); last dims not multiples of the group included; [*, 4096]
    # shapes fill every decoder program (kernels' EVEN path), [1, 1, 64] takes DENSE with a masked program
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
    ("int4_asym", (1, 1, 64), 64),
    ("int4_asym", (3, 7, 100), 32),
    ("int4_asym", (2, 3, 100), 128),
    ("int4_asym", (4, 90), 30),
    ("int4_asym", (2, 5, 4096), 64),  # every decoder program full: the unmasked (EVEN) path
    ("int4_outlier_asym", (3, 7, 100), 64),
    # rows of whole power-of-two groups: one kernel each way (kernels/outlier_quant.py; 16-bit inputs)
    ("int4_outlier", (2, 5, 4096), 64),
    ("int4_outlier_asym", (2, 3, 192), 64),  # 3 groups a row: the kernel's masked (not EVEN) path
    ("int4_outlier_asym", (1, 1, 64), 64),
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
    if DEVICE == "cuda":  # the CPU reference gives the same bytes too (outliers: one ranking rule everywhere)
        assert torch.equal(p_tri.data.cpu(), c.encode(x.cpu(), backend="torch").data)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "name", ["int8", "int4", "int4_hadamard", "int4_outlier", "int4_asym", "int4_outlier_asym"]
)
def test_special_values_match_reference(name: str, dtype: torch.dtype) -> None:
    x = _special_values(dtype)
    c = codecs.get(name, 16)
    p_tri = c.encode(x, backend="triton", check_finite=False)
    p_ref = c.encode(x, backend="torch", check_finite=False)
    assert torch.equal(p_tri.data, p_ref.data)
    assert_same_output(c.decode(p_tri, backend="triton"), c.decode(p_ref, backend="torch"))


def _oracle_outliers(x: torch.Tensor, k: int) -> list[list[int]]:
    """Per row, the columns of the k largest |x| (NaN above Inf above finite), ties to the lower column."""
    out = []
    for row in x.double().cpu().tolist():
        rank = [(float("inf") if v != v else abs(v), v != v) for v in row]  # (magnitude, is NaN)
        out.append(sorted(range(len(row)), key=lambda i: (not rank[i][1], -rank[i][0], i))[:k])
    return out


def _tied_rows(rows: int, cols: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Few distinct magnitudes (many exact ties, both signs), one row of zeros and -0, NaN and Inf."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-4, 5, (rows, cols), generator=g).float() * 0.5
    if rows:
        x[0, :] = torch.where(torch.arange(cols) % 2 == 0, 0.0, -0.0)
    if rows > 1:
        x[1, cols // 3] = float("nan")
        x[1, cols // 2] = float("-inf")
        x[1, cols - 1] = float("inf")
        x[1, 0] = 1e5  # beyond fp16: goes as Inf
    x = x.to(dtype)
    if rows > 2:  # -NaN and a NaN with other payload bits (the reference writes every NaN as 0x7E00)
        bits = x.view({2: torch.int16, 4: torch.int32}[x.element_size()])
        nan_bits = {
            torch.float16: [-512, 0x7D01],
            torch.bfloat16: [-64, 0x7F81],
            torch.float32: [-4194304, 0x7F800123],
        }
        bits[2, cols // 2], bits[2, cols - 1] = nan_bits[dtype]
    return x.to(DEVICE)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    ("rows", "cols", "k"),
    [(1, 64, 8), (3, 100, 8), (2, 4096, 8), (4, 5, 5), (3, 1, 1), (0, 64, 8), (2, 16384, 3)],
)
def test_outlier_selection_matches_reference_and_oracle(
    rows: int, cols: int, k: int, dtype: torch.dtype
) -> None:
    """kernels/outlier_select.py: the same columns (in the same order), fp16 values and zeroed rows as
    ``reference.select_outliers``, whose choice is the brute-force ranking; random rows and tied ones."""
    select = kernel_module("outlier_select").select
    for x in (_rand((rows, cols), dtype, seed=rows + cols), _tied_rows(rows, cols, dtype, seed=k)):
        idx = torch.empty((rows, k), dtype=torch.int16, device=DEVICE)
        vals = torch.empty((rows, k), dtype=torch.float16, device=DEVICE)
        rest = torch.empty_like(x)
        select(x, k, idx, vals, rest)
        r_idx, r_vals, r_rest = ref.select_outliers(x, k)
        assert (idx.to(torch.int64) & 0xFFFF).tolist() == r_idx.tolist() == _oracle_outliers(x, k)
        assert torch.equal(vals.view(torch.int16), r_vals.view(torch.int16))
        assert torch.equal(_bits(rest), _bits(r_rest))
        assert torch.equal(ref.select_outliers(x.cpu(), k)[0], r_idx.cpu())  # same rule on the host


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_outlier_selection_keeps_the_bits_of_values_left_in_the_row(dtype: torch.dtype) -> None:
    """More NaNs than outliers (several payloads, both signs): the kernel and the reference choose the same
    k and leave every other value's bits untouched in the rest, NaN payloads included."""
    select = kernel_module("outlier_select").select
    x = torch.linspace(-3, 3, 2 * 40, dtype=torch.float32).reshape(2, 40).to(dtype)
    ints = x.view(torch.int16 if x.element_size() == 2 else torch.int32)
    payloads = {
        torch.float16: [0x7E00, 0x7D01, -512, 0x7C01, -0x0201],
        torch.bfloat16: [0x7FC0, 0x7F81, -64, 0x7FFF, -0x0041],
        torch.float32: [0x7FC00000, 0x7F800123, -4194304, 0x7FFFFFFF, -0x00400001],
    }[dtype]
    for i, col in enumerate((3, 11, 17, 29, 38)):  # five NaNs per row, k = 2
        ints[:, col] = payloads[i]
    x = x.to(DEVICE)
    k = 2
    idx = torch.empty((2, k), dtype=torch.int16, device=DEVICE)
    vals = torch.empty((2, k), dtype=torch.float16, device=DEVICE)
    rest = torch.empty_like(x)
    select(x, k, idx, vals, rest)
    r_idx, r_vals, r_rest = ref.select_outliers(x, k)
    assert (
        r_idx.tolist() == [[3, 11], [3, 11]] == (idx.to(torch.int64) & 0xFFFF).tolist()
    )  # NaNs first, lower column
    assert torch.equal(_bits(rest), _bits(r_rest))
    assert torch.equal(vals.view(torch.int16), r_vals.view(torch.int16))
    assert (r_vals.view(torch.int16) == 0x7E00).all()  # NaN values go as the one fp16 NaN
    keep = torch.ones_like(_bits(x), dtype=torch.bool)
    keep[:, [3, 11]] = False
    assert torch.equal(_bits(r_rest)[keep], _bits(x)[keep]) and not _bits(r_rest)[~keep].any()


def _clustered_rows(rows: int, cols: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Every row's largest values share chunks of 8 columns (the fused kernel's second pass), NaN/Inf too; the
    last row holds more NaN/Inf than outliers, so groups stay bad after the outliers leave."""
    x = _rand((rows, cols), dtype, seed=seed).float()
    x[:, 8:16] = 50.0
    x[:, cols - 3 :] = -60.0
    if rows > 1:
        x[1, 9], x[1, cols // 2] = float("nan"), float("inf")
    x[-1, ::2] = float("nan")
    x[-1, 1::4] = float("-inf")
    return x.to(dtype)


@pytest.mark.parametrize("asym", [False, True], ids=["int4", "asym"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    ("rows", "cols", "gs", "k"),
    [
        (2, 4096, 64, 8),
        (3, 192, 64, 5),  # 3 groups a row (masked), k not a power of two
        (2, 64, 8, 32),  # k = 4 x the row's 8 chunks: the second pass
        (3, 192, 64, 32),  # padded groups and k above the 24 chunks
        (2, 16384, 128, 3),  # the widest row (16 warps)
    ],
)
def test_fused_outlier_kernels_match_select_then_quantize(
    rows: int, cols: int, gs: int, k: int, dtype: torch.dtype, asym: bool
) -> None:
    """kernels/outlier_quant.py against the reference chain (select_outliers, then quantize_int4 /
    quantize_int4_asym of the rest; decode, then scatter): random rows (the top k in distinct chunks, one
    pass), clustered and tied rows (the second pass), NaN/Inf counted in the flag; every output dtype."""
    oq = kernel_module("outlier_quant")
    n = rows * cols // gs
    seen_bad_groups: list[int] = []
    for x in (
        _rand((rows, cols), dtype, seed=cols + k),
        _clustered_rows(rows, cols, dtype, seed=k),
        _tied_rows(rows, cols, dtype, seed=gs),
    ):
        x = x.to(DEVICE)
        scales = torch.empty(n, dtype=torch.int16, device=DEVICE)
        mins = torch.empty(n, dtype=torch.int16, device=DEVICE) if asym else None
        idx = torch.empty((rows, k), dtype=torch.int16, device=DEVICE)
        vals = torch.empty((rows, k), dtype=torch.float16, device=DEVICE)
        packed = torch.empty(rows * cols // 2, dtype=torch.uint8, device=DEVICE)
        flag = torch.zeros(1, dtype=torch.int32, device=DEVICE)
        oq.encode(x, k, gs, scales, mins, idx, vals, packed, flag)
        got = [t.clone() for t in (idx, vals.view(torch.int16), scales, packed)]
        oq.encode(x, k, gs, scales, mins, idx, vals, packed, top4=True)  # picks four a reduction: the same
        assert all(
            torch.equal(a, b) for a, b in zip(got, (idx, vals.view(torch.int16), scales, packed), strict=True)
        )
        r_idx, r_vals, rest = ref.select_outliers(x, k)
        assert (idx.to(torch.int64) & 0xFFFF).tolist() == r_idx.tolist() == _oracle_outliers(x, k)
        assert torch.equal(vals.view(torch.int16), r_vals.view(torch.int16))
        if asym:
            r_scales, r_mins, r_packed = ref.quantize_int4_asym(rest, gs)
            assert mins is not None and torch.equal(mins, r_mins)
        else:
            r_scales, r_packed = ref.quantize_int4(rest, gs, False)
        assert torch.equal(scales, r_scales) and torch.equal(packed, r_packed)
        n_bad_groups = int((r_scales == ref.NAN16_BITS).sum())
        assert int(flag) == n_bad_groups + int((~torch.isfinite(r_vals)).sum())
        seen_bad_groups.append(n_bad_groups)
        for out_dtype in DTYPES:
            out = torch.empty((rows, cols), dtype=out_dtype, device=DEVICE)
            oq.decode(scales, mins, idx, vals, packed, out, gs, k)
            if asym:
                want = ref.dequantize_int4_asym(r_scales, r_mins, r_packed, rows, cols, gs, out_dtype)
            else:
                want = ref.dequantize_int4(r_scales, r_packed, rows, cols, gs, out_dtype, False)
            assert_same_output(out, want.scatter(1, r_idx, r_vals.to(out_dtype)))
    assert max(seen_bad_groups) > 0  # the kernel's bad-group count was checked, not only its outlier count


def test_outlier_codecs_take_the_fused_kernels_where_they_apply(monkeypatch: pytest.MonkeyPatch) -> None:
    """16-bit rows of whole power-of-two groups never reach the two-kernel path; an fp32 input does (and gives
    the same bytes); a bf16 outlier beyond fp16 is counted by the fused kernel and named by the range error."""
    sel = kernel_module("outlier_select")
    real_select = sel.select
    calls: list[int] = []
    monkeypatch.setattr(sel, "select", lambda *a, **kw: (calls.append(1), real_select(*a, **kw)))
    c = codecs.get("int4_outlier_asym", 64)
    x = _rand((3, 256), torch.float16, seed=3)
    p16 = c.encode(x, backend="triton")
    assert not calls and torch.equal(p16.data, c.encode(x, backend="torch").data)
    p32 = c.encode(x.float(), backend="triton")
    assert calls and torch.equal(p32.data, p16.data)  # fp16 values: the same outliers and groups
    y = x.to(torch.bfloat16)
    y[1, 7] = 1.0e5
    with pytest.raises(ValueError, match=r"at index \(1, 7\) is beyond fp16"):
        c.encode(y, backend="triton")
    odd = torch.empty(3 * 256 + 1, dtype=torch.float16, device=DEVICE)[1:].view(3, 256)  # 2-byte aligned
    odd.copy_(x)
    assert torch.equal(c.encode(odd, backend="triton").data, p16.data) and len(calls) == 2
    # decoding takes the one-kernel decoder: the two-kernel path's scatter would be the only other writer
    want = c.decode(p16, backend="torch")
    with monkeypatch.context() as m:
        m.setattr(torch.Tensor, "scatter_", lambda *a, **kw: pytest.fail("scatter_ called"))
        assert_same_output(c.decode(p16, backend="triton"), want)


def test_fused_outlier_launchers_refuse_what_they_cannot_take() -> None:
    """k above the row length or 32, ragged or non-power-of-two groups; a decoder column past the row (a payload
    that skipped validate) writes nothing outside its row."""
    oq = kernel_module("outlier_quant")
    x = torch.arange(1, 9, dtype=torch.float16, device=DEVICE).view(1, 8)

    def bufs(rows: int, cols: int, gs: int, k: int) -> tuple[torch.Tensor, ...]:
        return (
            torch.empty(rows * cols // gs, dtype=torch.int16, device=DEVICE),
            torch.empty((rows, k), dtype=torch.int16, device=DEVICE),
            torch.empty((rows, k), dtype=torch.float16, device=DEVICE),
            torch.empty(rows * cols // 2, dtype=torch.uint8, device=DEVICE),
        )

    for cols, gs, k in ((8, 8, 16), (8, 8, 0), (96, 48, 4), (100, 50, 4)):
        xs = torch.ones((1, cols), dtype=torch.float16, device=DEVICE)
        sc, idx, vals, packed = bufs(1, cols, gs, max(k, 1))
        assert not oq.applies(cols, gs, k)
        with pytest.raises(ValueError, match="fused outlier kernels take"):
            oq.encode(xs, k, gs, sc, None, idx, vals, packed)
    sc, idx, vals, packed = bufs(2, 8, 8, 2)
    two = torch.cat([x, -x])
    oq.encode(two, 2, 8, sc, None, idx, vals, packed)
    idx[0, 0] = 8 + 3  # row 0's first outlier points into row 1
    out = torch.zeros((2, 8), dtype=torch.float16, device=DEVICE)
    oq.decode(sc, None, idx, vals, packed, out, 8, 2)
    want = ref.dequantize_int4(sc, packed, 2, 8, 8, torch.float16, False)
    want[0, 6], want[1, idx[1].long()] = vals[0, 1], vals[1]
    assert_same_output(out, want)  # row 1 untouched by row 0's bad column


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize(("name", "shape", "gs"), CASES)
def test_payload_into_fixed_buffers_equals_encode_and_decode(
    name: str, shape: tuple[int, ...], gs: int, backend: str
) -> None:
    """``encode_into`` / ``decode_from`` (what a wire-mode decode graph runs, into buffers it owns) write the
    bytes ``encode`` returns and read them back as ``decode`` does, NaN/Inf counted into the flag."""
    c = codecs.get(name, gs)
    for seed, poison in ((0, False), (1, True)):
        x = _rand(shape, torch.float16, seed=seed + gs)
        if poison:
            x.view(-1)[5] = float("nan")
        x2d = x.reshape(-1, shape[-1])
        buf = torch.full((c.encoded_nbytes(shape),), 0xAB, dtype=torch.uint8, device=DEVICE)
        flag = torch.zeros(1, dtype=torch.int32, device=DEVICE)
        c.encode_into(x2d, buf, flag, backend)
        want = c.encode(x, backend=backend, check_finite=False)
        assert torch.equal(buf, want.data)
        assert int(flag) == (1 if poison else 0)  # one group (or one outlier) holds the NaN
        out = torch.empty_like(x2d)
        c.decode_from(buf, out, backend)
        assert_same_output(out, c.decode(want, backend=backend).reshape(out.shape))


def test_outlier_selection_launcher_checks() -> None:
    select = kernel_module("outlier_select").select
    x = torch.zeros((2, 8), device=DEVICE)
    i16, v16 = (
        torch.empty((2, 3), dtype=torch.int16, device=DEVICE),
        torch.empty((2, 3), dtype=torch.float16, device=DEVICE),
    )
    with pytest.raises(ValueError, match="1 <= k <= 8"):
        select(x, 9, i16, v16, torch.empty_like(x))
    with pytest.raises(ValueError, match="at most 32"):
        wide = torch.zeros((1, 64), device=DEVICE)
        select(wide, 33, i16[:1], v16[:1], torch.empty_like(wide))
    with pytest.raises(ValueError, match="idx has dtype"):
        select(x, 3, i16.float(), v16, torch.empty_like(x))
    with pytest.raises(ValueError, match="at most 16384 columns"):
        wide = torch.zeros((1, 16385), device=DEVICE)
        select(wide, 3, i16[:1], v16[:1], torch.empty_like(wide))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_asymmetric_edge_groups_match_reference(dtype: torch.dtype) -> None:
    """Groups of 16 where the fp16 minimum or scale is at an edge: the minimum moved down to -Inf
    (bad) or from +Inf to 65504, a tiny negative minimum (-0 moved down to the smallest negative
    subnormal), +0 and -0 mixed (in either order), constant groups, a range of 15 * 65504."""
    rows = [
        [-65505.0, 1.0] + [0.5] * 14,
        [70000.0, 70001.0] + [70000.5] * 14,  # fp32 / bf16: minimum moved down from +Inf to 65504
        [-1e-9, 1.0] + [0.25] * 14,
        [0.0, -0.0] * 8,
        [-0.0, 0.0] * 8,
        [-0.0] * 16,
        [-3.0] * 16,
        [-65504.0, 917056.0] + [0.0] * 14,  # max - min = 15 * 65504: the largest finite scale
        [1.0, float("nan")] + [2.0] * 14,
        [float("-inf")] + [2.0] * 15,
    ]
    x = torch.tensor(rows, dtype=torch.float32).to(dtype).to(DEVICE)
    for name in ("int4_asym", "int4_outlier_asym"):
        c = codecs.get(name, 16)
        p_tri = c.encode(x, backend="triton", check_finite=False)
        p_ref = c.encode(x, backend="torch", check_finite=False)
        assert torch.equal(p_tri.data, p_ref.data), name
        assert_same_output(c.decode(p_tri, backend="triton"), c.decode(p_ref, backend="torch"))
    c = codecs.get("int4_asym", 16)
    y = c.decode(c.encode(x, backend="torch", check_finite=False)).cpu()
    assert torch.equal(y[3:6], torch.zeros(3, 16, dtype=dtype))  # zeros come back as +0
    assert torch.isnan(y[8]).all() and torch.isnan(y[9]).all()  # NaN / Inf: the group is lost
    # -65505 is below fp16's range in fp32 and bf16 (bad group); in fp16 it already is -65504
    assert bool(torch.isnan(y[0]).all()) == (dtype != torch.float16)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize(("rows", "cols", "gs"), [(2, 4096, 64), (3, 96, 32), (1, 64, 64), (5, 48, 16)])
def test_asymmetric_word_loads_give_the_element_loads_bytes(
    dtype: torch.dtype, rows: int, cols: int, gs: int
) -> None:
    """A 16-bit input read as int32 words (each thread holds the pair it packs) gives the same scales,
    minimums, bytes and bad-group count as the element-wise loads, and both the reference's: every program
    full and a masked last program, with NaN, Inf, ±0 and constant groups among random ones."""
    q = kernel_module("quant_int4_asym")
    x = _rand((rows, cols), dtype, seed=rows + cols + gs)
    x[0, :gs] = 0.0
    x[0, 1] = -0.0
    x[-1, -gs:] = -3.0
    if rows * cols >= 4 * gs:
        x[-1, 0], x[-1, gs] = float("nan"), float("inf")
    n = rows * cols // gs
    runs = []
    for words_ok in (True, False):
        scales, mins = (torch.empty(n, dtype=torch.int16, device=DEVICE) for _ in range(2))
        packed = torch.empty(n * gs // 2, dtype=torch.uint8, device=DEVICE)
        flag = torch.zeros(1, dtype=torch.int32, device=DEVICE)
        q.quantize(x, scales, mins, packed, gs, flag, words_ok=words_ok)
        runs.append([t.cpu() for t in (scales, mins, packed, flag)])
    for a, b in zip(*runs):
        assert torch.equal(a, b)
    want_scales, want_mins, want_packed = ref.quantize_int4_asym(x.cpu(), gs)
    assert torch.equal(runs[0][0], want_scales) and torch.equal(runs[0][1], want_mins)
    assert torch.equal(runs[0][2], want_packed)


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


CONFIG_SHAPES = [  # (rows, cols, group size): dense + every group in range, dense with a partial last
    (8, 256, 64),  # program, rows not a multiple of the group, group size not a power of two
    (5, 192, 64),
    (3, 100, 32),
    (4, 90, 30),
]
CONFIGS = [(None, None), (64, 1), (256, 2), (2048, 4), (8192, 8)]  # (tile, num_warps)


def _launch(bits: int, x: torch.Tensor, gs: int, **kw: object) -> tuple[torch.Tensor, torch.Tensor]:
    n = x.shape[0] * -(-x.shape[1] // gs)
    scales = torch.empty(n, dtype=torch.int16, device=DEVICE)
    if bits == 8:
        q = torch.empty(n * gs, dtype=torch.int8, device=DEVICE)
        kernel_module("quant_int8").quantize(x, scales, q, gs, **kw)
    else:
        q = torch.empty(n * gs // 2, dtype=torch.uint8, device=DEVICE)
        kernel_module("quant_int4").quantize(x, scales, q, gs, **kw)
    return scales, q


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("rows", "cols", "gs"), CONFIG_SHAPES)
def test_launch_configs_match_reference(rows: int, cols: int, gs: int, dtype: torch.dtype) -> None:
    """Every tile / num_warps / int4 packing choice (bench/codec_tune.py) gives the reference's bytes."""
    x = _rand((rows, cols), dtype, seed=rows * cols + gs)
    x[1, 3:5] = 0.0
    bits8, q8 = ref.quantize_int8(x.cpu(), gs)
    bits4, q4 = ref.quantize_int4(x.cpu(), gs)
    for tile, warps in CONFIGS:
        scales, q = _launch(8, x, gs, tile=tile, num_warps=warps)
        assert torch.equal(scales.cpu(), bits8) and torch.equal(q.cpu(), q8), (tile, warps)
        for pack in kernel_module("quant_int4").PACK_MODES:
            scales, q = _launch(4, x, gs, tile=tile, num_warps=warps, pack=pack)
            assert torch.equal(scales.cpu(), bits4) and torch.equal(q.cpu(), q4), (tile, warps, pack)
        if gs & (gs - 1) == 0:
            scales, q = _launch(4, x, gs, hadamard=True, tile=tile, num_warps=warps)
            bits_h, q_h = ref.quantize_int4(x.cpu(), gs, hadamard=True)
            assert torch.equal(scales.cpu(), bits_h) and torch.equal(q.cpu(), q_h), (tile, warps, "hadamard")


def test_launch_config_errors() -> None:
    x = _rand((2, 64), torch.float16, seed=5)
    with pytest.raises(ValueError, match="tile must be a power of two"):
        _launch(8, x, 64, tile=3000)
    with pytest.raises(ValueError, match="num_warps must be one of"):
        _launch(4, x, 64, num_warps=3)
    with pytest.raises(ValueError, match="pack must be one of"):
        _launch(4, x, 64, pack="nibbles")


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


# ------------------------------------------------------------------ decode GEMV (kernels/gemv.py)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("lead", "n", "k", "bias"),
    [
        ((1,), 64, 256, False),
        ((1, 1), 100, 300, True),
        ((3,), 37, 1030, False),
        ((1, 1), 48, 64, True),
        ((1,), 32, 2048, True),  # every split-K config splits evenly here
    ],
)
def test_gemv_matches_float64(dtype: torch.dtype, lead: tuple[int, ...], n: int, k: int, bias: bool) -> None:
    """Every config (masked and mask-free tiles, rows not a multiple of the block) against a float64
    product, within fp32 accumulation of values rounded to ``dtype`` at the end."""
    from hyperlane_lab.codecs._kernels import kernel_module

    CONFIGS, gemv = kernel_module("gemv").CONFIGS, kernel_module("gemv").gemv

    g = torch.Generator().manual_seed(n * k)
    x = torch.randn((*lead, k), generator=g).to(dtype)
    w = (torch.randn((n, k), generator=g) / k**0.5).to(dtype)
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    want = x.double() @ w.double().T + (b.double() if b is not None else 0)
    tol = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float32: 1e-5}[dtype]
    for cfg in CONFIGS:
        got = gemv(x.to(DEVICE), w.to(DEVICE), None if b is None else b.to(DEVICE), cfg)
        assert got.shape == (*lead, n) and got.dtype == dtype
        err = (got.double().cpu() - want).abs().max().item()
        assert err <= tol * (1 + want.abs().max().item()), (cfg, err)


def test_gemv_rejects_bad_inputs() -> None:
    from hyperlane_lab.codecs._kernels import kernel_module

    gemv = kernel_module("gemv").gemv

    w = torch.zeros(8, 16, device=DEVICE)
    with pytest.raises(ValueError, match="does not fit"):
        gemv(torch.zeros(1, 15, device=DEVICE), w)
    with pytest.raises(ValueError, match="contiguous 2-D"):
        gemv(torch.zeros(1, 8, device=DEVICE), w.T)
    with pytest.raises(ValueError, match="bias"):
        gemv(torch.zeros(1, 16, device=DEVICE), w, torch.zeros(7, device=DEVICE))


def test_decode_layer_with_the_triton_linear_matches_cublas() -> None:
    """The decode layer routed through ``make_linear`` (Triton GEMV for one row, F.linear for a
    batch) gives F.linear's result within accumulation-order rounding."""
    from hyperlane_lab.codecs._kernels import kernel_module

    CONFIGS = kernel_module("gemv").CONFIGS
    from hyperlane_lab.models.config import ModelSpec
    from hyperlane_lab.models.cuda_decode import decode_layer_static, make_linear
    from hyperlane_lab.models.stage import TorchStage
    from hyperlane_lab.types import LayerSpan

    spec = ModelSpec(
        model_type="llama", n_layers=1, hidden_size=64, n_heads=4, n_kv_heads=2, head_dim=16,
        intermediate_size=96, vocab_size=64, max_position=32,
    )  # fmt: skip
    st = TorchStage.random(spec, LayerSpan(0, 1), seed=1, dtype=torch.float32, device=DEVICE)
    lw = st.weights.layers[0]
    table = {(t.shape[0], t.shape[1]): CONFIGS[1] for t in (lw.wqkv, lw.wo, lw.w_gate_up, lw.w_down)}
    lin = make_linear(table)
    for b in (1, 2):
        g = torch.Generator().manual_seed(b)
        x = torch.randn(b, 1, 64, generator=g).to(DEVICE)
        cos, sin = torch.ones(b, 1, 1, 16, device=DEVICE), torch.zeros(b, 1, 1, 16, device=DEVICE)
        kc = torch.zeros(b, 2, 9, 16, device=DEVICE)
        slot = torch.full((b, 1, 1, 1), 3, dtype=torch.int64, device=DEVICE)
        mask = (torch.arange(9, device=DEVICE) <= 3)[None, None, None, :].expand(b, 1, 1, 9)
        ref_out = decode_layer_static(x, lw, spec, cos, sin, kc.clone(), kc.clone(), slot, mask)
        got = decode_layer_static(x, lw, spec, cos, sin, kc.clone(), kc.clone(), slot, mask, lin=lin)
        assert torch.allclose(got, ref_out, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------ decode attention (kernels/decode_attn.py)

# Output tolerance, relative to max |V| (the output is a convex combination of V rows): q and the new k are
# rounded to the cache dtype once (relative error 2**-11 fp16, 2**-8 bf16 ~ 4e-3), which moves a score of a
# unit-variance dot product by ~1e-3 (fp16) / ~1e-2 (bf16) and p by that fraction; the output is rounded
# once more. fp32 only sees fp32 rounding of the sums (~1e-7).
ATTN_TOL = {torch.float16: 2e-3, torch.bfloat16: 2e-2, torch.float32: 1e-5}
# The stored roped key: one rounding of an fp32 value to the dtype (half an ulp, with margin), rel. to max |k|.
ROPE_TOL = {torch.float16: 2**-10, torch.bfloat16: 2**-8, torch.float32: 2**-21}


def _attn_inputs(
    dtype: torch.dtype, b: int, hq: int, hkv: int, d: int, n_slots: int, seed: int
) -> tuple[torch.Tensor, ...]:
    """qkv [B, 1, (Hq + 2 Hkv) D], caches [B, Hkv, n_slots, D] in ``dtype`` (CPU), RoPE tables of exactly
    L = n_slots - 1 rows (the smallest the launcher takes), fp32, half-rotation layout."""
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(b, 1, (hq + 2 * hkv) * d, generator=g).to(dtype)
    kc = torch.randn(b, hkv, n_slots, d, generator=g).to(dtype)
    vc = torch.randn(b, hkv, n_slots, d, generator=g).to(dtype)
    inv = 10000.0 ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = torch.arange(n_slots - 1, dtype=torch.float64)[:, None] * inv
    emb = torch.cat((ang, ang), dim=-1)
    return qkv, kc, vc, emb.cos().float(), emb.sin().float()


def _check_decode_attn(
    dtype: torch.dtype, hq: int, hkv: int, d: int, positions: list[int], n_slots: int,
    window: int | None, splits: tuple[int | None, ...], block_l: int | None = None, seed: int = 0,
) -> None:  # fmt: skip
    """Output and both caches of ``decode_attention`` (for each split) against the float64 reference."""
    mod = kernel_module("decode_attn")
    qkv, kc, vc, cos_t, sin_t = _attn_inputs(dtype, len(positions), hq, hkv, d, n_slots, seed)
    pos = torch.tensor(positions, dtype=torch.int64)[:, None]
    k64, v64 = kc.double(), vc.double()
    want = mod.decode_attention_ref(qkv.double(), pos, cos_t, sin_t, k64, v64, hq, hkv, window)
    real = pos[:, 0] >= 0
    slot = torch.where(real, pos[:, 0], n_slots - 1)
    written = torch.zeros(kc.shape, dtype=torch.bool)
    written[torch.arange(len(positions)), :, slot] = True
    vmax = max(vc.abs().max().item(), qkv.abs().max().item())
    outs = []
    for split in splits:
        kd, vd = kc.to(DEVICE, copy=True), vc.to(DEVICE, copy=True)  # kc, vc stay the originals on CPU too
        args = (qkv.to(DEVICE), pos.to(DEVICE), cos_t.to(DEVICE), sin_t.to(DEVICE), kd, vd)
        got = mod.decode_attention(*args, hq, hkv, window, split, block_l=block_l).cpu()
        kd, vd = kd.cpu(), vd.cpu()
        assert got.shape == (len(positions), 1, hq * d) and got.dtype == dtype
        assert torch.isfinite(got).all()  # padding rows included
        err = (got.double() - want)[real].abs().max().item()
        assert err <= ATTN_TOL[dtype] * vmax, (split, err)
        assert torch.equal(kd[~written], kc[~written]) and torch.equal(vd[~written], vc[~written]), split
        assert torch.equal(vd[written], v64[written].to(dtype)), split  # the new value, copied as is
        kerr = (kd[written].double() - k64[written]).abs().max().item()
        assert kerr <= ROPE_TOL[dtype] * k64[written].abs().max().item(), (split, kerr)
        outs.append(got[real].double())
    for o in outs[1:]:  # every split count: same result within the dtype's rounding
        assert (o - outs[0]).abs().max().item() <= ATTN_TOL[dtype] * vmax


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    ("hq", "hkv", "d"),
    [(2, 2, 16), (4, 2, 24), (8, 2, 16), (6, 2, 24)],
    ids=["mha", "g2_d24", "g4", "g3_d24"],
)
def test_decode_attn_matches_float64(dtype: torch.dtype, hq: int, hkv: int, d: int) -> None:
    """Rows at position 0, mid-cache, the last valid position L - 1 and a padding row; one program per
    (row, KV head) and a 3-way split (flash-decoding), with several partial key blocks per program."""
    _check_decode_attn(dtype, hq, hkv, d, [0, 9, 23, -1], 25, None, (1, 3), block_l=8, seed=hq * d)


@pytest.mark.parametrize(
    ("dtype", "window", "splits"),
    [
        (torch.float32, 1, (1, 2)),
        (torch.float16, 4, (1, 3)),
        (torch.bfloat16, 7, (2,)),
        (torch.float32, 100, (4,)),
    ],
    ids=["w1", "w4", "w7", "w100"],
)
def test_decode_attn_sliding_window(dtype: torch.dtype, window: int, splits: tuple[int, ...]) -> None:
    """Positions below and above the window (window 1: the new key alone; 100: wider than the cache)."""
    _check_decode_attn(dtype, 4, 1, 16, [0, 3, 12, 19, -1], 21, window, splits, block_l=4, seed=window)


@pytest.mark.parametrize(
    ("dtype", "hq", "hkv", "d"),
    [(torch.float16, 8, 1, 128), (torch.bfloat16, 2, 1, 64)],
    ids=["g8_d128", "g2_d64"],
)
def test_decode_attn_long_cache_default_split(dtype: torch.dtype, hq: int, hkv: int, d: int) -> None:
    """A 1100-slot cache: the launcher's own split (5) and key block."""
    mod = kernel_module("decode_attn")
    assert [mod.choose_split(n) for n in (2, 257, 258, 1100, 1 << 20)] == [1, 1, 2, 5, mod.MAX_SPLIT]
    _check_decode_attn(dtype, hq, hkv, d, [1098, 517, -1], 1100, None, (None,), seed=d)


def test_decode_attn_positions_past_the_cache_are_padding() -> None:
    """Positions >= L write only the trash slot and give a finite output (never out of bounds)."""
    mod = kernel_module("decode_attn")
    qkv, kc, vc, cos_t, sin_t = _attn_inputs(torch.float32, 2, 4, 2, 16, 13, seed=3)
    L = 12
    kd, vd = kc.to(DEVICE, copy=True), vc.to(DEVICE, copy=True)
    pos = torch.tensor([[L], [L + 5]], device=DEVICE)
    got = mod.decode_attention(qkv.to(DEVICE), pos, cos_t.to(DEVICE), sin_t.to(DEVICE), kd, vd, 4, 2)
    assert torch.isfinite(got).all()
    assert torch.equal(kd.cpu()[:, :, :L], kc[:, :, :L]) and torch.equal(vd.cpu()[:, :, :L], vc[:, :, :L])


def test_decode_attn_consecutive_steps() -> None:
    """Two steps in a row read the key/value the first one stored; on CUDA both run from one captured
    CUDA graph, replayed with new positions (the launcher reads no device values)."""
    mod = kernel_module("decode_attn")
    hq, hkv, d, n_slots, dtype = 4, 2, 16, 40, torch.float16
    qkv, kc, vc, cos_t, sin_t = _attn_inputs(dtype, 2, hq, hkv, d, n_slots, seed=11)
    qkv2 = _attn_inputs(dtype, 2, hq, hkv, d, n_slots, seed=12)[0]
    k64, v64 = kc.double(), vc.double()
    steps = [torch.tensor([[5], [30]]), torch.tensor([[6], [31]])]
    want = [
        mod.decode_attention_ref(x.double(), p, cos_t, sin_t, k64, v64, hq, hkv)
        for x, p in zip((qkv, qkv2), steps)
    ]
    x_d, p_d = qkv.to(DEVICE), steps[0].to(DEVICE)
    kd, vd, cos_d, sin_d = kc.to(DEVICE), vc.to(DEVICE), cos_t.to(DEVICE), sin_t.to(DEVICE)

    def step() -> torch.Tensor:
        return mod.decode_attention(x_d, p_d, cos_d, sin_d, kd, vd, hq, hkv, split=2)

    got = []
    if DEVICE == "cuda":
        step()  # compile outside the capture
        kd.copy_(kc.to(DEVICE))
        vd.copy_(vc.to(DEVICE))
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = step()
        for x, p in zip((qkv, qkv2), steps):
            x_d.copy_(x.to(DEVICE))
            p_d.copy_(p.to(DEVICE))
            graph.replay()
            got.append(out.cpu())
    else:
        for x, p in zip((qkv, qkv2), steps):
            x_d.copy_(x)
            p_d.copy_(p)
            got.append(step())
    vmax = max(vc.abs().max().item(), qkv.abs().max().item(), qkv2.abs().max().item())
    for g, w in zip(got, want):
        assert (g.double() - w).abs().max().item() <= ATTN_TOL[dtype] * vmax
    assert torch.equal(vd.cpu(), v64.to(dtype))


def test_decode_attn_rejects_bad_inputs() -> None:
    mod = kernel_module("decode_attn")
    qkv, kc, vc, cos_t, sin_t = (t.to(DEVICE) for t in _attn_inputs(torch.float16, 2, 4, 2, 16, 9, seed=1))
    pos = torch.zeros(2, 1, dtype=torch.int64, device=DEVICE)

    def call(*args: object, **kw: object) -> None:
        full = [qkv, pos, cos_t, sin_t, kc, vc, 4, 2]
        full[: len(args)] = args
        mod.decode_attention(*full, **kw)

    with pytest.raises(ValueError, match=r"k_cache has dtype torch\.float32"):
        call(qkv, pos, cos_t, sin_t, kc.float())
    with pytest.raises(ValueError, match=r"pos has dtype torch\.int32"):
        call(qkv, pos.int())
    with pytest.raises(ValueError, match=r"pos must be \[2, 1\]"):
        call(qkv, pos[:1])
    with pytest.raises(ValueError, match="cos_t has dtype"):
        call(qkv, pos, cos_t.half())
    with pytest.raises(ValueError, match=r"cos_t/sin_t must be \[>= 8, 16\]"):
        call(qkv, pos, cos_t[:7], sin_t[:7])
    with pytest.raises(ValueError, match="does not fit"):
        call(qkv[..., :-16].contiguous())
    with pytest.raises(ValueError, match="contiguous"):
        call(qkv, pos, cos_t, sin_t, kc.transpose(1, 2).contiguous().transpose(1, 2))
    with pytest.raises(ValueError, match="caches must both be"):
        call(qkv, pos, cos_t, sin_t, kc, vc[:, :1].contiguous())
    with pytest.raises(ValueError, match="multiple of n_kv_heads"):
        call(qkv, pos, cos_t, sin_t, kc, vc, 3, 2)
    with pytest.raises(ValueError, match="window must be"):
        call(window=-1)
    with pytest.raises(ValueError, match="split must be"):
        call(split=0)
    with pytest.raises(ValueError, match="block_l must be a power of two"):
        call(block_l=12)


# ------------------------------------------------------------------ fused GEMV extras and the all-Triton layer


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("n", "k"), [(48, 64), (37, 300), (32, 2048)])
def test_gemv_fused_norm_gate_residual_match_float64(dtype: torch.dtype, n: int, k: int) -> None:
    """RMSNorm folded into the product, SwiGLU's silu(gate) * up, a bias and a residual add
    (split-K configs too, where the sum kernel adds both) against float64 of the unfused math."""
    gk = kernel_module("gemv")
    g = torch.Generator().manual_seed(n + k)
    x = (torch.randn(1, 1, k, generator=g) * 3).to(dtype)
    gu = torch.randn(1, 1, 2 * k, generator=g).to(dtype)
    w = (torch.randn(n, k, generator=g) / k**0.5).to(dtype)
    nw = (1 + 0.1 * torch.randn(k, generator=g)).to(dtype)
    res = torch.randn(1, 1, n, generator=g).to(dtype)
    bias = torch.randn(n, generator=g).to(dtype)
    xd, wd = x.double(), w.double()
    normed = xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-5) * nw.double()
    gate, up = gu.double().chunk(2, dim=-1)
    want_norm = normed @ wd.T + bias.double() + res.double()
    want_gated = (torch.nn.functional.silu(gate) * up) @ wd.T + bias.double() + res.double()
    tol = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float32: 1e-5}[dtype]
    xs, gus, ws, nws, rs, bs = (t.to(DEVICE) for t in (x, gu, w, nw, res, bias))
    for cfg in gk.CONFIGS:  # bias and residual together: once each, also through the split-K sum
        got = gk.gemv(gus, ws, bs, cfg, gated=True, residual=rs).double().cpu()
        assert (got - want_gated).abs().max().item() <= tol * (1 + want_gated.abs().max().item()), cfg
        if cfg.split_k > 1:
            with pytest.raises(ValueError, match="split_k=1"):
                gk.gemv(xs, ws, None, cfg, norm_weight=nws, eps=1e-5)
            continue
        got = gk.gemv(xs, ws, bs, cfg, norm_weight=nws, eps=1e-5, residual=rs).double().cpu()
        assert (got - want_norm).abs().max().item() <= tol * (1 + want_norm.abs().max().item()), cfg


def test_gemv_fused_extras_reject_bad_inputs() -> None:
    gemv = kernel_module("gemv").gemv
    w = torch.zeros(8, 16, device=DEVICE)
    with pytest.raises(ValueError, match="gated: x holds gate and up"):
        gemv(torch.zeros(1, 16, device=DEVICE), w, gated=True)
    with pytest.raises(ValueError, match="norm_weight must be a contiguous"):
        gemv(torch.zeros(1, 16, device=DEVICE), w, norm_weight=torch.ones(8, device=DEVICE))
    with pytest.raises(ValueError, match="residual must be"):
        gemv(torch.zeros(1, 16, device=DEVICE), w, residual=torch.zeros(1, 7, device=DEVICE))


def test_pdl_launches_are_refused_where_they_cannot_run() -> None:
    """``pdl=True`` (programmatic dependent launch, kernels/pdl.py) needs a CUDA device of capability 9.0+ and
    compiled kernels: CPU tensors (and the interpreter) get a ValueError that says so, before any launch."""
    pdl = kernel_module("pdl")
    assert not pdl.pdl_supported("cpu")
    if INTERPRET:
        assert not pdl.pdl_supported("cuda")  # the interpreter runs no launch attributes
    assert pdl.launch_options(False, torch.device("cpu"), "k") == {}
    with pytest.raises(ValueError, match=r"gemv: pdl=True needs .* capability 9\.0\+.*pass pdl=False"):
        kernel_module("gemv").gemv(torch.zeros(1, 16), torch.zeros(8, 16), pdl=True)
    qkv = torch.zeros(1, 1, (4 + 2 * 2) * 16)
    cache = torch.zeros(1, 2, 9, 16)
    tables = torch.zeros(8, 16)
    with pytest.raises(ValueError, match=r"decode_attention: pdl=True needs"):
        kernel_module("decode_attn").decode_attention(
            qkv, torch.zeros(1, 1, dtype=torch.int64), tables, tables, cache, cache.clone(), 4, 2, pdl=True
        )


@pytest.mark.parametrize(("n", "k", "rows"), [(96, 1000, 2), (64, 2048, 1), (40, 4096, 1)])
def test_gemv_with_its_first_step_peeled_gives_the_same_bits(n: int, k: int, rows: int) -> None:
    """``gemv(prefetch=True)`` (the first weight tile read before the loop, and before the wait under PDL) gives
    bitwise what the plain loop gives, for every config (split-K included), shapes that are not whole tiles,
    several tiles per split, two rows, bias + residual, the RMSNorm and SwiGLU inputs; on a Hopper GPU also
    launched with programmatic dependent launch."""
    gk = kernel_module("gemv")
    pdl_too = DEVICE == "cuda" and kernel_module("pdl").pdl_supported(DEVICE)
    g = torch.Generator().manual_seed(n + k)
    x, gu = (torch.randn(rows, m, generator=g).half().to(DEVICE) for m in (k, 2 * k))
    w = (torch.randn(n, k, generator=g) / k**0.5).half().to(DEVICE)
    b, r = torch.randn(n, generator=g).half().to(DEVICE), torch.randn(rows, n, generator=g).half().to(DEVICE)
    nw = torch.rand(k, generator=g).half().to(DEVICE) + 0.5
    for c in gk.CONFIGS:
        cases = [dict(x=x, bias=b, residual=r), dict(x=gu, bias=None, residual=r, gated=True)]
        if c.split_k == 1:
            cases.append(dict(x=x, bias=b, residual=None, norm_weight=nw, eps=1e-5))
        for kw in cases:
            kw = dict(kw)
            xin = kw.pop("x")
            want = gk.gemv(xin, w, config=c, **kw)
            assert torch.isfinite(want).all()
            assert torch.equal(gk.gemv(xin, w, config=c, prefetch=True, **kw), want), (c, sorted(kw))
            if pdl_too:
                got = gk.gemv(xin, w, config=c, pdl=True, prefetch=True, **kw)
                assert torch.equal(got, want), (c, sorted(kw))


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_triton_decode_layer_matches_the_static_layer(family: str) -> None:
    """The five-launch batch-1 layer (decode_fused.make_triton_layer: norm+qkv, attention kernel,
    wo+residual, norm+gate/up, SwiGLU+down+residual; split-K and plain configs) equals the static
    torch layer in fp32, over several steps with GQA, a qkv bias (qwen2) and a sliding window,
    caches included."""
    from hyperlane_lab.models.config import ModelSpec
    from hyperlane_lab.models.cuda_decode import decode_layer_static
    from hyperlane_lab.models.decode_fused import make_triton_layer
    from hyperlane_lab.models.layers import rope_tables
    from hyperlane_lab.models.stage import TorchStage
    from hyperlane_lab.types import LayerSpan

    gk = kernel_module("gemv")
    plain = next(c for c in gk.CONFIGS if c.split_k == 1)
    split = next(c for c in gk.CONFIGS if c.split_k > 1)
    spec = ModelSpec(
        model_type=family, n_layers=1, hidden_size=64, n_heads=4, n_kv_heads=2, head_dim=16,
        intermediate_size=96, vocab_size=64, max_position=32, qkv_bias=family == "qwen2",
    )  # fmt: skip
    st = TorchStage.random(spec, LayerSpan(0, 1), seed=2, dtype=torch.float32, device=DEVICE, std=0.2)
    lw = st.weights.layers[0]
    attn = kernel_module("decode_attn").decode_attention
    layer = make_triton_layer(attn, {"wqkv": plain, "wo": split, "w_gate_up": plain, "w_down": split})
    L, window = 12, 5
    cos_t, sin_t = rope_tables(spec, L, DEVICE)
    kc_a, vc_a = (torch.zeros(1, 2, L + 1, 16, device=DEVICE) for _ in range(2))
    kc_b, vc_b = kc_a.clone(), vc_a.clone()
    g = torch.Generator().manual_seed(5)
    for p in range(8):
        x = torch.randn(1, 1, 64, generator=g).to(DEVICE)
        pos = torch.tensor([[p]], device=DEVICE)
        got = layer(x, lw, spec, pos, cos_t, sin_t, kc_a, vc_a, window)
        cos, sin = cos_t[pos][:, None], sin_t[pos][:, None]
        keys = torch.arange(L + 1, device=DEVICE)
        mask = ((keys <= p) & (keys > p - window))[None, None, None, :]
        slot = pos[:, None, :, None]
        want = decode_layer_static(x, lw, spec, cos, sin, kc_b, vc_b, slot, mask)
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-5), p
        assert torch.allclose(kc_a, kc_b, atol=1e-5) and torch.allclose(vc_a, vc_b, atol=1e-5), p


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("rows", "vocab"), [(1, 32000), (3, 5000), (2, 1), (1, 4096), (1, 4097)])
def test_greedy_kernel_equals_torch_argmax_and_finite_check(
    dtype: torch.dtype, rows: int, vocab: int
) -> None:
    """``kernels/greedy.py`` gives ``torch.argmax`` (first maximal index: ties planted inside a block and
    across blocks) and the any-non-finite flag of the torch form, for one and several rows, vocabularies
    below, at and past a block, every dtype; a NaN or an Inf in any row sets the flag and leaves the ids in
    range."""
    mod = kernel_module("greedy")
    g = torch.Generator().manual_seed(rows * vocab)
    x = torch.randn(rows, vocab, generator=g).to(dtype)
    if vocab > 10:
        top = x[0].float().max() + 1
        x[0, vocab // 3] = x[0, vocab // 3 + 1] = x[0, vocab - 1] = top  # the first one wins
        r = rows - 1  # the last row: a tie across the first block boundary (4095 / 4096) where there is one
        a, b = (4095, 4096) if vocab > 4096 else (vocab - 2, vocab - 1)
        x[r, a] = x[r, b] = x[r].float().max() + 2
    got = mod.greedy_pack(x.to(DEVICE)).cpu()
    assert torch.equal(got, mod.greedy_pack_ref(x)), (got, mod.greedy_pack_ref(x))
    assert got[-1] == 0
    # all logits negative, the maximum in the last (partial) block: masked lanes must never win
    neg = -(torch.rand(rows, vocab, generator=g) + 1).to(dtype)
    neg[:, vocab - 1] = -0.5
    assert torch.equal(mod.greedy_pack(neg.to(DEVICE)).cpu(), mod.greedy_pack_ref(neg))
    for bad in (float("nan"), float("inf"), -float("inf")):
        y = x.clone()
        y[rows - 1, vocab // 2] = bad
        got = mod.greedy_pack(y.to(DEVICE)).cpu()
        assert got[-1] == 1 and ((got[:-1] >= 0) & (got[:-1] < vocab)).all(), (bad, got)
        if bad == -float("inf"):  # the ids still hold where the maximum is finite
            assert torch.equal(got[:-1], y.float().argmax(dim=-1))


def test_greedy_kernel_rejects_bad_logits() -> None:
    mod = kernel_module("greedy")
    with pytest.raises(ValueError, match=r"must be \[B, V\]"):
        mod.greedy_pack(torch.zeros(2, 3, 4, device=DEVICE))
    with pytest.raises(ValueError, match=r"dtype torch\.int64"):
        mod.greedy_pack(torch.zeros(1, 4, dtype=torch.int64, device=DEVICE))
    with pytest.raises(ValueError, match="contiguous"):
        mod.greedy_pack(torch.zeros(4, 3, device=DEVICE).t())
    with pytest.raises(ValueError, match="at most 262144 logits"):
        mod.greedy_pack(torch.zeros(1, 262145, device=DEVICE))


# ---------------------------------------------------------------------------- the armed step's gate


def _gate_words(flag: int, rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    pos = torch.arange(10, 12 + rows, dtype=torch.int64, device=DEVICE)  # 2 words past the rows
    return torch.tensor([flag], dtype=torch.int64, device=DEVICE), torch.zeros(1, dtype=torch.int64,
                                                                                device=DEVICE), pos  # fmt: skip


@pytest.mark.parametrize("flag, target", [(7, 7), (9, 7), (6, 7), (0, 1)])
@pytest.mark.parametrize("rows", [1, 3])
def test_armed_gate_equals_its_reference(flag, target, rows):
    """``kernels/armed_wait.py``. Released (flag >= target): status = target, positions untouched. Given up
    (after ``limit`` reads, or ns of the GPU timer): status = -target and exactly ``rows`` positions padded."""
    gate = kernel_module("armed_wait")
    got, want = _gate_words(flag, rows), _gate_words(flag, rows)
    on_gpu = DEVICE == "cuda"
    gate.armed_wait(got[0], got[1], got[2][:rows], target, 20_000 if on_gpu else 5, timer=on_gpu)
    want = tuple(t.cpu() for t in want)
    gate.armed_wait_reference(want[0], want[1], want[2][:rows], target, 5)
    assert got[1].tolist() == want[1].tolist() == [target if flag >= target else -target]
    expect = [-1] * rows if flag < target else list(range(10, 10 + rows))
    assert got[2].tolist() == want[2].tolist() == [*expect, 10 + rows, 11 + rows]


def test_armed_gate_refuses_bad_words():
    gate = kernel_module("armed_wait")
    flag, status, pos = _gate_words(1, 3)
    with pytest.raises(ValueError, match="int64"):
        gate.armed_wait(flag.int(), status, pos, 1, 1, timer=False)
    with pytest.raises(ValueError, match="one int64 each"):
        gate.armed_wait(torch.zeros(2, dtype=torch.int64, device=DEVICE), status, pos, 1, 1, timer=False)
    with pytest.raises(ValueError, match="1-D"):
        gate.armed_wait(flag, status, pos.view(1, -1), 1, 1, timer=False)
    with pytest.raises(ValueError, match=">= 1"):
        gate.armed_wait(flag, status, pos, 0, 1, timer=False)


# ---------------------------------------------------------------------------- a chained token loop's link


def _chain_inputs(ids: list[int], bad: int, pos: list[int]) -> tuple[torch.Tensor, ...]:
    b = len(ids)
    result = torch.tensor([*ids, bad], dtype=torch.int64, device=DEVICE)
    io = torch.tensor([[5] * b, pos], dtype=torch.int64, device=DEVICE)
    nxt = torch.full((2, b), 77, dtype=torch.int64, device=DEVICE)
    slot = torch.full((b + 1,), 77, dtype=torch.int64, device=DEVICE)
    return result, io, nxt, slot


@pytest.mark.parametrize(
    "ids, bad, pos, eos, want_pos",
    [
        ([12], 0, [6], [-1], [7]),  # one row: next position
        ([2], 0, [6], [2], [-1]),  # EOS
        ([12], 0, [-1], [2], [-1]),  # padding stays padding
        ([12], 0, [9], [-1], [-1]),  # position 10 is the limit: padding, never a write past the cache
        ([12], 0, [8], [-1], [9]),  # ... position 9 is the last allowed
        ([12, 3, 2, 40, 7], 0, [6, 6, -1, 4, 6], [2, 7, 3], [7, -1, -1, 5, -1]),  # rows; three EOS ids
        ([12, 3, 5], 1, [6, 6, 6], [-1], [-1, -1, -1]),  # NaN/Inf in the logits: every row padding
        ([99, 60], 0, [1, 1], [-1], [2, 2]),  # an id out of the vocab (never a real argmax): 0 as next id
    ],
)
def test_ring_chain_equals_its_reference_and_the_host_rule(ids, bad, pos, eos, want_pos):
    """``kernels/ring_chain.py``: the next step's ids and positions, and a copy of the result, as
    ``runtime/outbox.ring_frame`` (the host's rule, checked here on the same rows) makes them."""
    import numpy as np

    from hyperlane_lab.runtime.outbox import ring_frame

    mod = kernel_module("ring_chain")
    eos_t = torch.tensor(eos, dtype=torch.int64, device=DEVICE)
    got, want = _chain_inputs(ids, bad, pos), _chain_inputs(ids, bad, pos)
    mod.ring_chain(*got, eos_t, 10, 64)
    want = tuple(t.cpu() for t in want)
    mod.ring_chain_reference(*want, eos_t.cpu(), 10, 64)
    for g, w in zip(got, want, strict=True):
        assert g.cpu().tolist() == w.tolist()
    nxt, slot = got[2].cpu(), got[3].cpu()
    assert nxt[1].tolist() == want_pos
    assert nxt[0].tolist() == [t if t < 64 else 0 for t in ids]
    assert slot.tolist() == [*ids, bad]
    if not bad:  # the host's rule on the same step (it applies the max length as a failure, not as padding)
        host = ring_frame(len(ids), np.array(pos, dtype=np.int64).tobytes(), np.array(ids), frozenset(eos))
        host_pos = [-1] * len(ids) if host is None else np.frombuffer(host[1], dtype=np.int64).tolist()
        assert [p if p < 10 else -1 for p in host_pos] == want_pos


def test_ring_chain_refuses_bad_shapes():
    mod = kernel_module("ring_chain")
    result, io, nxt, slot = _chain_inputs([1, 2], 0, [3, 4])
    eos = torch.tensor([-1], dtype=torch.int64, device=DEVICE)
    with pytest.raises(ValueError, match="int64"):
        mod.ring_chain(result.int(), io, nxt, slot, eos, 10, 64)
    with pytest.raises(ValueError, match=r"\[2, B\]"):
        mod.ring_chain(result, io[1:], nxt, slot, eos, 10, 64)
    with pytest.raises(ValueError, match="non-finite flag"):
        mod.ring_chain(result[:2], io, nxt, slot, eos, 10, 64)
    with pytest.raises(ValueError, match="1 to 64 ids"):
        mod.ring_chain(result, io, nxt, slot, eos[:0], 10, 64)
    with pytest.raises(ValueError, match=">= 1"):
        mod.ring_chain(result, io, nxt, slot, eos, 0, 64)


def test_encoder_floor_kernels_do_what_bench_encoder_floor_says() -> None:
    """``bench/encoder_floor.py``'s stripped kernels (the int4 encoder's memory pattern): ``move`` stores a
    nibble of each half of every word and each group's first half-word, ``absmax`` the max 16-bit magnitude
    pattern, ``lite`` a valid int4 payload (|error| <= scale / 2, plus up to 7 x the fp16 scale's rounding)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "encoder_floor.py"
    spec = importlib.util.spec_from_file_location("bench_encoder_floor", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    kernel = mod._kernels()
    x = _rand((4, 4096), torch.float16, seed=11)
    n = x.numel() // 64
    s = torch.empty(n, dtype=torch.int16, device=DEVICE)
    p = torch.empty(n * 32, dtype=torch.uint8, device=DEVICE)
    w = x.view(torch.int32).view(n, 32).cpu()
    kernel[(n // 64,)](x, s, p, GP=64, MODE=0)
    assert torch.equal(s.cpu(), w[:, 0].to(torch.int16))
    assert torch.equal(p.cpu().view(n, 32), ((w & 0xF) | ((w >> 12) & 0xF0)).to(torch.uint8))
    kernel[(n // 64,)](x, s, p, GP=64, MODE=1)
    assert torch.equal(s.cpu(), torch.maximum(w & 0x7FFF, (w >> 16) & 0x7FFF).amax(1).to(torch.int16))
    kernel[(n // 64,)](x, s, p, GP=64, MODE=2)
    scale = s.cpu().view(torch.float16).float()
    b = p.cpu().view(n, 32).to(torch.int32)
    q = torch.stack([b & 0xF, b >> 4], -1).view(n, 64) - 8
    err = (q.float() * scale[:, None] - x.cpu().float().view(n, 64)).abs().amax(1)
    assert bool((err <= scale * 0.5 * 1.02).all()), float((err / scale).max())  # fp16 scale: ~7 x 2**-11
