"""The CUDA decode engine and the worker's GPU step path.

CPU tests check the static decode step (the function the CUDA graphs capture) and the causal
prefill shortcut against the eager float64 path. ``gpu`` tests (skipped without CUDA) check graph
replay against eager and float64 references, pooling, random weights drawn on the device, and
the overlapped worker path against the in-process pipeline.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import re
import uuid
from collections.abc import Sequence

import pytest
import torch

from hyperlane_lab.models import ModelSpec, TorchStage
from hyperlane_lab.models.cache_pool import POOL_ALIGN, pooled_len
from hyperlane_lab.models.cuda_decode import GraphDecoder
from hyperlane_lab.models.layers import LayerWeights, attention_mask, decoder_layer, rope_tables
from hyperlane_lab.models.loading import random_stage_weights
from hyperlane_lab.models.sessions import SessionCache
from hyperlane_lab.models.stage import StageWeights
from hyperlane_lab.types import LayerSpan

# GQA (4 query heads over 2 KV heads), qkv bias, and a sliding window on all but layer 0
SPEC = ModelSpec(
    "qwen2", 3, 64, 4, 2, 16, 128, 97, 1e-6, sliding_window=6, full_attention_layers=(0,), qkv_bias=True
)


def _stages(
    spec: ModelSpec, cuts: Sequence[int], dtype: torch.dtype, device: str, seed: int = 3
) -> list[TorchStage]:
    bounds = [0, *cuts, spec.n_layers]
    return [
        TorchStage.random(spec, LayerSpan(a, b), seed=seed, dtype=dtype, device=device, std=0.2)
        for a, b in itertools.pairwise(bounds)
    ]


def _cpu64(stages: list[TorchStage]) -> list[TorchStage]:
    """float64 CPU copies of ``stages`` (same weights: on CUDA random weights are drawn on the device)."""

    def cp(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.detach().to("cpu", torch.float64)

    out = []
    for st in stages:
        w = st.weights
        layers = [LayerWeights(*(cp(getattr(lw, f.name)) for f in dataclasses.fields(lw))) for lw in w.layers]
        sw = StageWeights(layers, cp(w.embed), cp(w.norm), cp(w.lm_head))
        out.append(TorchStage(st.spec, st.span, sw, torch.float64, "cpu"))
    return out


def _prompt(batch_lens: Sequence[int], vocab: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    width = max(batch_lens)
    ids = torch.randint(0, vocab, (len(batch_lens), width), generator=g)
    pos = torch.full((len(batch_lens), width), -1, dtype=torch.int64)
    for b, n in enumerate(batch_lens):
        pos[b, :n] = torch.arange(n)
    return ids, pos


def _run(
    stages: list[TorchStage], sid: str, x: torch.Tensor, pos: torch.Tensor, static: bool
) -> torch.Tensor:
    for st in stages:
        if static and pos.shape[1] == 1:
            x = (
                GraphDecoder(st).eager_step(st.session(sid), x, pos)
                if st.device.type == "cpu"
                else st.forward(sid, x, pos)
            )
        else:
            x = st.forward(sid, x, pos)
    return x


def _decode(
    stages: list[TorchStage], lens: Sequence[int], steps: int, static: bool, max_len: int = 24
) -> list[torch.Tensor]:
    """Prefill then greedy decode; rows become padding (-1) after their 3rd token to cover that path."""
    sid = uuid.uuid4().hex
    for st in stages:
        st.open_session(sid, len(lens), max_len)
    ids, pos = _prompt(lens, stages[0].spec.vocab_size)
    out = [_run(stages, sid, ids, pos, static).double().cpu()]
    cur = torch.tensor(lens)
    for t in range(steps):
        nxt = out[-1].argmax(-1)[:, None]
        p = cur[:, None].clone()
        if t >= 3 and len(lens) > 1:
            p[0] = -1  # row 0 finished: padding from now on
        out.append(_run(stages, sid, nxt, p, static).double().cpu())
        cur += 1
    for st in stages:
        st.close_session(sid)
    return out


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# ---------------------------------------------------------------------- CPU


def test_static_decode_step_equals_eager_float64():
    eager = _stages(SPEC, [2], torch.float64, "cpu")
    ref = _decode(eager, [5, 3], steps=8, static=False)
    got = _decode(eager, [5, 3], steps=8, static=True)
    for i, (a, b) in enumerate(zip(got, ref)):
        rows = slice(1, None) if i >= 4 else slice(None)  # row 0 is padding from output 4 on
        assert _rel(a[rows], b[rows]) < 1e-12, f"step {i}"


def test_causal_prefill_equals_masked_float64():
    spec = SPEC
    lw = random_stage_weights(spec, LayerSpan(0, 1), seed=1, dtype=torch.float64, std=0.2).layers[0]
    bsz, seq, max_len = 2, 7, 10
    pos = torch.arange(seq).expand(bsz, seq)
    cos_t, sin_t = rope_tables(spec, max_len, "cpu")
    cos, sin = cos_t[pos].double()[:, None], sin_t[pos].double()[:, None]
    x = torch.randn(
        bsz, seq, spec.hidden_size, dtype=torch.float64, generator=torch.Generator().manual_seed(5)
    )
    outs, caches = [], []
    for causal in (False, True):
        k = torch.zeros(bsz, spec.n_kv_heads, max_len + 1, spec.head_dim, dtype=torch.float64)
        v = torch.zeros_like(k)
        mask = None if causal else attention_mask(pos, seq, None)
        outs.append(decoder_layer(x, lw, spec, cos, sin, k, v, pos, mask, causal))
        caches.append((k, v))
    assert _rel(outs[1], outs[0]) < 1e-12
    assert torch.equal(caches[0][0], caches[1][0]) and torch.equal(caches[0][1], caches[1][1])


def test_fresh_prompt_detection():
    st = _stages(SPEC, [], torch.float32, "cpu")[0]
    assert st._fresh_prompt(torch.arange(5)[None])
    assert not st._fresh_prompt(torch.arange(7)[None])  # the window (6) of layers 1, 2 cuts in
    assert not st._fresh_prompt(torch.tensor([[0, 1, 2, -1]]))  # padding
    assert not st._fresh_prompt(torch.tensor([[3, 4, 5]]))  # continues a cache
    # where a prompt graph may run: every row the same consecutive positions, from any start
    assert st._prompt_start(torch.arange(7)[None]) == 0  # a window cutting in only stops "fresh"
    assert st._prompt_start(torch.arange(3, 9).expand(2, 6)) == 3  # a later chunk, batch 2
    assert st._prompt_start(torch.tensor([[3, 4, 6]])) is None  # a gap
    assert st._prompt_start(torch.tensor([[3, 4], [4, 5]])) is None  # rows at different positions
    assert st._prompt_start(torch.tensor([[-1, 0, 1]])) is None  # padding
    assert st._prompt_start(torch.tensor([[5]])) is None  # a decode step (its own graph)


def _kernels():
    """``codecs._kernels`` once Triton is importable (it is a Linux-only dependency), else skip."""
    pytest.importorskip("triton")
    from hyperlane_lab.codecs import _kernels

    return _kernels


def test_fused_layer_split_equals_the_static_step_on_cpu():
    """``decode_fused.make_fused_layer`` (norm + q/k/v, attention, the rest) driven through
    ``static_decode_step(fused=True)`` equals the plain static step in float64, with the attention
    kernel's torch reference standing in for the kernel (GQA, qkv bias, sliding windows, padding)."""
    ref_attn = _kernels().kernel_module("decode_attn")
    from hyperlane_lab.models.decode_fused import make_fused_layer
    from hyperlane_lab.models.decode_static import static_decode_step

    layer = make_fused_layer(ref_attn.decode_attention_ref, torch.nn.functional.linear, False)
    stages = _stages(SPEC, [1], torch.float64, "cpu")
    for st in stages:
        L = 12
        st.open_session("a", 2, L)
        st.open_session("b", 2, L)
        a, b = st.session("a"), st.session("b")
        cos_t, sin_t = st._rope_for(L)
        keys = torch.arange(L + 1)
        g = torch.Generator().manual_seed(1)
        for p in range(9):
            x = (
                torch.randint(0, SPEC.vocab_size, (2, 1), generator=g)
                if st.is_first
                else torch.randn(2, 1, SPEC.hidden_size, generator=g, dtype=torch.float64)
            )
            pos = torch.tensor([[p], [p if p < 5 else -1]])  # row 1 turns into padding
            want = static_decode_step(st, a, x, pos, cos_t, sin_t, keys)
            got = static_decode_step(st, b, x, pos, cos_t, sin_t, keys, layer, fused=True)
            assert torch.allclose(got[:1], want[:1], rtol=1e-9, atol=1e-9), p
            if p < 5:
                assert torch.allclose(got, want, rtol=1e-9, atol=1e-9), p
        for ka, kb in zip(a.k + a.v, b.k + b.v):
            assert torch.allclose(ka[:, :, :L], kb[:, :, :L], atol=1e-12)


