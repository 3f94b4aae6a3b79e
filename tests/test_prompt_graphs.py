"""Prompt steps replayed from CUDA graphs (models/prompt_graphs.py).

CPU: the bucket rule and the environment setting. GPU (skipped without CUDA): a fresh prompt's
logits and the K/V it leaves in the cache equal the eager path's and a float64 reference, for
lengths in several buckets, batch 2 and a split model; decode after a graph prompt gives the
eager path's tokens; padding never leaks from one prompt into the next; prompts that do not
qualify (too long, padded, graphs off) and a failed capture run eagerly.
"""

from __future__ import annotations

import uuid

import pytest
import torch

from hyperlane_lab.models import ModelSpec, TorchStage
from hyperlane_lab.models.prompt_graphs import prompt_bucket, prompt_graph_max_tokens, scratch_len
from hyperlane_lab.models.sessions import SessionCache, copy_slots
from hyperlane_lab.types import LayerSpan
from tests.test_gpu import SPEC as TG_SPEC
from tests.test_gpu import _cpu64, _rel, _stages

# llama-style GQA without windows, so prompts of any length are "fresh"
SPEC = ModelSpec("llama", 3, 64, 4, 2, 16, 128, 97, 1e-6)

gpu = pytest.mark.gpu


def test_ready_says_when_run_would_replay_a_captured_graph():
    """``PromptGraphs.ready`` (the worker's test before enqueueing a prompt chunk on its event loop) is true
    exactly where ``run`` finds a captured graph: the same bucket, alignment and context rules, and never
    once captures broke. A CPU stage has no graph decoder, so ``prompt_graph_ready`` is false there."""
    from types import SimpleNamespace

    from hyperlane_lab.models.prompt_graphs import PromptGraphs

    pg = PromptGraphs(SimpleNamespace(stage=None), max_tokens=256)  # type: ignore[arg-type]
    pg._graphs[(1, 256, 0)] = pg._graphs[(1, 64, 192)] = pg._graphs[(2, 32, 0)] = object()  # type: ignore[assignment]
    assert pg.ready(1, 200, 0) and pg.ready(1, 256, 0)  # bucket 256
    assert pg.ready(1, 50, 192) and pg.ready(2, 17, 0)
    assert not pg.ready(1, 128, 0)  # bucket 128: not captured
    assert not pg.ready(2, 200, 0) and not pg.ready(1, 64, 128)  # other batch, other start
    assert not pg.ready(1, 1, 0) and not pg.ready(1, 257, 0)  # decode steps, past max_tokens
    pg._graphs[(1, 64, 32)] = object()  # type: ignore[assignment]
    assert not pg.ready(1, 64, 32)  # start not a multiple of 64: run() takes the eager path
    pg._graphs[(1, 256, 896)] = object()  # type: ignore[assignment]
    assert not pg.ready(1, 256, 896)  # start + bucket past 4 x max_tokens
    pg.broken = "capture failed"
    assert not pg.ready(1, 200, 0)
    st = TorchStage.random(SPEC, LayerSpan(0, 3))
    st.open_session("s", 1, 64)
    assert not st.prompt_graph_ready("s", torch.arange(16)[None])