def test_a_workers_health_reports_its_stages_decode_choices_as_json(tmp_path):
    """Health's ``decode_choices``: "" with no shard, "{}" for a stage without a CUDA decoder yet, the
    decoder's own choices (a copy) once it has them, and a clear error entry for what JSON cannot hold."""
    from hyperlane_lab.runtime.worker import Worker, WorkerConfig

    w = Worker(WorkerConfig(device="cpu", cache_dir=str(tmp_path)))
    assert w.decode_choices() == ""
    st = _stages(SPEC, [], torch.float32, "cpu")[0]
    w.set_engine(st, "torch", 0)
    assert st.graph_decoder() is None and json.loads(w.decode_choices()) == {}  # CPU: no graph decoder
    # as a CUDA stage holds one (its choices are made at the first capture)
    st._graphs = gd = GraphDecoder(st)
    gd.gemv_choice.update(
        {"4096x4096": {"triton": True, "us": {"cublas": 12.5, "64x64w4s3": 11.0}}, "pdl": "off"}
    )
    got = st.decode_choices()
    assert got == gd.gemv_choice and got is not gd.gemv_choice
    assert json.loads(w.decode_choices()) == gd.gemv_choice
    gd.gemv_choice[(1, 2)] = "a key JSON cannot hold"  # type: ignore[index]
    assert "decode choices not reportable" in json.loads(w.decode_choices())["error"]


def test_graph_decoder_pools_caches_on_cpu():
    st = _stages(SPEC, [], torch.float32, "cpu")[0]
    gd = GraphDecoder(st, pool_size=1)
    a = gd.new_cache(2, 8)
    assert (a.max_len, a.limit) == (pooled_len(8, SPEC.max_position), 8)
    a.k[0].fill_(1.0)
    gd.release(a)
    b = gd.new_cache(2, 9)  # another length of the same pooled size: the parked cache (and graph)
    assert b is a and b.limit == 9 and all(int(t.count_nonzero()) == 0 for t in b.k + b.v)  # zeroed
    gd.release(b)
    c = gd.new_cache(2, POOL_ALIGN + 1)  # the next size up: a cache of its own
    assert c is not a and c.max_len == 2 * POOL_ALIGN
    assert gd.new_cache(1, 8) is not a  # another batch size: not the parked one either
    assert gd.new_cache(2, 8) is a  # which is still there for its own shape
    gd.release(a)
    gd.release(c)  # pool_size 1: the older one (a) is dropped
    assert gd.new_cache(2, 8) is not a


def test_pdl_is_asked_for_by_the_environment_and_needs_a_hopper_gpu(monkeypatch, caplog, tmp_path):
    """Unset, the all-Triton layer, PDL and the early first tile are on for every stage: a whole model, a split
    stage, a worker's stage; each variable set decides its piece. A CPU stage (or a pre-Hopper GPU, or the
    interpreter) never launches with PDL. ``HYPERLANE_PDL_PREFETCH=1`` without PDL does nothing, and says so."""
    from hyperlane_lab.runtime.worker import Worker, WorkerConfig

    for name in ("HYPERLANE_PDL", "HYPERLANE_PDL_PREFETCH", "HYPERLANE_TRITON_LAYER"):  # may be exported
        monkeypatch.delenv(name, raising=False)
    whole = _stages(SPEC, [], torch.float32, "cpu")[0]
    split = _stages(SPEC, [1], torch.float32, "cpu")

    def pieces(g: GraphDecoder) -> tuple[bool, bool, bool]:
        return g.triton_layer_enabled, g.pdl_enabled, g.pdl_prefetch

    gd = GraphDecoder(whole)
    assert pieces(gd) == (True, True, True)
    assert not gd.pdl() and gd.pdl_mode() == "off"  # a CPU stage: no PDL whatever the switch
    gd._pdl_supported = lambda: True  # type: ignore[method-assign]  # as on a Hopper GPU
    assert gd.pdl() and gd.pdl_mode() == "pdl+prefetch"
    assert not gd._pdl_outside_layer()  # by default PDL launches the all-Triton layer only
    for st in split:
        g = GraphDecoder(st)
        assert pieces(g) == (True, True, True) and g._layer_auto and g._pdl_auto
    w = Worker(WorkerConfig(device="cpu", cache_dir=str(tmp_path)))
    w.set_engine(split[1], "torch", 1)  # a worker's stage: the same defaults
    assert pieces(GraphDecoder(split[1])) == (True, True, True)
    monkeypatch.setenv("HYPERLANE_PDL", "0")  # off where it would be on by default; no prefetch warning
    with caplog.at_level(logging.WARNING, logger="hyperlane_lab.models.cuda_decode"):
        assert pieces(GraphDecoder(whole)) == (True, False, False)
    assert "does nothing" not in caplog.text
    monkeypatch.setenv("HYPERLANE_PDL_PREFETCH", "1")
    with caplog.at_level(logging.WARNING, logger="hyperlane_lab.models.cuda_decode"):
        gd = GraphDecoder(split[0])
    assert "HYPERLANE_PDL=0 does nothing" in caplog.text and not gd.pdl()
    monkeypatch.delenv("HYPERLANE_PDL_PREFETCH")
    monkeypatch.delenv("HYPERLANE_PDL")
    monkeypatch.setenv("HYPERLANE_TRITON_LAYER", "0")  # the compiled layer; PDL (the layer's only) unused
    assert pieces(GraphDecoder(split[0])) == (False, True, True)
    monkeypatch.setenv("HYPERLANE_PDL", "1")
    monkeypatch.setenv("HYPERLANE_TRITON_LAYER", "1")
    gd = GraphDecoder(split[0])  # set: each piece as asked, PDL for the compiled layer's kernels too
    assert pieces(gd) == (True, True, True) and not gd.pdl() and gd.pdl_mode() == "off"
    gd._pdl_supported = lambda: True  # type: ignore[method-assign]
    assert gd.pdl() and gd.pdl_mode() == "pdl+prefetch" and gd._pdl_outside_layer()