@pytest.mark.parametrize(
    ("flag", "field", "env"),
    [("--prompt-on-loop", "prompt_on_loop", "HYPERLANE_PROMPT_ON_LOOP"),
     ("--staging-pool", "staging_pool", "HYPERLANE_STAGING_POOL"),
     ("--direct-prompt-upload", "direct_prompt_upload", "HYPERLANE_DIRECT_PROMPT_UPLOAD"),
     ("--armed-graphs", "armed_graphs", "HYPERLANE_ARMED_GRAPHS")],
)  # fmt: skip
def test_opt_in_switches_from_the_flag_or_the_environment(tmp_path, monkeypatch, flag, field, env):
    """``hyperlane worker --prompt-on-loop`` / ``--staging-pool`` / ``--direct-prompt-upload`` / ``--armed-graphs``
    (``WorkerConfig``'s
    field of the same name) turn the switch on; unset, the environment variable decides (default off); an explicit
    False wins over the variable. A CPU worker has no GPU stepper, so nothing is staged."""
    from hyperlane_lab.cli.main import build_parser
    from hyperlane_lab.runtime.worker import Worker, WorkerConfig

    parse = build_parser().parse_args
    assert getattr(parse(["worker", flag]), field) is True
    assert getattr(parse(["worker"]), field) is None

    def switch(setting: bool | None) -> bool:
        w = Worker(WorkerConfig(device="cpu", cache_dir=str(tmp_path), **{field: setting}))
        assert w.staged_reuses() == 0
        return bool(getattr(w, field))

    monkeypatch.delenv(env, raising=False)
    assert (switch(None), switch(True)) == (False, True)
    monkeypatch.setenv(env, "1")
    assert (switch(None), switch(False)) == (True, False)


def test_bucket_rule():
    assert prompt_bucket(1, 1024) is None  # decode steps have their own graphs
    assert [prompt_bucket(s, 1024) for s in (2, 16, 17, 33, 64)] == [16, 16, 32, 64, 64]
    assert [prompt_bucket(s, 1024) for s in (65, 128, 129, 512, 513, 1000, 1024)] == [
        128, 128, 192, 512, 576, 1024, 1024,
    ]  # fmt: skip
    assert prompt_bucket(1025, 1024) is None and prompt_bucket(300, 256) is None
    assert prompt_bucket(5, 0) is None  # 0: prompt graphs off
    for s in range(2, 1025):  # never shorter than the prompt, at most 63 tokens of padding past 64
        b = prompt_bucket(s, 1024)
        assert b is not None and b >= s and (s <= 64 or b - s < 64)


def test_scratch_grows_in_a_few_steps():
    assert [scratch_len(b, 1024) for b in (16, 64, 128, 192, 512, 576, 1024)] == [
        64,
        64,
        128,
        256,
        512,
        1024,
        1024,
    ]
    assert scratch_len(16, 16) == 16  # never beyond the largest bucket
    for s in range(2, 1025):  # always holds the bucket
        b = prompt_bucket(s, 1024)
        assert b is not None and b <= scratch_len(b, 1024) <= 1024


def test_max_tokens_setting(monkeypatch):
    monkeypatch.delenv("HYPERLANE_PROMPT_GRAPHS", raising=False)
    assert prompt_graph_max_tokens() == 1024
    monkeypatch.setenv("HYPERLANE_PROMPT_GRAPHS", "0")
    assert prompt_graph_max_tokens() == 0
    monkeypatch.setenv("HYPERLANE_PROMPT_GRAPHS", "lots")
    with pytest.raises(ValueError, match=r"not an integer.*0 to turn prompt graphs off"):
        prompt_graph_max_tokens()
    monkeypatch.setenv("HYPERLANE_PROMPT_GRAPHS", "-5")
    with pytest.raises(ValueError, match=">= 0"):
        prompt_graph_max_tokens()


def _filled(cache: SessionCache, seed: int) -> SessionCache:
    g = torch.Generator().manual_seed(seed)
    for t in (*cache.k, *cache.v):
        t.copy_(torch.randn(t.shape, generator=g))
    return cache


@pytest.mark.parametrize("backed", [(True, True), (True, False), (False, True)])
def test_copy_slots_moves_exactly_the_slots_asked_for(backed):
    """One copy over the backing tensor (both caches from ``zeros``) or one per layer tensor: slots
    a..b-1 of every layer's K and V, nothing else, between caches of different lengths."""
    spec = TG_SPEC

    def make(max_len: int, with_kv: bool, seed: int) -> SessionCache:
        c = SessionCache.zeros(2, max_len, 3, spec, torch.float32, torch.device("cpu"))
        if not with_kv:  # separate tensors, as an engine that builds its own cache would
            c = SessionCache(2, max_len, [t.clone() for t in c.k], [t.clone() for t in c.v])
        return _filled(c, seed)

    dst, src = make(40, backed[0], 1), make(24, backed[1], 2)
    before = [t.clone() for t in (*dst.k, *dst.v)]
    copy_slots(dst, src, 5, 17)
    for d, s, old in zip((*dst.k, *dst.v), (*src.k, *src.v), before, strict=True):
        assert torch.equal(d[:, :, 5:17], s[:, :, 5:17])
        assert torch.equal(d[:, :, :5], old[:, :, :5]) and torch.equal(d[:, :, 17:], old[:, :, 17:])
    with pytest.raises(ValueError, match="do not fit"):
        copy_slots(dst, src, 20, 26)  # src has 25 slots