def test_the_all_triton_layer_is_on_by_default_only_with_pdl(monkeypatch):
    """By default a stage takes the five-launch layer only where PDL launches it (alone it
    lost to the compiled layer), and launches only that layer with PDL: the compiled layer's GEMVs and
    attention (batch > 1, or where the layer does not apply) keep plain launches. ``HYPERLANE_PDL=1`` puts
    them on PDL too; ``HYPERLANE_TRITON_LAYER=1`` takes the layer without PDL."""
    from hyperlane_lab.models import cuda_decode

    for name in ("HYPERLANE_PDL", "HYPERLANE_PDL_PREFETCH", "HYPERLANE_TRITON_LAYER"):
        monkeypatch.delenv(name, raising=False)
    whole = _stages(SPEC, [], torch.float32, "cpu")[0]
    layers: list[tuple[object, bool, bool]] = []
    linears: list[tuple[bool, bool]] = []

    def attention(*a, pdl=False):  # stands in for the one-kernel attention
        return None

    def fake_layer(attn, cfgs, pdl=False, prefetch=False):
        layers.append((attn, pdl, prefetch))
        return lambda *a: None

    def fake_linear(table, pdl=False, prefetch=False):
        linears.append((pdl, prefetch))
        return lambda x, w, b=None: x  # a Triton GEMV table (not F.linear)

    monkeypatch.setattr(cuda_decode, "fused_attention_kernel", lambda device: attention)
    monkeypatch.setattr(cuda_decode, "choose_linears", lambda st, pins=None: ({(8, 8): "cfg"}, {}))
    monkeypatch.setattr(cuda_decode, "make_linear", fake_linear)
    monkeypatch.setattr(cuda_decode, "triton_layer_configs", lambda w, choice: {"wqkv": "cfg"})
    monkeypatch.setattr(cuda_decode, "make_triton_layer", fake_layer)

    def decoder(pdl_ok: bool) -> GraphDecoder:
        gd = GraphDecoder(whole)
        gd._pdl_supported = lambda: pdl_ok  # type: ignore[method-assign]  # a Hopper GPU or not
        return gd

    assert decoder(pdl_ok=False).triton_layer() is None and layers == []
    assert linears[-1] == (False, False)
    gd = decoder(pdl_ok=True)
    assert callable(gd.triton_layer())
    assert gd.attention_kernel() is attention and linears[-1] == (False, False)  # the compiled path: plain
    attn, pdl, prefetch = layers[-1]
    assert (pdl, prefetch) == (True, True) and attn.func is attention and attn.keywords == {"pdl": True}
    assert gd.gemv_choice["triton_layer_pdl"] == "pdl+prefetch" and gd.gemv_choice["pdl"] == "off"
    monkeypatch.setenv("HYPERLANE_PDL", "1")  # asked for: the compiled layer's kernels launch with PDL too
    gd = decoder(pdl_ok=True)
    assert callable(gd.triton_layer()) and linears[-1] == (True, True)
    assert gd.attention_kernel().keywords == {"pdl": True} and layers[-1][0] is gd.attention_kernel()
    monkeypatch.delenv("HYPERLANE_PDL")
    monkeypatch.setenv("HYPERLANE_TRITON_LAYER", "1")
    assert callable(decoder(pdl_ok=False).triton_layer()) and layers[-1][1:] == (False, False)