def test_cache_views_share_one_backing_tensor_and_zero_together():
    c = _filled(SessionCache.zeros(1, 8, 4, TG_SPEC, torch.float16, torch.device("cpu")), 3)
    assert c.kv is not None and c.kv.shape == (2, 4, 1, TG_SPEC.n_kv_heads, 9, TG_SPEC.head_dim)
    assert all(t.is_contiguous() for t in (*c.k, *c.v))
    assert torch.equal(c.kv[1, 2], c.v[2]) and c.kv[1, 2].data_ptr() == c.v[2].data_ptr()
    assert c.nbytes() == c.kv.numel() * 2
    c.zero_()
    assert not any(t.any() for t in (*c.k, *c.v))


# ---------------------------------------------------------------------- CUDA


def _prompt_then_decode(
    stages: list[TorchStage],
    ids: torch.Tensor,
    steps: int,
    max_len: int,
    feed: list[torch.Tensor] | None = None,
) -> tuple[list[torch.Tensor], list[list[torch.Tensor]]]:
    """Prompt step, then decode steps fed the greedy tokens (or ``feed[t]``, to compare two paths
    on the same tokens: random weights have near-ties): every step's last-stage output (CPU
    float64) and each stage's K/V cache right after the prompt (CPU float64, the prompt's slots)."""
    sid = uuid.uuid4().hex
    b, s = ids.shape
    for st in stages:
        st.open_session(sid, b, max_len)
    x: torch.Tensor = ids
    pos = torch.arange(s).expand(b, s)
    for st in stages:
        x = st.forward(sid, x, pos)
    outs = [x.double().cpu()]
    kv = [[t[:, :, :s].double().cpu() for t in (*st.session(sid).k, *st.session(sid).v)] for st in stages]
    for t in range(steps):
        x = (feed[t] if feed is not None else outs[-1].argmax(-1))[:, None]
        p = torch.full((b, 1), s + t)
        for st in stages:
            x = st.forward(sid, x, p)
        outs.append(x.double().cpu())
    for st in stages:
        st.close_session(sid)
    return outs, kv


def _ids(b: int, s: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, SPEC.vocab_size, (b, s), generator=torch.Generator().manual_seed(seed))


@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_prompt_graphs_match_eager_and_float64(dtype):
    fast = _stages(SPEC, [1], dtype, "cuda")
    slow = _stages(SPEC, [1], dtype, "cuda")
    for st in slow:
        st.cuda_graphs = False
    ref64 = _cpu64(fast)
    tol = 2e-2 if dtype == torch.float16 else 6e-2
    cases = [(1, 2), (1, 5), (1, 17), (1, 64), (1, 100), (2, 33)]  # buckets 16, 16, 32, 64, 128, 64
    for b, s in cases:
        ids = _ids(b, s, seed=s)
        eager, kv_e = _prompt_then_decode(slow, ids, steps=4, max_len=s + 8)
        tokens = [o.argmax(-1) for o in eager]
        got, kv = _prompt_then_decode(fast, ids, steps=4, max_len=s + 8, feed=tokens)
        ref, kv_r = _prompt_then_decode(ref64, ids, steps=4, max_len=s + 8, feed=tokens)
        assert torch.isfinite(got[0]).all()
        assert _rel(got[0], ref[0]) < tol, f"prompt {b}x{s} vs float64"
        assert _rel(got[0], eager[0]) < tol, f"prompt {b}x{s} vs eager"
        for st_kv, st_e, st_r in zip(kv, kv_e, kv_r):  # the K/V the graph left in the session cache
            for a, e, r in zip(st_kv, st_e, st_r):
                assert _rel(a, r) < tol and _rel(a, e) < tol, f"cache after prompt {b}x{s}"
        for i in range(1, 5):  # decode from that cache, same tokens: float64's logits
            assert _rel(got[i], ref[i]) < tol, f"decode step {i} after prompt {b}x{s}"
    pg = [st.graph_decoder().prompt_graphs() for st in fast]
    assert all(p.broken == "" for p in pg)
    assert all(p.captures == 5 for p in pg)  # (1,16) (1,32) (1,64) (1,128) (2,64)
    assert all(p.replays == len(cases) for p in pg)