def test_a_failed_warm_up_turns_off_pdl_only_where_it_was_used(monkeypatch):
    """By default: a warm-up that failed without the all-Triton layer (a compiled-layer capture,
    launched plainly) leaves PDL on and turns off the next piece; one that failed in the layer turns PDL
    off, and with it the default layer; ``configure()`` decides both again."""
    from hyperlane_lab.models import cuda_decode

    for name in ("HYPERLANE_PDL", "HYPERLANE_PDL_PREFETCH", "HYPERLANE_TRITON_LAYER"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(cuda_decode, "fused_attention_kernel", lambda device: lambda *a, pdl=False: None)
    monkeypatch.setattr(cuda_decode, "choose_linears", lambda st, pins=None: ({(8, 8): "cfg"}, {}))
    monkeypatch.setattr(
        cuda_decode, "make_linear", lambda table, pdl=False, prefetch=False: lambda x, w, b=None: x
    )
    monkeypatch.setattr(cuda_decode, "triton_layer_configs", lambda w, choice: {"wqkv": "cfg"})
    monkeypatch.setattr(cuda_decode, "make_triton_layer", lambda *a, **k: lambda *x: None)
    whole = _stages(SPEC, [], torch.float32, "cpu")[0]

    def decoder() -> GraphDecoder:
        gd = GraphDecoder(whole)
        gd._pdl_supported = lambda: True  # type: ignore[method-assign]  # as on a Hopper GPU
        assert callable(gd.triton_layer()) and callable(gd.attention_kernel())
        return gd

    gd = decoder()
    assert gd._degrade(RuntimeError("batch-2 capture"), used_tlayer=False)
    assert gd.pdl() and gd.fallbacks == ["fused attention: RuntimeError: batch-2 capture"]
    gd = decoder()
    assert gd._degrade(RuntimeError("layer capture"), used_tlayer=True)
    assert not gd.pdl() and gd.fallbacks[-1].startswith("programmatic dependent launch")
    assert callable(gd.attention_kernel()) and gd.triton_layer() is None  # attention kept; no PDL, no layer
    gd.configure(False)
    assert gd.pdl() and callable(gd.triton_layer())


def test_the_greedy_kernel_serves_small_batches_on_cuda_and_falls_back(monkeypatch):
    """The one-launch greedy kernel serves up to GREEDY_ROWS rows of a CUDA stage; CPU stages, wider batches
    and ``HYPERLANE_TRITON_GREEDY=0`` keep the torch ops; a kernel that fails its warm-up is turned off
    (recorded in ``fallbacks``) and the torch ops give the result."""
    from hyperlane_lab.models import cuda_decode

    monkeypatch.delenv("HYPERLANE_TRITON_GREEDY", raising=False)
    st = _stages(SPEC, [], torch.float32, "cpu")[0]
    logits = torch.randn(2, 97)
    assert GraphDecoder(st).pack_fn(1) is cuda_decode.greedy_pack  # a CPU stage
    calls: list[int] = []

    def kernel(x: torch.Tensor) -> torch.Tensor:
        calls.append(x.shape[0])
        return cuda_decode.greedy_pack(x)

    gd = GraphDecoder(st)
    gd._greedy = kernel  # as found on a CUDA device
    rows = cuda_decode.GREEDY_ROWS
    assert gd.pack_fn(rows) is kernel and gd.pack_fn(rows + 1) is cuda_decode.greedy_pack
    pack, out = gd._warm_pack(logits)
    assert pack is kernel and calls == [2] and torch.equal(out, cuda_decode.greedy_pack(logits))

    def broken(x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("no kernel image")

    gd._greedy = broken
    pack, out = gd._warm_pack(logits)
    assert pack is cuda_decode.greedy_pack and torch.equal(out, cuda_decode.greedy_pack(logits))
    assert gd.fallbacks == ["Triton greedy: RuntimeError: no kernel image"] and gd.pack_fn(1) is pack
    monkeypatch.setenv("HYPERLANE_TRITON_GREEDY", "0")
    gd = GraphDecoder(st)
    monkeypatch.setattr(gd.stage, "device", torch.device("cuda", 0))  # as a CUDA stage: still torch
    assert gd.pack_fn(1) is cuda_decode.greedy_pack


def test_gemv_pins_set_shapes_rather_than_timing_them(monkeypatch):
    """``HYPERLANE_GEMV_PIN``: ``NxK=NAME`` items pin a shape's decode product (a Triton config by its
    timing-table name, or cuBLAS) in the product table and in the all-Triton layer, whatever the timings say;
    shapes a stage lacks are ignored; a malformed item or an unknown name is refused with the valid names,
    when the decoder is made (not at its first capture)."""
    from types import SimpleNamespace

    from hyperlane_lab.models.decode_fused import triton_layer_configs
    from hyperlane_lab.models.decode_linear import apply_pins, gemv_pins

    gk = _kernels().kernel_module("gemv")
    by_name = {gk.config_name(c): c for c in gk.CONFIGS}
    plain = [n for n, c in by_name.items() if c.split_k == 1]
    split = next(n for n, c in by_name.items() if c.split_k > 1)
    assert gemv_pins({}) == {} and gemv_pins({"HYPERLANE_GEMV_PIN": " "}) == {}
    env = {"HYPERLANE_GEMV_PIN": f"4096x4096={plain[1]}, 4096x11008 = cublas,32000x4096={plain[2]},"}
    pins = gemv_pins(env)
    assert pins == {"4096x4096": plain[1], "4096x11008": "cublas", "32000x4096": plain[2]}
    for bad in ("4096x4096", "4096=8x512w4s3", "4096x4096="):
        with pytest.raises(ValueError, match="is not SHAPE=CONFIG"):
            gemv_pins({"HYPERLANE_GEMV_PIN": bad})
    assert gemv_pins({"HYPERLANE_GEMV_PIN": f"04096x4096={plain[0]},4096x4096={plain[0]}"}) == {
        "4096x4096": plain[0]
    }
    with pytest.raises(ValueError, match="4096x4096 is pinned twice"):
        gemv_pins({"HYPERLANE_GEMV_PIN": f"4096x4096={plain[0]},4096x04096=cublas"})
    with pytest.raises(ValueError, match=f"unknown config.*'9x9w1s1'.*valid: cublas, {plain[0]}"):
        gemv_pins({"HYPERLANE_GEMV_PIN": "4096x4096=9x9w1s1"})
    monkeypatch.setenv("HYPERLANE_GEMV_PIN", "4096x4096=nope")
    with pytest.raises(ValueError, match="unknown config"):
        GraphDecoder(_stages(SPEC, [], torch.float32, "cpu")[0])
    # the decoder hands its pins to the timing step
    from hyperlane_lab.models import cuda_decode

    seen = []
    monkeypatch.setattr(cuda_decode, "choose_linears", lambda st, pins=None: (seen.append(pins), ({}, {}))[1])
    monkeypatch.setenv("HYPERLANE_GEMV_PIN", f"64x64={plain[0]}")
    GraphDecoder(_stages(SPEC, [], torch.float32, "cpu")[0]).linear()
    assert seen == [{"64x64": plain[0]}]
    monkeypatch.delenv("HYPERLANE_GEMV_PIN")

    # the product table: pinned shapes take the pin (cuBLAS = None), the others keep their timed choice
    fast = {"cublas": 30.0, **{n: 20.0 + i for i, n in enumerate(by_name)}}
    table = {(4096, 4096): by_name[plain[0]], (4096, 11008): by_name[plain[0]], (12288, 4096): None}
    choice = {f"{n}x{k}": {"triton": c is not None, "us": dict(fast)} for (n, k), c in table.items()}
    apply_pins(table, choice, pins, by_name)  # 32000x4096: not in this stage, listed
    assert table == {(4096, 4096): by_name[plain[1]], (4096, 11008): None, (12288, 4096): None}
    assert choice["4096x4096"]["pinned"] == plain[1] and choice["4096x4096"]["triton"] is True
    assert choice["4096x11008"] == {"triton": False, "us": fast, "pinned": "cublas"}
    assert "pinned" not in choice["12288x4096"] and "32000x4096" not in choice
    assert choice["pins_unmatched"] == ["32000x4096"]
    # a pinned config that failed where the others were timed keeps the timed choice
    table = {(4096, 4096): by_name[plain[0]]}
    failed = {"4096x4096": {"triton": True, "us": {k: v for k, v in fast.items() if k != plain[1]}}}
    apply_pins(table, failed, {"4096x4096": plain[1]}, by_name)
    assert table == {(4096, 4096): by_name[plain[0]]} and failed["4096x4096"]["pin_failed"] == plain[1]
    assert "pinned" not in failed["4096x4096"]
    apply_pins(
        table, failed, {"4096x4096": plain[1]}, by_name, timed=lambda n: plain[:1]
    )  # not timed: pinned
    assert table == {(4096, 4096): by_name[plain[1]]}

    # the all-Triton layer: a pinned role takes its pin even where another config timed faster
    w = SimpleNamespace(wqkv=torch.empty(192, 64), wo=torch.empty(64, 64), w_gate_up=torch.empty(256, 64),
                        w_down=torch.empty(64, 128))  # fmt: skip
    timed = {
        f"{n}x{k}": {"triton": True, "us": dict(fast)} for n, k in ((192, 64), (64, 64), (256, 64), (64, 128))
    }
    best = triton_layer_configs(w, timed)
    assert best is not None and best["wo"] == by_name[plain[0]]  # the fastest timing
    pinned = {
        **timed,
        "64x64": {**timed["64x64"], "pinned": split},
        "192x64": {**timed["192x64"], "pinned": plain[3]},
    }
    got = triton_layer_configs(w, pinned)
    assert got is not None and got["wo"] == by_name[split] and got["wqkv"] == by_name[plain[3]]
    assert triton_layer_configs(w, {**timed, "64x64": {**timed["64x64"], "pinned": "cublas"}}) is None
    assert (
        triton_layer_configs(w, {**timed, "192x64": {**timed["192x64"], "pinned": split}}) is None
    )  # normed


def test_pooled_len_rounds_up_within_the_context():
    assert [pooled_len(n, 4096) for n in (1, 255, 256, 257, 4000, 4096)] == [256, 256, 256, 512, 4096, 4096]
    assert pooled_len(300, 300) == 300 and pooled_len(300, 400) == 400  # not past the model's context
    assert pooled_len(5000, 4096) == 5000  # asked for more than the context: as asked


def test_pool_align_from_the_environment(monkeypatch):
    st = _stages(SPEC, [], torch.float32, "cpu")[0]
    monkeypatch.setenv("HYPERLANE_POOL_ALIGN", "1")  # exact lengths, as before pooling by size
    assert GraphDecoder(st).new_cache(1, 9).max_len == 9
    monkeypatch.setenv("HYPERLANE_POOL_ALIGN", "zero")
    with pytest.raises(ValueError, match="HYPERLANE_POOL_ALIGN must be a positive integer"):
        GraphDecoder(st)


def test_a_pooled_cache_that_does_not_fit_falls_back_to_the_asked_length(monkeypatch):
    st = _stages(SPEC, [], torch.float32, "cpu")[0]
    gd = GraphDecoder(st)
    real = SessionCache.zeros

    def tight(batch, max_len, *args):  # memory for 100 positions, no more
        if max_len > 100:
            raise torch.OutOfMemoryError("CUDA out of memory (test)")
        return real(batch, max_len, *args)

    monkeypatch.setattr(SessionCache, "zeros", staticmethod(tight))
    c = gd.new_cache(1, 20)
    assert (c.max_len, c.limit) == (20, 20)
    with pytest.raises(torch.OutOfMemoryError):
        gd.new_cache(1, 101)  # the asked length itself does not fit: the error stands


def test_a_pooled_cache_keeps_the_session_limit_and_the_eager_outputs():
    """A session on a cache longer than it asked for (as the CUDA engine pools them) refuses positions
    past its own max_len and computes what a cache of exactly its length gives."""
    pooled, exact = _stages(SPEC, [], torch.float32, "cpu")[0], _stages(SPEC, [], torch.float32, "cpu")[0]
    gd = GraphDecoder(pooled)
    pooled._new_cache = gd.new_cache  # what TorchStage does on CUDA
    ids = torch.randint(0, SPEC.vocab_size, (1, 6), generator=torch.Generator().manual_seed(5))
    for st in (pooled, exact):
        st.open_session("s", 1, 8)
    assert pooled.session("s").max_len > exact.session("s").max_len == 8
    assert gd.cache_len(8) == pooled.session("s").max_len
    pos = torch.arange(6)[None]
    torch.testing.assert_close(pooled.forward("s", ids, pos), exact.forward("s", ids, pos), rtol=0, atol=0)
    nxt, p6 = ids[:, :1], torch.tensor([[6]])
    torch.testing.assert_close(pooled.forward("s", nxt, p6), exact.forward("s", nxt, p6), rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"beyond session 's''s max length 8"):
        pooled.forward("s", nxt, torch.tensor([[8]]))


# ---------------------------------------------------------------------- CUDA

gpu = pytest.mark.gpu


@gpu
@pytest.mark.parametrize("fused", [True, False], ids=["fused_attention", "plain_attention"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_graph_decode_matches_eager_and_float64(dtype, fused):
    """Captured decode (with the one-kernel attention of decode_fused.py, or the plain ops) vs the
    eager static step and float64: GQA, a qkv bias, sliding windows (positions past the window),
    and a padded row."""
    fast = _stages(SPEC, [1], dtype, "cuda")
    slow = _stages(SPEC, [1], dtype, "cuda")
    for st in fast:
        st.graph_decoder()._attn = None if fused else False  # None: the kernel where it applies
    ref = _decode(_cpu64(fast), [6, 4], steps=10, static=False)
    for st in slow:
        st.cuda_graphs = False
    got = _decode(fast, [6, 4], steps=10, static=True)
    eager = _decode(slow, [6, 4], steps=10, static=False)
    tol = 2e-2 if dtype == torch.float16 else 6e-2
    for i, (a, b, r) in enumerate(zip(got, eager, ref)):
        rows = slice(1, None) if i >= 4 else slice(None)
        assert torch.isfinite(a).all()
        assert _rel(a[rows], r[rows]) < tol, f"step {i} vs float64"
        assert _rel(a[rows], b[rows]) < tol, f"step {i} vs eager"
    assert all(st.graph_decoder().captures == 1 for st in fast)
    assert all(st.graph_decoder().replays == 10 for st in fast)
    assert all((st.graph_decoder().attention_kernel() is not None) == fused for st in fast)
    assert all(st.graph_decoder().fallbacks == [] for st in fast)


@gpu
def test_graph_pool_reuses_graphs_and_interleaves_sessions():
    stages = _stages(SPEC, [2], torch.float16, "cuda")
    first = _decode(stages, [5], steps=6, static=True)
    again = _decode(stages, [5], steps=6, static=True)  # same shape: pooled cache + graph
    other = _decode(stages, [5], steps=6, static=True, max_len=40)  # another length, same pooled size
    assert all(st.graph_decoder().captures == 1 for st in stages)
    for a, b, c in zip(first, again, other):
        assert torch.equal(a, b) and torch.equal(a, c)
    # two sessions stepped alternately give what each gives alone
    sids = [uuid.uuid4().hex, uuid.uuid4().hex]
    prompts = [_prompt([5], SPEC.vocab_size, seed=s) for s in (0, 7)]
    alone = [_decode(stages, [5], steps=0, static=True)[0]]
    for sid in sids:
        for st in stages:
            st.open_session(sid, 1, 24)
    outs = {sid: [_run(stages, sid, *prompts[i], True).double().cpu()] for i, sid in enumerate(sids)}
    for t in range(6):
        for sid in sids:
            nxt = outs[sid][-1].argmax(-1)[:, None]
            outs[sid].append(_run(stages, sid, nxt, torch.tensor([[5 + t]]), True).double().cpu())
    for sid in sids:
        for st in stages:
            st.close_session(sid)
    assert torch.equal(outs[sids[0]][0], alone[0])
    for a, b in zip(outs[sids[0]], first):
        assert torch.equal(a, b)


@gpu
def test_bundled_model_graph_decode_matches_transformers(hf_model, tokenizer):
    from hyperlane_lab.generation.pipeline import InProcessPipeline

    pipe = InProcessPipeline.from_pretrained(None, n_stages=2, dtype="fp16", device="cuda")
    eager = InProcessPipeline.from_pretrained(None, n_stages=2, dtype="fp16", device="cuda")
    for st in eager.stages:
        st.cuda_graphs = False
    prompt = "Once upon a time"
    res = pipe.generate(prompt, max_tokens=40)
    assert res.token_ids == eager.generate(prompt, max_tokens=40).token_ids
    assert sum(st.graph_decoder().replays for st in pipe.stages) >= 2 * 39
    # teacher-forced logits of transformers (fp32, CPU) at every generated position
    ids = torch.tensor([res.prompt_token_ids + res.token_ids])
    with torch.no_grad():
        ref = hf_model(ids).logits[0].double()
    sid = uuid.uuid4().hex
    for st in pipe.stages:
        st.open_session(sid, 1, ids.shape[1] + 1)
    n0 = len(res.prompt_token_ids)
    x = _run(pipe.stages, sid, ids[:, :n0], torch.arange(n0)[None], True)
    assert _rel(x.double().cpu()[0], ref[n0 - 1]) < 2e-2
    for t in range(n0, ids.shape[1]):
        x = _run(pipe.stages, sid, ids[:, t : t + 1], torch.tensor([[t]]), True)
        assert _rel(x.double().cpu()[0], ref[t]) < 2e-2, f"position {t}"


@gpu
def test_random_weights_are_drawn_on_the_device():
    spec = ModelSpec("llama", 4, 64, 4, 4, 16, 96, 50)
    a = random_stage_weights(spec, LayerSpan(0, 4), seed=9, dtype=torch.float16, device="cuda")
    b = random_stage_weights(spec, LayerSpan(2, 4), seed=9, dtype=torch.float16, device="cuda")
    c = random_stage_weights(spec, LayerSpan(0, 4), seed=10, dtype=torch.float16, device="cuda")
    assert a.layers[0].wqkv.device.type == "cuda" and a.layers[0].wqkv.dtype == torch.float16
    assert torch.equal(a.layers[2].w_down, b.layers[0].w_down)  # layer 2 does not depend on the span
    assert not torch.equal(a.layers[2].w_down, c.layers[2].w_down)
    std = float(a.layers[1].w_gate_up.float().std())
    assert 0.015 < std < 0.025


@gpu
@pytest.mark.multiprocess
def test_worker_gpu_path_matches_inprocess(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    from hyperlane_lab.generation.pipeline import InProcessPipeline
    from hyperlane_lab.runtime import AutoDistributedModel, LocalCluster

    local = InProcessPipeline.from_pretrained(None, n_stages=2, dtype="fp16", device="cuda")
    prompts = ["Once upon a time", "The cat sat on the mat", "Lily and Ben went to the park. They saw"]
    with (
        LocalCluster(2, devices=["cuda:0", "cuda:0"], cache_dir=tmp_path) as cluster,
        AutoDistributedModel.from_pretrained(
            None, workers=cluster.addresses, dtype="fp16", progress=False
        ) as m,
    ):
        for p in prompts:
            assert m.generate(p, max_tokens=32).token_ids == local.generate(p, max_tokens=32).token_ids
        kw = dict(max_tokens=16, temperature=0.9, top_k=40, top_p=0.95, seed=1234)
        assert m.generate(prompts[0], **kw).token_ids == local.generate(prompts[0], **kw).token_ids
        batch = m.generate(prompts, max_tokens=12)
        assert [r.token_ids for r in batch] == [r.token_ids for r in local.generate(prompts, max_tokens=12)]
        seq = [m.generate(p, max_tokens=24).token_ids for p in prompts * 2]
        with ThreadPoolExecutor(6) as ex:
            conc = list(ex.map(lambda p: m.generate(p, max_tokens=24).token_ids, prompts * 2))
        assert conc == seq
        events = m.trace_events()
        comp = [e for e in events if e.kind.value == "compute"]
        assert {e.stage for e in comp} == {0, 1}
        assert all(e.end >= e.start for e in comp)
        durations = sorted(e.end - e.start for e in comp if e.step > 0)
        assert 0 < durations[len(durations) // 2] < 0.05  # GPU time of a decode step, not wall time
        from hyperlane_lab.runtime.proto_gen import hyperlane_pb2 as pb

        # most decode steps took the latency path (enqueued on the worker's I/O loop)
        fast = [c.call("Health", pb.HealthRequest()).fast_path_steps for c in m.clients]
        decode_steps = sum(1 for e in comp if e.step > 0)
        assert sum(fast) > decode_steps // 4, (fast, decode_steps)
        # each worker timed its own decode products at its first capture, and Health reports the choice
        for c in m.clients:
            assert c.call("Health", pb.HealthRequest()).decode_choices == ""  # only when asked for
            ch = json.loads(c.call("Health", pb.HealthRequest(with_decode_choices=True)).decode_choices)
            shapes = [k for k in ch if re.fullmatch(r"\d+x\d+", k)]
            assert shapes and all(
                set(ch[k]) == {"triton", "us"} and "cublas" in ch[k]["us"] for k in shapes
            ), ch


@gpu
@pytest.mark.multiprocess
def test_one_gpu_worker_ring_matches_inprocess_and_times_each_step(tmp_path, monkeypatch):
    """One worker holding every layer: its last stage is its first, so the server-side token loop
    starts a session's next step from the completion thread's ship, before that thread reads the
    step's GPU times (the next step records into another of the session's event sets); greedy, it chains the
    step after that one behind it (its inputs made on the GPU, ``gpu_chain.py``), sampled, it arms it.
    Greedy tokens (one row, and two rows of different lengths: a padding row) and sampled tokens equal the
    in-process pipeline's; every decode step's GPU time is its own: positive, short once the graphs are
    captured, and the steps of a session do not overlap."""
    from hyperlane_lab.generation.pipeline import InProcessPipeline
    from hyperlane_lab.runtime import AutoDistributedModel, LocalCluster

    # both sides would take the PDL layer, its configs tuned by timing the step in each process (so they may
    # differ): pin both to the compiled layer, so that the tokens compare one path (worker vs in-process)
    monkeypatch.setenv("HYPERLANE_TRITON_LAYER", "0")
    monkeypatch.setenv("HYPERLANE_PDL", "0")
    local = InProcessPipeline.from_pretrained(None, n_stages=1, dtype="fp16", device="cuda")
    prompt = "Once upon a time"
    with (
        LocalCluster(1, devices=["cuda:0"], cache_dir=tmp_path) as cluster,
        AutoDistributedModel.from_pretrained(
            None, workers=cluster.addresses, dtype="fp16", progress=False
        ) as m,
    ):
        for _ in range(2):  # the second pass replays captured graphs
            assert (
                m.generate(prompt, max_tokens=48).token_ids == local.generate(prompt, max_tokens=48).token_ids
            )
        kw = dict(max_tokens=24, temperature=0.9, top_k=40, top_p=0.95, seed=7)
        assert m.generate(prompt, **kw).token_ids == local.generate(prompt, **kw).token_ids
        comp = sorted((e for e in m.trace_events() if e.kind.value == "compute"), key=lambda e: e.start)
        two = ["Lily went to the park", "Tom"]
        assert [o.token_ids for o in m.generate(two, max_tokens=32)] == [
            o.token_ids for o in local.generate(two, max_tokens=32)
        ]
        # the bundled model's stories run past 300 tokens: an extra EOS id (a token the loop samples at step 20,
        # maybe earlier) ends a session early, so the step chained behind its last one runs as padding and
        # ships nothing; one row of two ends before the other (a padding row), and a session opened right after
        # reuses the parked cache behind that wasted step
        stop_id = local.generate(prompt, max_tokens=48).token_ids[20]
        for x in (m, local):
            x.spec = dataclasses.replace(x.spec, eos_token_ids=(*x.spec.eos_token_ids, stop_id))
        short = m.generate(prompt, max_tokens=48).token_ids
        assert short == local.generate(prompt, max_tokens=48).token_ids and len(short) <= 21
        assert [o.token_ids for o in m.generate([prompt, "Tom"], max_tokens=40)] == [
            o.token_ids for o in local.generate([prompt, "Tom"], max_tokens=40)
        ]
        assert m.generate(two[0], max_tokens=24).token_ids == local.generate(two[0], max_tokens=24).token_ids
        by_session: dict[str, list] = {}
        for e in comp:
            by_session.setdefault(e.session, []).append(e)
        assert len(by_session) == 3
        for i, es in enumerate(by_session.values()):  # sessions in the order they started
            took = [e.end - e.start for e in es if e.step > 0]
            assert len(took) >= 20 and min(took) > 0, took
            # the first session's first steps include graph captures (inside their compute span)
            assert (sorted(took)[len(took) // 2] if i == 0 else max(took)) < 0.05, took
            assert all(a.end <= b.start + 1e-4 for a, b in itertools.pairwise(es))  # one step at a time
        from hyperlane_lab.runtime.proto_gen import hyperlane_pb2 as pb

        # greedy, each step after the first two of a session was chained behind the one before it (the two-row
        # session's graph is captured during its run: a few steps fewer)
        h = m.clients[0].call("Health", pb.HealthRequest())
        counts = (h.armed_fired, h.armed_released, h.armed_gave_up, h.ring_here_steps, h.ring_chained_steps)
        assert h.ring_chained_steps >= 85, counts
        # a worker with the GPU to itself arms decode steps by default (LocalCluster); with its token loop in
        # memory each sampled step after the one the completion thread launched is armed behind it (ahead) and
        # fired by its frame; none is left for a gate to wait out its limit
        from hyperlane_lab.models.decode_armed import host_orders_stores

        assert cluster.armed == host_orders_stores()
        assert h.armed_gave_up == 0, counts
        if cluster.armed:
            assert h.armed_fired >= 15 and h.armed_released <= 6, counts
        # its completion thread enqueued or chained the token loop's next steps itself (outbox.ring_here), but
        # for those that came before the session's graph was captured (about a step each session)
        assert h.ring_here_steps + h.ring_chained_steps >= 110, counts


@gpu
def test_prompt_failing_after_its_upload_leaves_the_worker_serving(tmp_path):
    """A 128-token prompt frame for the last stage (16 KB of fp16 hidden states: a pinned pooled body,
    uploaded by DMA) whose positions pass the worker's dispatch checks but not the stage's: the step
    fails after its upload was enqueued. The error reaches the session's reply address, and prompts
    of that size afterwards (the pooled body reused) still give the in-process tokens."""
    import time

    from hyperlane_lab.generation.pipeline import InProcessPipeline
    from hyperlane_lab.runtime import AutoDistributedModel, LocalCluster
    from hyperlane_lab.runtime.control import WorkerClient
    from hyperlane_lab.runtime.dataplane import parse_address
    from hyperlane_lab.runtime.frame import HEADER, FrameHeader, FrameKind, pack_header, unpack_header
    from hyperlane_lab.runtime.proto_gen import hyperlane_pb2 as pb
    from tests.test_codec_wire import _reply_listener, _send_and_wait

    local = InProcessPipeline.from_pretrained(None, n_stages=2, dtype="fp16", device="cuda")
    prompt = "Once upon a time, there was a little girl named Lily. " * 12
    with (
        LocalCluster(2, devices=["cuda:0", "cuda:0"], cache_dir=tmp_path) as cluster,
        AutoDistributedModel.from_pretrained(
            None, workers=cluster.addresses, dtype="fp16", progress=False
        ) as m,
    ):
        want = local.generate(prompt, max_tokens=8).token_ids
        assert m.generate(prompt, max_tokens=8).token_ids == want
        last = WorkerClient(m.plan.stages[1].address)
        srv, got, _th = _reply_listener()
        sid, seq, hidden = uuid.uuid4().hex, 128, local.spec.hidden_size
        try:
            last.call(
                "OpenSession",
                pb.OpenSessionRequest(
                    session_id=sid, batch=1, max_len=seq, reply_to=f"127.0.0.1:{srv.getsockname()[1]}"
                ),
            )
            x = torch.randn(1, seq, hidden).half()
            pos = torch.arange(seq, dtype=torch.int64) + 8  # the last positions are beyond max_len
            payload = x.numpy().tobytes()  # the header counts the payload; positions go before it
            h = FrameHeader(
                FrameKind.TENSOR, sid, 0, 1, seq, torch.float16, 0, 0, (1, seq, hidden), len(payload)
            )
            assert (
                _send_and_wait(
                    parse_address(last.data_address), pack_header(h) + pos.numpy().tobytes() + payload, 1.0
                )
                == "open"
            )
            deadline = time.monotonic() + 20
            while not got and time.monotonic() < deadline:
                time.sleep(0.05)
            assert len(got) == 1
            err = unpack_header(got[0][: HEADER.size])
            assert err.kind == FrameKind.ERROR and b"beyond" in got[0][HEADER.size :]
            health = last.call("Health", pb.HealthRequest())
            assert health.ok and health.pinned_buffers >= 1
        finally:
            last.call("CloseSession", pb.CloseSessionRequest(session_id=sid))
            last.close()
            srv.close()
        for _ in range(2):
            assert m.generate(prompt, max_tokens=8).token_ids == want


@gpu
def test_run_ahead_decode_on_gpu_equals_the_plain_loop(monkeypatch):
    """CUDA graphs fed by the previous step's device-side token give the plain loop's tokens."""
    from hyperlane_lab.generation import pipeline as pl
    from hyperlane_lab.generation.pipeline import InProcessPipeline

    pipe = InProcessPipeline.from_pretrained(None, n_stages=2, dtype="fp16", device="cuda")
    prompts = ["Once upon a time", "The cat", "Lily and Ben went to the park. They saw"]
    with pipe.runner.open_session(1, 8, pl.SamplingParams()) as s:
        assert s.can_run_ahead()
    ahead = pipe.generate(prompts, max_tokens=30, stop=[" the "])
    replays = sum(st.graph_decoder().replays for st in pipe.stages)
    monkeypatch.setattr(pl._LocalSession, "can_run_ahead", lambda self: False)
    plain = pipe.generate(prompts, max_tokens=30, stop=[" the "])
    assert [r.token_ids for r in ahead] == [r.token_ids for r in plain]
    assert [r.finish_reason for r in ahead] == [r.finish_reason for r in plain]
    assert replays >= 2 * 20


def _triton_gemv_everywhere(st: TorchStage, cfg: object, pdl: bool = False, prefetch: bool = False) -> None:
    """Force the Triton GEMV with ``cfg`` for every product of ``st``'s decode step (compiled layers)."""
    from hyperlane_lab.models.cuda_decode import make_linear

    w = st.weights
    mats = [t for lw in w.layers for t in (lw.wqkv, lw.wo, lw.w_gate_up, lw.w_down)]
    mats += [w.lm_head] if w.lm_head is not None else []
    gd = st.graph_decoder()
    gd._lin = make_linear({(t.shape[0], t.shape[1]): cfg for t in mats}, pdl=pdl, prefetch=prefetch)
    gd.configure(True)


@gpu
@pytest.mark.parametrize("split_k", [1, 4])
@pytest.mark.parametrize("batch_lens", [[6], [6, 4]])
def test_graph_decode_with_triton_gemv_matches_float64(batch_lens, split_k):
    """The Triton GEMV forced for every product (compiled layers, captured graphs; batch 1 uses
    it, batch 2 falls back to cuBLAS), plain or split-K, decodes like float64."""
    from hyperlane_lab.codecs._kernels import kernel_module

    CONFIGS = [c for c in kernel_module("gemv").CONFIGS if c.split_k == split_k]

    fast = _stages(SPEC, [1], torch.float16, "cuda")
    for st in fast:
        _triton_gemv_everywhere(st, CONFIGS[0])
    ref = _decode(_cpu64(fast), batch_lens, steps=8, static=False)
    got = _decode(fast, batch_lens, steps=8, static=True)
    for i, (a, r) in enumerate(zip(got, ref)):
        rows = slice(1, None) if i >= 4 and len(batch_lens) > 1 else slice(None)
        assert _rel(a[rows], r[rows]) < 2e-2, f"step {i}"
    for st in fast:
        gd = st.graph_decoder()
        assert gd.captures == 1 and not gd._broken and "error" not in gd.gemv_choice
        assert gd.fallbacks == []


def test_gemv_candidates_and_timer_checked():
    """Split-K candidates only for short outputs; an unknown timer is refused before any GPU work."""
    gk = _kernels().kernel_module("gemv")
    assert {c.split_k for c in gk.candidates(4096)} > {1}
    assert {c.split_k for c in gk.candidates(32000)} == {1}
    with pytest.raises(ValueError, match="timer must be 'graph' or 'eager'"):
        gk.choose_config([torch.zeros(8, 8)], timer="wall")


@gpu
@pytest.mark.parametrize("timer", ["graph", "eager"])
def test_gemv_choice_times_every_candidate_and_picks_a_correct_one(timer):
    """choose_config times cuBLAS and every candidate (from a CUDA graph by default); the choice,
    if any, is among the candidates, faster than cuBLAS, and computes the product."""
    gk = _kernels().kernel_module("gemv")
    g = torch.Generator(device="cuda").manual_seed(0)
    ws = [torch.randn(4096, 4096, device="cuda", dtype=torch.float16, generator=g) * 0.02 for _ in range(4)]
    cfg, times = gk.choose_config(ws, timer=timer)
    assert set(times) == {"cublas", *(gk.config_name(c) for c in gk.candidates(4096))}
    assert all(0 < t < 1e4 for t in times.values())
    if cfg is not None:
        assert cfg in gk.candidates(4096) and times[gk.config_name(cfg)] < times["cublas"]
        x = torch.randn(1, 4096, device="cuda", dtype=torch.float16, generator=g)
        ref = x.double() @ ws[0].double().T
        assert _rel(gk.gemv(x, ws[0], None, cfg).double(), ref) < 2e-3


@gpu
def test_graph_decode_with_the_all_triton_layer_matches_float64():
    """Batch-1 caches captured with the five-launch Triton layer (decode_fused.make_triton_layer;
    plain configs for the normed products, split-K for wo/down) decode like float64; a batch-2
    session on the same stages keeps the compiled layer."""
    from hyperlane_lab.codecs._kernels import kernel_module
    from hyperlane_lab.models.cuda_decode import make_linear
    from hyperlane_lab.models.decode_fused import make_triton_layer

    gk = kernel_module("gemv")
    plain = next(c for c in gk.CONFIGS if c.split_k == 1)
    split = next(c for c in gk.CONFIGS if c.split_k > 1)
    fast = _stages(SPEC, [1], torch.float16, "cuda")
    for st in fast:
        gd = st.graph_decoder()
        gd._lin = make_linear({})  # F.linear elsewhere; the layer below brings its own products
        attn = gd.attention_kernel()
        assert attn is not None
        cfgs = {"wqkv": plain, "wo": split, "w_gate_up": plain, "w_down": split}
        gd._tlayer = make_triton_layer(attn, cfgs)
    ref = _decode(_cpu64(fast), [6], steps=10, static=False)
    got = _decode(fast, [6], steps=10, static=True)
    for i, (a, r) in enumerate(zip(got, ref)):
        assert _rel(a, r) < 2e-2, f"step {i}"
    assert all(st.graph_decoder().fallbacks == [] for st in fast)
    ref2 = _decode(_cpu64(fast), [6, 4], steps=6, static=False)
    got2 = _decode(fast, [6, 4], steps=6, static=True)
    for i, (a, r) in enumerate(zip(got2, ref2)):
        rows = slice(1, None) if i >= 4 else slice(None)
        assert _rel(a[rows], r[rows]) < 2e-2, f"batch 2 step {i}"
    assert all(st.graph_decoder().captures == 2 for st in fast)


@gpu
def test_the_layer_tuned_in_the_step_decodes_like_float64(monkeypatch):
    """The all-Triton layer's configs tuned by timing the whole step (``layer_tune.tune_layer``) on one stage
    holding the model: each role's choice is the config chosen alone or one it tried, every timed trial has a
    positive step time, the tuning's own graphs leave the decoder's capture count and caches alone, and the
    tuned layer's decode steps match float64."""
    from hyperlane_lab.models.decode_fused import make_triton_layer, triton_layer_configs
    from hyperlane_lab.models.layer_tune import tune_layer

    monkeypatch.delenv("HYPERLANE_LAYER_TUNE", raising=False)
    fast = _stages(SPEC, [], torch.float16, "cuda")
    gd = fast[0].graph_decoder()
    gd.linear()  # the products timed alone
    attn = gd.attention_kernel()
    assert attn is not None
    alone = triton_layer_configs(fast[0].weights.layers[0], gd.gemv_choice, slack=1e9)
    assert alone is not None

    def make(c):
        return make_triton_layer(attn, c)

    best = tune_layer(gd, alone, make)
    report = gd.gemv_choice["triton_layer_tune"]
    assert report["trials"] and gd.captures == 0 and "error" not in report
    for role, name in report["chosen"].items():
        tried = {t["config"] for t in report["trials"] if t["role"] == role and t["kept"]}
        assert name == report["alone"][role] or name in tried, role
    assert all(t["us"] > 0 and t["current_us"] > 0 for t in report["trials"] if "us" in t)
    gd._tlayer = make(best)
    ref = _decode(_cpu64(fast), [6], steps=10, static=False)
    got = _decode(fast, [6], steps=10, static=True)
    for i, (a, r) in enumerate(zip(got, ref)):
        assert _rel(a, r) < 2e-2, f"step {i}"
    assert gd.captures == 1 and gd.fallbacks == []


@gpu
def test_a_batch1_session_takes_the_layer_tuned_in_the_step(monkeypatch):
    """Through the decoder's own path (``HYPERLANE_TRITON_LAYER=1``, PDL as the card allows): the first batch-1
    capture tunes the layer (nested captures of its trials, not counted), captures the layer with the chosen
    configs, and decodes like float64; with ``HYPERLANE_LAYER_TUNE=0`` nothing is tuned or reported."""
    from hyperlane_lab.codecs._kernels import kernel_module
    from hyperlane_lab.models import cuda_decode

    real = cuda_decode.triton_layer_configs
    # the tiny model's products may time slower than cuBLAS: take the layer anyway
    monkeypatch.setattr(cuda_decode, "triton_layer_configs", lambda w, choice: real(w, choice, slack=1e9))
    monkeypatch.setenv("HYPERLANE_TRITON_LAYER", "1")
    monkeypatch.setenv("HYPERLANE_GEMV_PIN", "97x64=8x512w4s3")  # the LM head on Triton, so Triton is in use
    monkeypatch.delenv("HYPERLANE_LAYER_TUNE", raising=False)
    by_name = kernel_module("gemv").configs_by_name()
    for tune in (True, False):
        monkeypatch.setenv("HYPERLANE_LAYER_TUNE", "1" if tune else "0")
        fast = _stages(SPEC, [], torch.float16, "cuda")
        ref = _decode(_cpu64(fast), [6], steps=10, static=False)
        got = _decode(fast, [6], steps=10, static=True)
        for i, (a, r) in enumerate(zip(got, ref)):
            assert _rel(a, r) < 2e-2, f"tune {tune}, step {i}"
        gd = fast[0].graph_decoder()
        assert gd.captures == 1 and gd.fallbacks == [] and "triton_layer" in gd.gemv_choice
        report = gd.gemv_choice.get("triton_layer_tune")
        if not tune:
            assert report is None
            continue
        assert report["trials"] and "error" not in report
        assert gd.gemv_choice["triton_layer"] == {r: str(by_name[n]) for r, n in report["chosen"].items()}


def _launch_pdl_flags(fn: object) -> set[bool]:
    """The ``launch_pdl`` option of every kernel Triton compiled from the JIT function ``fn`` (its
    per-device caches of compiled kernels, as in Triton 3.6-3.9)."""
    flags = set()
    for caches in fn.device_caches.values():  # type: ignore[attr-defined]
        for kernel in caches[0].values():
            flags.add(bool(kernel.metadata.launch_pdl))
    return flags


def _assert_same_steps(outs: list[list[torch.Tensor]], modes: Sequence[object], what: str) -> None:
    """Every mode's decode steps bitwise equal to the first mode's."""
    for mode, got in zip(modes[1:], outs[1:], strict=True):
        for i, (a, b) in enumerate(zip(outs[0], got, strict=True)):
            assert torch.equal(a, b), f"{what} {mode}, step {i}"


@gpu
def test_decode_kernels_launched_with_pdl_give_the_plain_launches_bits():
    """The decode step's Triton kernels launched with programmatic dependent launch (``HYPERLANE_PDL=1``,
    sm_90+): captured in the decode graphs, the five-launch layer and the compiled layer (Triton GEMVs and
    the attention kernel between inductor's kernels) must each give the same bits as their plain launches
    (the same kernels in the same order; a kernel that read its input before the one writing it had finished
    would not), for a batch-1 session over two stages, with and without the GEMVs' early first weight tile
    (``HYPERLANE_PDL_PREFETCH=1``); a chain of 64 PDL GEMVs (every other one split-K) in one CUDA graph,
    each reading the previous one's output, likewise."""
    from hyperlane_lab.codecs._kernels import kernel_module
    from hyperlane_lab.models.cuda_decode import make_linear
    from hyperlane_lab.models.decode_fused import make_triton_layer

    if not kernel_module("pdl").pdl_supported("cuda"):
        pytest.skip("programmatic dependent launch needs compute capability 9.0+ and Triton >= 3.4")
    gk = kernel_module("gemv")
    plain = next(c for c in gk.CONFIGS if c.split_k == 1)
    split = next(c for c in gk.CONFIGS if c.split_k > 1)
    cfgs = {"wqkv": plain, "wo": split, "w_gate_up": plain, "w_down": split}
    modes = ((False, False), (True, False), (True, True))  # (pdl, prefetch)
    outs = []
    for pdl, prefetch in modes:
        stages = _stages(SPEC, [1], torch.float16, "cuda")
        for st in stages:
            gd = st.graph_decoder()
            gd._lin = make_linear({})
            attn = gd.attention_kernel()
            assert attn is not None
            gd._tlayer = make_triton_layer(attn, cfgs, pdl=pdl, prefetch=prefetch)
        outs.append(_decode(stages, [6], steps=12, static=True))
        assert all(st.graph_decoder().fallbacks == [] for st in stages)
    _assert_same_steps(outs, modes, "five-launch layer")
    # the compiled layer with the Triton GEMV for every product and the attention kernel, PDL on for its
    # kernels too (as HYPERLANE_PDL=1 asks; unset, PDL launches the all-Triton layer only) and off:
    # inductor's kernels between ours launch as usual
    outs = []
    for pdl, prefetch in modes:
        stages = _stages(SPEC, [1], torch.float16, "cuda")
        for st in stages:
            gd = st.graph_decoder()
            gd.pdl_enabled, gd._pdl_auto, gd.triton_layer_enabled = pdl, False, False
            assert gd.pdl() is pdl and gd._pdl_outside_layer() is pdl
            attn = gd.attention_kernel()
            assert attn is not None and (getattr(attn, "keywords", {}) == {"pdl": True}) is pdl
            _triton_gemv_everywhere(st, plain, pdl=pdl, prefetch=prefetch)
        outs.append(_decode(stages, [6], steps=8, static=True))
        assert all(st.graph_decoder().fallbacks == [] for st in stages)
        assert all(st.graph_decoder().captures == 1 for st in stages)
    _assert_same_steps(outs, modes, "compiled layer")
    g = torch.Generator(device="cuda").manual_seed(0)
    # x <- W x + x with W ~ N(0, 1/128^2), K = 1024: |x| grows ~1.03x a step, finite over the chain; every
    # other product split-K (the model above is too narrow for a split: its K fits one block)
    ws = [torch.randn(1024, 1024, generator=g, device="cuda", dtype=torch.float16) / 128 for _ in range(64)]
    x0 = torch.randn(1, 1024, generator=g, device="cuda", dtype=torch.float16)
    chains = []
    for pdl, prefetch in modes:

        def chain(pdl: bool = pdl, prefetch: bool = prefetch) -> torch.Tensor:
            x = x0
            for i, w in enumerate(ws):
                x = gk.gemv(x, w, None, (plain, split)[i % 2], residual=x, pdl=pdl, prefetch=prefetch)
            return x

        chain()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = chain()
        graph.replay()
        torch.cuda.synchronize()
        chains.append(out.clone())
    assert all(torch.equal(chains[0], c) for c in chains[1:]) and torch.isfinite(chains[0]).all()
    # and the launches did carry the attribute: Triton compiled PDL variants of the kernels
    for fn in (gk._gemv_kernel, gk._splitk_sum_kernel, kernel_module("decode_attn")._decode_attn_kernel):
        assert True in _launch_pdl_flags(fn), fn


def test_failed_warm_ups_turn_off_one_used_piece_at_a_time_on_cpu():
    """GraphDecoder._degrade: programmatic dependent launch where it is on, the all-Triton layer only when
    the warm-up used it, then fused attention, Triton GEMV, compiling, then nothing (the capture error is
    raised); configure() decides the turned-off pieces again."""
    st = _stages(SPEC, [], torch.float32, "cpu")[0]
    gd = GraphDecoder(st)

    def piece(*a):
        return None

    gd._tlayer, gd._attn, gd._lin, gd.compile_layers = piece, piece, piece, True
    err = RuntimeError("boom")
    assert gd._degrade(err, used_tlayer=False) and gd._tlayer is piece and gd._attn is False
    assert gd._degrade(err, used_tlayer=True) and gd._tlayer is False
    assert gd._degrade(err, used_tlayer=True) and gd._lin is torch.nn.functional.linear
    assert gd._degrade(err, used_tlayer=True) and gd._eager_layers
    assert not gd._degrade(err, used_tlayer=True)
    assert [f.split(":")[0] for f in gd.fallbacks] == [
        "fused attention", "the all-Triton layer", "Triton GEMV", "torch.compile"
    ]  # fmt: skip
    gd.configure(True)
    assert gd._attn is None and gd._lin is None and gd._tlayer is None and not gd._eager_layers
    # with programmatic dependent launch on (as on a Hopper GPU), it goes first, and only it: the kernels
    # are decided again without it; configure() turns it back on
    gd.pdl_enabled, gd._pdl_supported = True, lambda: True  # type: ignore[method-assign]
    gd._tlayer, gd._attn, gd._lin = piece, piece, piece
    assert gd.pdl() and gd._degrade(err, used_tlayer=True)
    assert not gd.pdl() and gd._tlayer is None and gd._attn is None and gd._lin is None
    assert gd.fallbacks[-1].startswith("programmatic dependent launch: RuntimeError: boom")
    gd._tlayer = piece
    assert gd._degrade(err, used_tlayer=True) and gd._tlayer is False  # then the pieces, as before
    gd.configure(True)
    assert gd.pdl()