@gpu
def test_prompt_graph_padding_is_zeroed_and_never_reaches_the_cache():
    """A middle stage gets a prompt whose rows past 18 are NaN, then an 18-row prompt in the same
    bucket: the second result equals that prompt on fresh stages (the graph's input padding is
    zeroed, so NaN left in it cannot reach the real rows through attention), and the session
    cache's slots past the prompt stay untouched (only the prompt's slots are copied in)."""
    stages = _stages(SPEC, [1, 2], torch.float16, "cuda")
    mid = stages[1]
    bad = torch.randn(1, 30, SPEC.hidden_size, dtype=torch.float16, device="cuda")
    bad[:, 18:] = float("nan")
    hid = torch.randn(1, 18, SPEC.hidden_size, dtype=torch.float16, device="cuda")

    def run(st: TorchStage, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        sid = uuid.uuid4().hex
        st.open_session(sid, 1, 40)
        out = st.forward(sid, x, torch.arange(x.shape[1])[None])
        kv = [t.clone() for t in (*st.session(sid).k, *st.session(sid).v)]
        st.close_session(sid)
        return out, kv

    run(mid, bad)  # bucket 32: NaN rows 18..29 in the graph's input buffer
    after, kv = run(mid, hid)
    fresh, kv_fresh = run(_stages(SPEC, [1, 2], torch.float16, "cuda")[1], hid)
    assert torch.isfinite(after).all() and torch.equal(after, fresh)
    for a, b in zip(kv, kv_fresh):
        assert torch.equal(a, b)
        assert torch.isfinite(a).all() and not a[:, :, 18:].any()  # untouched: a zeroed cache
    assert mid.graph_decoder().prompt_graphs().captures == 1


@gpu
def test_prompt_graph_scratch_grows_and_recaptures():
    """A longer prompt than the scratch holds grows it and recaptures the batch's graphs; prompts
    of every length before and after give the eager path's logits."""
    fast = _stages(SPEC, [1], torch.float16, "cuda")
    slow = _stages(SPEC, [1], torch.float16, "cuda")
    for st in slow:
        st.cuda_graphs = False
    for s in (20, 100, 20, 300):  # scratch 64 -> 128 -> (kept) -> 512
        got, _ = _prompt_then_decode(fast, _ids(1, s, seed=s), steps=0, max_len=s + 4)
        ref, _ = _prompt_then_decode(slow, _ids(1, s, seed=s), steps=0, max_len=s + 4)
        assert _rel(got[0], ref[0]) < 2e-2, f"prompt of {s}"
    pg = fast[0].graph_decoder().prompt_graphs()
    assert pg.captures == 4 and pg.replays == 4  # 32, 128, 32 again (after the growth), 320
    assert pg._scratch[1].k[0].shape[2] == 512


def _run_steps(
    stages: list[TorchStage], steps: list[tuple[torch.Tensor, torch.Tensor]], batch: int, max_len: int
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """One session through ``stages``: each step's last-stage output and, at the end, every
    stage's whole K/V cache (CPU float64)."""
    sid = uuid.uuid4().hex
    for st in stages:
        st.open_session(sid, batch, max_len)
    outs = []
    for ids, pos in steps:
        x: torch.Tensor = ids
        for st in stages:
            x = st.forward(sid, x, pos)
        outs.append(x.double().cpu())
    kv = [t.double().cpu() for st in stages for t in (*st.session(sid).k, *st.session(sid).v)]
    for st in stages:
        st.close_session(sid)
    return outs, kv


def _chunks(ids: torch.Tensor, sizes: list[int], start: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    out, a = [], start
    for n in sizes:
        out.append((ids[:, a - start : a - start + n], torch.arange(a, a + n).expand(ids.shape[0], n)))
        a += n
    return out


@gpu
@pytest.mark.parametrize("spec", [SPEC, TG_SPEC], ids=["llama", "qwen2-window"])
def test_chunked_prompt_graphs_match_eager_and_float64(spec):
    """A prompt sent in chunks (as a pipeline's ``prefill_chunk`` sends it): every chunk that
    starts at a multiple of 64 replays a graph per (batch, bucket, start), attending to the keys
    of the chunks before it, others run eagerly, and each chunk's output, the whole cache and the
    decode steps after it equal the eager path and float64, also with sliding-window layers (the
    mask's window) and batch 2."""
    fast = _stages(spec, [1], torch.float16, "cuda")
    slow = _stages(spec, [1], torch.float16, "cuda")
    for st in slow:
        st.cuda_graphs = False
    ref64 = _cpu64(fast)
    # chunk starts 0, 64, 128; 0, 64; and 0, 16, 32 (not multiples of 64: eager after the first)
    for b, sizes in [(1, [64, 64, 9]), (2, [64, 36]), (1, [16, 16, 9])]:
        total = sum(sizes)
        ids = torch.randint(0, spec.vocab_size, (b, total), generator=torch.Generator().manual_seed(total))
        steps = _chunks(ids, sizes)
        eager, _ = _run_steps(slow, steps, b, total + 4)
        tok = eager[-1].argmax(-1)[:, None]
        steps += [(tok, torch.full((b, 1), total)), (tok, torch.full((b, 1), total + 1))]
        got, kv = _run_steps(fast, steps, b, total + 4)
        eager, kv_e = _run_steps(slow, steps, b, total + 4)
        ref, kv_r = _run_steps(ref64, steps, b, total + 4)
        for i, (g, e, r) in enumerate(zip(got, eager, ref)):
            assert torch.isfinite(g).all()
            assert _rel(g, r) < 2e-2 and _rel(g, e) < 2e-2, f"step {i} of {b} x {sizes}"
        for a, e, r in zip(kv, kv_e, kv_r):
            assert (
                _rel(a[:, :, :total], r[:, :, :total]) < 2e-2
                and _rel(a[:, :, :total], e[:, :, :total]) < 2e-2
            )
    for st in fast:
        pg = st.graph_decoder().prompt_graphs()
        assert pg.broken == "" and pg.replays == 6  # every chunk at a multiple of 64 from a graph
        # one session at a time: the scratch holds the keys before each chunk, except after it
        # grew (batch 1: 64 -> 128 -> 256 slots; batch 2: 64 -> 128)
        assert pg.prefix_copies == 3


@gpu
def test_chunk_graphs_refresh_the_scratch_when_another_step_came_between():
    """The scratch holds a session's keys only until another session's prompt or another step of
    the same session comes: then a later chunk copies its keys in from the session's cache. Two
    sessions' chunks interleaved, and a session whose earlier slot was rewritten by a decode step
    (a rewind) before its next chunk, give the eager path's results."""
    fast = _stages(SPEC, [1], torch.float16, "cuda")
    slow = _stages(SPEC, [1], torch.float16, "cuda")
    for st in slow:
        st.cuda_graphs = False
    ids_a, ids_b = _ids(1, 192, seed=1), _ids(1, 192, seed=2)
    ca, cb = _chunks(ids_a, [64, 64, 64]), _chunks(ids_b, [64, 64, 64])
    rewind = [ca[0], (ids_a[:, 5:6], torch.tensor([[3]])), *ca[1:]]  # slot 3 rewritten, then on

    def interleaved(stages: list[TorchStage]) -> list[torch.Tensor]:
        sids = [uuid.uuid4().hex for _ in range(2)]
        for st in stages:
            for sid in sids:
                st.open_session(sid, 1, 200)
        outs = []
        for sid, (x, pos) in [(sids[i % 2], (ca, cb)[i % 2][i // 2]) for i in range(6)]:
            for st in stages:
                x = st.forward(sid, x, pos)
            outs.append(x.double().cpu())
        for st in stages:
            for sid in sids:
                st.close_session(sid)
        return outs

    for got, ref in zip(interleaved(fast), interleaved(slow)):
        assert _rel(got, ref) < 2e-2
    copies = [st.graph_decoder().prompt_graphs().prefix_copies for st in fast]
    assert copies == [4, 4]  # the second and third chunk of each session (the scratch grew twice, too)
    got, _ = _run_steps(fast, rewind, 1, 200)
    ref, _ = _run_steps(slow, rewind, 1, 200)
    for g, r in zip(got, ref):
        assert _rel(g, r) < 2e-2
    assert [st.graph_decoder().prompt_graphs().prefix_copies for st in fast] == [5, 5]  # after the rewind


@gpu
def test_prompt_graphs_keep_the_most_recently_used(monkeypatch):
    """Beyond ``MAX_GRAPHS`` the least recently used graph goes; results stay the eager path's."""
    monkeypatch.setattr("hyperlane_lab.models.prompt_graphs.MAX_GRAPHS", 2)
    fast = _stages(SPEC, [1], torch.float16, "cuda")
    slow = _stages(SPEC, [1], torch.float16, "cuda")
    for st in slow:
        st.cuda_graphs = False
    for s in (5, 20, 40, 5):  # buckets 16, 32, 64, 16
        got, _ = _prompt_then_decode(fast, _ids(1, s, seed=s), steps=0, max_len=s + 4)
        ref, _ = _prompt_then_decode(slow, _ids(1, s, seed=s), steps=0, max_len=s + 4)
        assert _rel(got[0], ref[0]) < 2e-2, f"prompt of {s}"
    pg = fast[0].graph_decoder().prompt_graphs()
    assert list(pg._graphs) == [(1, 64, 0), (1, 16, 0)] and pg.captures == 4 and pg.replays == 4


@gpu
def test_pinned_upload_is_done_when_to_device_returns_or_its_event_fires():
    """``CudaStager.to_device`` of a pinned source (a GPU worker's frame body) returns only after
    the copy read it, even when the upload stream is busy: the body may be reused at once."""
    from hyperlane_lab.runtime.wire import CudaStager

    stager = CudaStager("cuda:0")
    src = torch.empty(1 << 20, dtype=torch.uint8, pin_memory=True)
    view = torch.frombuffer(memoryview(src.numpy()), dtype=torch.uint8)  # as decode_payload makes it
    src.fill_(7)
    with torch.cuda.stream(stager.h2d_stream):
        torch.cuda._sleep(50_000_000)  # ~tens of ms of GPU time ahead of the copy
    dev = stager.to_device(view)
    src.fill_(9)  # the pool hands the body to the next frame
    torch.cuda.synchronize()
    assert int(dev.min()) == 7 and int(dev.max()) == 7
    # ``upload`` returns at once; work enqueued on the compute stream sees the copy, and the
    # source is free to reuse once the event has fired (as a GPU worker's step does)
    with torch.cuda.stream(stager.h2d_stream):
        torch.cuda._sleep(50_000_000)
    dev, ready = stager.upload(view)
    assert not ready.query()  # still queued behind the sleep: the host did not wait
    total = dev.to(torch.int64).sum()  # compute stream: ordered after the copy
    ready.synchronize()
    src.fill_(3)
    assert int(total) == 9 * src.numel() and int(dev.max()) == 9


@gpu
def test_upload_into_a_kept_buffer_is_ordered_and_the_buffer_reused():
    """``CudaStager.upload_into`` (HYPERLANE_STAGING_POOL): the copy into a pool buffer is ordered before the
    compute stream's work, the host does not wait for it, and once that work is done the same buffer takes
    the next upload without the allocator (the pool hands it out again)."""
    from hyperlane_lab.runtime.staging import StagingPool
    from hyperlane_lab.runtime.wire import CudaStager

    stager = CudaStager("cuda:0")
    pool = StagingPool("cuda:0")
    src = torch.empty(1 << 20, dtype=torch.uint8, pin_memory=True)
    view = torch.frombuffer(memoryview(src.numpy()), dtype=torch.float16)  # a frame body's payload view
    sums = []
    for value in (1.0, 2.0):
        src.view(torch.float16).fill_(value)
        buf = pool.take(view.nbytes, stager.h2d_stream)
        assert buf is not None and buf.numel() == 1 << 20
        with torch.cuda.stream(stager.h2d_stream):
            torch.cuda._sleep(50_000_000)  # the copy waits behind this on the upload stream
        dev, ready = stager.upload_into(view, buf)
        assert not ready.query() and dev.shape == view.shape and dev.dtype == torch.float16
        assert dev.data_ptr() == buf.data_ptr()  # the copy went into the kept buffer
        sums.append(dev.to(torch.float32).sum())  # compute stream: ordered after the copy
        ready.synchronize()  # then the body may be reused
        torch.cuda.current_stream().synchronize()  # the step is done: the buffer goes back
        pool.give(buf)
    assert [float(t) for t in sums] == [view.numel() * 1.0, view.numel() * 2.0]
    assert pool.reused == 1 and pool.allocated == 1 << 20


@gpu
def test_a_hidden_state_uploaded_into_the_graph_input_gives_the_copied_path_bytes():
    """``TorchStage.prompt_input_slot`` (``--direct-prompt-upload``): a later stage's prompt chunk uploaded
    from pinned host memory straight into its captured graph's input gives bitwise the output of the path that
    copies it in; no slot until a replay of that graph was recorded, none while that replay is still queued
    (the copying path overlaps it), none for the first stage, another dtype or an unknown session."""
    from hyperlane_lab.runtime.wire import CudaStager

    first, later = _stages(SPEC, [1], torch.float16, "cuda")
    stager = CudaStager("cuda:0")
    compute = torch.cuda.current_stream()
    b, s = 1, 64
    pos = torch.arange(s)[None]
    gen = torch.Generator().manual_seed(3)
    states = [torch.randn(b, s, SPEC.hidden_size, generator=gen).half().pin_memory() for _ in range(3)]
    on_gpu = [t.cuda() for t in states]
    sids = [uuid.uuid4().hex for _ in range(5)]
    for sid in sids:
        later.open_session(sid, b, s + 4)
    first.open_session(sids[0], b, s + 4)
    copied = [later.forward(sids[0], on_gpu[0], pos).cpu()]  # captures, replays (reads not tracked yet)
    pg = later.graph_decoder().prompt_graphs()
    assert not pg.track_reads and pg.direct_inputs == 0
    assert later.prompt_input_slot(sids[1], pos, torch.float16) is None  # no replay recorded since tracking
    assert pg.track_reads
    copied.append(later.forward(sids[1], on_gpu[1], pos).cpu())  # records when its replay has read x_in
    assert first.prompt_input_slot(sids[0], pos, torch.float16) is None  # token ids: the host path
    assert later.prompt_input_slot(sids[2], pos, torch.float32) is None
    assert later.prompt_input_slot("nobody", pos, torch.float16) is None
    # a replay of the graph queued behind ~tens of ms of GPU work: no slot until it has run
    torch.cuda._sleep(50_000_000)
    pending = later.forward(sids[3], on_gpu[1], pos)
    assert later.prompt_input_slot(sids[2], pos, torch.float16) is None
    assert torch.equal(pending.cpu(), copied[1])  # (waits for it)
    slot = later.prompt_input_slot(sids[2], pos, torch.float16)
    assert slot is not None and tuple(slot[0].shape) == (b, s, SPEC.hidden_size)
    # made in a forward, so an inference tensor: upload_to writes it in inference mode, as a worker does
    assert slot[0].is_inference()
    x_in, ready = stager.upload_to(states[2], slot[0], slot[1], compute)
    direct = later.forward(sids[2], x_in, pos)
    ready.synchronize()
    assert pg.direct_inputs == 1
    assert torch.equal(direct.cpu(), later.forward(sids[4], on_gpu[2], pos).cpu())  # the copying path


@gpu
def test_an_upload_to_a_shared_input_waits_for_its_last_reader():
    """``CudaStager.upload_to``: the copy into a device tensor that queued work still reads starts only once
    the given event (recorded after that read) has fired; without the wait the copy, alone on the upload
    stream, would land first and the read would see the new bytes."""
    from hyperlane_lab.runtime.wire import CudaStager

    stager = CudaStager("cuda:0")
    compute = torch.cuda.current_stream()
    src = torch.ones(1 << 16, dtype=torch.float16).pin_memory()
    dst = torch.zeros(1 << 16, dtype=torch.float16, device="cuda")
    torch.cuda._sleep(50_000_000)  # the reader below waits behind this on the compute stream
    seen = dst.clone()
    read = torch.cuda.Event()
    read.record(compute)
    out, ready = stager.upload_to(src, dst, read, compute)
    assert out is dst and not ready.query()  # the host did not wait
    after = dst.clone()  # compute stream: ordered after the copy
    ready.synchronize()
    assert float(seen.abs().max()) == 0.0  # the queued read saw the old bytes
    assert bool((after == 1).all()) and bool((dst == 1).all())


@gpu
def test_prompts_that_do_not_qualify_run_eagerly(monkeypatch):
    stages = _stages(SPEC, [1], torch.float16, "cuda")
    for st in stages:
        st.graph_decoder().prompt_graphs().max_tokens = 16
    _prompt_then_decode(stages, _ids(1, 20), steps=1, max_len=24)  # longer than 16 tokens
    ids = _ids(2, 6)
    sid = uuid.uuid4().hex
    for st in stages:
        st.open_session(sid, 2, 12)
    pos = torch.arange(6).expand(2, 6).clone()
    pos[1, 4:] = -1  # a padded row: not a fresh prompt
    x: torch.Tensor = ids
    for st in stages:
        x = st.forward(sid, x, pos)
    assert torch.isfinite(x).all()
    assert all(st.graph_decoder().prompt_graphs().replays == 0 for st in stages)
    # a capture that fails: logged, remembered, and the prompt runs eagerly with the eager result
    monkeypatch.setattr(
        "hyperlane_lab.models.prompt_graphs.PromptGraphs._capture",
        lambda self, *args: (_ for _ in ()).throw(RuntimeError("no graphs today")),
    )
    eager = _stages(SPEC, [1], torch.float16, "cuda")
    for st in eager:
        st.cuda_graphs = False
    got, _ = _prompt_then_decode(stages, _ids(1, 8), steps=1, max_len=12)
    ref, _ = _prompt_then_decode(eager, _ids(1, 8), steps=1, max_len=12)
    assert all("no graphs today" in st.graph_decoder().prompt_graphs().broken for st in stages)
    assert _rel(got[0], ref[0]) < 2e-2  # compiled vs plain eager layers: rounding apart


@gpu
def test_bundled_model_prompt_graph_generates_transformers_tokens(hf_greedy):
    """The bundled model on one GPU: the prompt step from its graph, greedy tokens equal to
    transformers' own greedy generate (fp32, CPU)."""
    from hyperlane_lab.generation.pipeline import InProcessPipeline

    pipe = InProcessPipeline.from_pretrained(None, n_stages=2, dtype="fp32", device="cuda")
    prompt = "Once upon a time, there was a little girl named Lily."
    res = pipe.generate(prompt, max_tokens=24)
    assert res.token_ids == hf_greedy(prompt, 24)
    assert all(st.graph_decoder().prompt_graphs().replays == 1 for st in pipe.stages)
