"""Wire-mode decode graphs (models/decode_wire.py): the frame's bytes in, the next frame's bytes out.

GPU only. The wire graph of a stage must give, bit for bit, what the staged graph gives for the
same step followed by the codec's own encode (and, on the way in, the codec's own decode): two
sessions with the same prompt are stepped side by side, one through each path. On real workers:
int8 hand-offs encoded inside the decode graphs give the probe's greedy tokens, and a decode frame
whose payload length does not match its header is refused.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pytest
import torch

from hyperlane_lab import codecs
from hyperlane_lab.models.decode_wire import WireSpec
from tests.test_gpu import SPEC, _prompt, _stages

pytestmark = pytest.mark.gpu


def _hop(c, h: torch.Tensor) -> torch.Tensor:
    return h if c is None else c.decode(c.encode(h))


def _wire_bytes(c, h: torch.Tensor) -> bytes:
    """What a stage sends for hidden ``h``: its raw bytes, or the codec payload."""
    if c is None:
        return h.contiguous().view(torch.uint8).cpu().numpy().tobytes()
    return bytes(c.encode(h).buffer())


@pytest.mark.parametrize(
    "codec", ["raw", "fp16", "int8", "int4", "int4_asym", "int4_outlier", "int4_outlier_asym"]
)
def test_wire_graph_equals_staged_graph_then_codec(codec):
    stages = _stages(SPEC, [1, 2], torch.float16, "cuda")  # first, middle, last
    c = None if codec == "raw" else codecs.get(codec, 16, backend="triton")  # 4 groups a row
    cid, gs = (0, 0) if c is None else (c.codec_id, c.group_size)
    specs = [WireSpec(0, 0, cid, gs), WireSpec(cid, gs, cid, gs), WireSpec(cid, gs, 0, 0)]
    lens = [6, 4]
    ids, pos = _prompt(lens, SPEC.vocab_size)
    logits = {}
    for sid in ("staged", "wire"):  # the same prompt, staged path, into both sessions' caches
        x = ids
        for i, st in enumerate(stages):
            st.open_session(sid, len(lens), 24)
            x = st.forward(sid, x, pos)
            x = _hop(c, x) if i < 2 else x
        logits[sid] = x
    assert torch.equal(logits["staged"], logits["wire"])
    cur = torch.tensor(lens)
    last = logits["staged"]
    for t in range(8):
        nxt = last.argmax(-1)[:, None].cpu()
        p = cur[:, None].clone()
        if t >= 3:
            p[0] = -1  # row 0 finished: padding
        # staged: graph replays with copies around them, the codec applied between stages
        h0 = stages[0].forward("staged", nxt, p)
        h1 = stages[1].forward("staged", _hop(c, h0), p)
        last = stages[2].forward("staged", _hop(c, h1), p)
        # wire: bytes in, bytes out
        pos_np = p.numpy().reshape(-1).copy()
        payload: object = nxt.numpy().reshape(-1).copy()
        outs = []
        for i, st in enumerate(stages):
            g = st.graph_decoder().step_wire(st.session("wire"), specs[i], pos_np, payload)
            assert g is not None, st.graph_decoder().wire_broken
            torch.cuda.synchronize()
            outs.append(g)
            payload = bytes(g.wire.payload())
        assert bytes(outs[0].wire.payload()) == _wire_bytes(c, h0), f"step {t}: stage 0 payload"
        assert bytes(outs[1].wire.payload()) == _wire_bytes(c, h1), f"step {t}: stage 1 payload"
        assert outs[0].wire.bad_groups() == 0 and outs[1].wire.bad_groups() == 0
        assert torch.equal(outs[2].out, last), f"step {t}: logits"
        greedy = outs[2].wire.out_host
        assert greedy.tolist() == [*last.argmax(-1).tolist(), 0]  # ids, then the non-finite flag
        assert outs[2].wire.out_ids.tolist() == greedy.tolist()  # the ship's numpy view of the same bytes
        cur += 1
    for st in stages:
        gd = st.graph_decoder()
        assert gd.captures == 2 and gd.wire_broken == "" and gd.fallbacks == []
        assert not st.decode_graph_ready("wire") and st.decode_graph_ready("staged")
        for sid in ("staged", "wire"):
            st.close_session(sid)


def test_wire_graph_counts_nonfinite_groups_and_recaptures_for_staged_steps():
    st = _stages(SPEC, [1, 2], torch.float16, "cuda")[1]
    c = codecs.get("int8", 16)
    spec = WireSpec(0, 0, c.codec_id, c.group_size)
    st.open_session("s", 1, 8)
    gd, cache = st.graph_decoder(), st.session("s")
    x = torch.randn(1, 1, SPEC.hidden_size, dtype=torch.float16)
    for bad in (False, True):
        if bad:  # at a padding position: its key/value go to the trash slot, the cache stays clean
            x[0, 0, 5] = float("nan")
        g = gd.step_wire(cache, spec, np.array([-1 if bad else 0]), x.numpy().tobytes())
        torch.cuda.synchronize()
        assert (g.wire.bad_groups() > 0) == bad
    # a staged step on the same cache recaptures a staged graph (the wire graph copies its own input)
    out = st.forward("s", x.nan_to_num().cuda(), torch.tensor([[1]]))
    assert torch.isfinite(out).all() and cache.graph.wire is None and gd.captures == 2


@pytest.mark.multiprocess
def test_int8_wire_workers_match_the_probe_and_refuse_bad_decode_frames(tmp_path):
    from hyperlane_lab.probes import greedy_sequences, load_pipeline
    from hyperlane_lab.runtime import AutoDistributedModel, LocalCluster
    from hyperlane_lab.runtime.proto_gen import hyperlane_pb2 as pb
    from tests.test_codec_wire import _frame, _send_and_wait, direct_session, wait_for_frames

    prompts = ["Once upon a time", "Lily and Ben went to the park. They saw"]
    pipe = load_pipeline(None, n_stages=3, dtype="fp16", device="cuda")
    want = {name: greedy_sequences(pipe, prompts, [name, name], 64, 40) for name in ("fp16", "int8")}
    with LocalCluster(3, devices=["cuda:0"] * 3, cache_dir=tmp_path) as cluster:
        for name in ("fp16", "int8"):
            with AutoDistributedModel.from_pretrained(
                None, workers=cluster.addresses, dtype="fp16", compression=name, progress=False
            ) as m:
                assert [s.span for s in m.plan.stages] == [st.span for st in pipe.stages]
                eos = m.spec.eos_token_ids[0]
                for p, ref in zip(prompts, want[name]):
                    r = m.generate(p, max_tokens=40)
                    assert list(r.token_ids) + ([eos] if r.finish_reason == "eos" else []) == ref, name
                ev = m.trace_events()
                # decode steps were encoded inside the graphs: quantize events only for prompts
                q = [e for e in ev if e.kind.value == "quantize"]
                assert q and all(e.step == 0 for e in q), name
                fast = [c.call("Health", pb.HealthRequest()).fast_path_steps for c in m.clients]
                assert sum(fast) > 0
        with (
            AutoDistributedModel.from_pretrained(
                None, workers=cluster.addresses, dtype="fp16", compression="int8", progress=False
            ) as m,
            direct_session(m) as (sid, target, got),
        ):
            x = torch.randn(1, 1, 64, generator=torch.Generator().manual_seed(0))
            for how in ("short", "long"):
                assert _send_and_wait(target, _frame(sid, "int8", x, how), 10) == "closed", how
            assert "payload is" in cluster.log_path(1).read_text(errors="replace")
            assert _send_and_wait(target, _frame(sid, "int8", x), 1.0) == "open"
            assert len(wait_for_frames(got)) == 1  # the intact decode frame went through (stage 2 answered)
        assert all(cluster.alive)


@pytest.mark.multiprocess
def test_codec_frames_are_decoded_on_the_gpu_and_bad_ones_refused(tmp_path):
    """Codec frames that no wire graph takes (prompts) are checked on the host and decoded on the worker's
    GPU, and the outlier codec's decode steps run through wire graphs: the probe's greedy tokens, no
    host-side decode in the trace, quantize events for prompts only; a short, long or out-of-range-outlier
    body (prompt or decode frame) closes its connection with the codec's reason, and the worker keeps
    serving (an intact frame is answered)."""
    from hyperlane_lab.probes import greedy_sequences, load_pipeline
    from hyperlane_lab.runtime import AutoDistributedModel, LocalCluster
    from tests.test_codec_wire import _frame, _send_and_wait, direct_session, wait_for_frames

    prompts = ["Once upon a time", "Lily and Ben went to the park. They saw"]
    name = "int4_outlier_asym"
    pipe = load_pipeline(None, n_stages=3, dtype="fp16", device="cuda")
    want = greedy_sequences(pipe, prompts, [name, name], 64, 24)
    with (
        LocalCluster(3, devices=["cuda:0"] * 3, cache_dir=tmp_path) as cluster,
        AutoDistributedModel.from_pretrained(
            None, workers=cluster.addresses, dtype="fp16", compression=name, progress=False
        ) as m,
    ):
        eos = m.spec.eos_token_ids[0]
        for p, ref in zip(prompts, want):
            r = m.generate(p, max_tokens=24)
            assert list(r.token_ids) + ([eos] if r.finish_reason == "eos" else []) == ref
        ev = m.trace_events()
        assert not [e for e in ev if e.kind.value == "decode"]  # no payload was decoded on a host
        q = [e for e in ev if e.kind.value == "quantize"]
        assert q and all(e.step == 0 for e in q)  # decode steps were encoded inside the wire graphs
        with direct_session(m) as (sid, target, got):
            x = torch.randn(1, 4, 64, generator=torch.Generator().manual_seed(0))
            bad = [("int4_outlier", "outlier_index"), ("int4_outlier", "short"), ("int8", "long")]
            for codec, how in bad:
                assert _send_and_wait(target, _frame(sid, codec, x, how), 10) == "closed", (codec, how)
            one = x[:, :1]  # a decode frame (the wire graph's path): its columns are checked on the host too
            assert _send_and_wait(target, _frame(sid, "int4_outlier", one, "outlier_index"), 10) == "closed"
            log = cluster.log_path(1).read_text(errors="replace")
            assert "outlier column 4000" in log and "corrupted 'int4_outlier' payload" in log
            assert "corrupted 'int8' payload" in log
            assert not got
            assert _send_and_wait(target, _frame(sid, name, x), 1.0) == "open"
            assert len(wait_for_frames(got)) == 1  # the intact prompt frame went through (stage 2 answered)
        assert all(cluster.alive)


@pytest.mark.multiprocess
def test_busy_polling_gpu_workers_match_the_probe(tmp_path):
    """Workers that spin for frames (``--busy-poll-us``) while idle: the same greedy tokens as the
    in-process probe, also with sessions side by side (steps in flight while frames arrive)."""
    from concurrent.futures import ThreadPoolExecutor

    from hyperlane_lab.probes import greedy_sequences, load_pipeline
    from hyperlane_lab.runtime import AutoDistributedModel, LocalCluster
    from hyperlane_lab.runtime.proto_gen import hyperlane_pb2 as pb

    prompts = ["Once upon a time", "Lily and Ben went to the park. They saw", "The dog", "Tom had a red"]
    pipe = load_pipeline(None, n_stages=3, dtype="fp16", device="cuda")
    want = greedy_sequences(pipe, prompts, ["int8", "int8"], 64, 32)
    flags = ["--busy-poll-us", "20000"]
    with (
        LocalCluster(3, devices=["cuda:0"] * 3, cache_dir=tmp_path, extra_args=flags) as cluster,
        AutoDistributedModel.from_pretrained(
            None, workers=cluster.addresses, dtype="fp16", compression="int8", progress=False
        ) as m,
    ):
        eos = m.spec.eos_token_ids[0]

        def run(p: str) -> list[int]:
            r = m.generate(p, max_tokens=32)
            return list(r.token_ids) + ([eos] if r.finish_reason == "eos" else [])

        assert [run(p) for p in prompts[:2]] == want[:2]
        with ThreadPoolExecutor(4) as ex:
            assert list(ex.map(run, prompts)) == want
        health = [c.call("Health", pb.HealthRequest()) for c in m.clients]
        assert all(h.busy_poll_spun > 0 and h.fast_path_steps > 0 for h in health), health
        assert all(cluster.alive)


@pytest.mark.multiprocess
@pytest.mark.parametrize("mode", ["compute_thread", "prompt_on_loop", "staging_pool", "direct_upload"])
def test_prompt_states_arrive_in_pinned_buffers_and_give_the_probe_tokens(tmp_path, monkeypatch, mode):
    """GPU workers receive prompt-sized hidden states into page-locked buffers (uploaded by DMA,
    the body held until the copy is done), replay the prompt from a graph, and give the in-process
    probe's greedy tokens, also for the second prompt that reuses those buffers, and with the
    prompts sent down the pipeline in chunks. ``on_loop``: with ``HYPERLANE_PROMPT_ON_LOOP=1`` a chunk
    whose graph is captured is enqueued on the event loop (a second chunked pass finds them all
    captured: Health's ``fast_path_prompts`` counts them). ``staging_pool``: with ``HYPERLANE_STAGING_POOL=1`` the
    uploads go into device buffers kept for reuse; the later passes reuse them (Health's ``staged_reuses``).
    ``direct_upload``: with ``HYPERLANE_DIRECT_PROMPT_UPLOAD=1`` the later passes upload hidden states straight
    into the captured prompt graphs' inputs (``TorchStage.prompt_input_slot``), with the same tokens."""
    from hyperlane_lab.probes import greedy_sequences, load_pipeline
    from hyperlane_lab.runtime import AutoDistributedModel, LocalCluster
    from hyperlane_lab.runtime.proto_gen import hyperlane_pb2 as pb

    on_loop, pooled = mode == "prompt_on_loop", mode == "staging_pool"
    if on_loop:
        monkeypatch.setenv("HYPERLANE_PROMPT_ON_LOOP", "1")  # the worker processes inherit it
    if pooled:
        monkeypatch.setenv("HYPERLANE_STAGING_POOL", "1")
    direct = mode == "direct_upload"
    if direct:
        monkeypatch.setenv("HYPERLANE_DIRECT_PROMPT_UPLOAD", "1")

    story = (
        "Once upon a time, there was a little girl named Lily. She liked to play in the park with her dog. "
    )
    prompts = [story * 5, "The sun was hot. " + story * 4]  # ~150 tokens: 64-wide fp16 states >= 16 KB
    pipe = load_pipeline(None, n_stages=3, dtype="fp16", device="cuda")
    want = greedy_sequences(pipe, prompts, ["raw", "raw"], 64, 16)
    with (
        LocalCluster(3, devices=["cuda:0"] * 3, cache_dir=tmp_path) as cluster,
        AutoDistributedModel.from_pretrained(
            None, workers=cluster.addresses, dtype="fp16", progress=False
        ) as m,
    ):
        eos = m.spec.eos_token_ids[0]
        # whole prompts, then in chunks (a chunk's graph reads the keys before it)
        for chunk in (None, 64, 64) if on_loop or pooled or direct else (None, 64):
            m.prefill_chunk = chunk
            got = []
            for p in prompts:
                assert len(m.tokenizer.encode(p)) * 64 * 2 >= 16 << 10
                r = m.generate(p, max_tokens=16)
                got.append(list(r.token_ids) + ([eos] if r.finish_reason == "eos" else []))
            assert got == want, chunk
        # every step (and prompt chunk) on a CUDA worker has one "launch" event (host staging and
        # enqueueing), which begins after the step was queued
        ev = m.trace_events()
        by: dict[tuple[str, int, str, int], list] = {}
        for e in sorted(ev, key=lambda e: e.start):
            by.setdefault((e.kind.value, e.stage, e.session, e.step), []).append(e)
        launches = [e for e in ev if e.kind.value == "launch"]
        assert len(launches) == sum(e.kind.value == "compute" for e in ev) > 0
        for (kind, *key), es in by.items():
            if kind == "launch":  # the k-th launch of a (stage, session, step) follows its k-th queue
                queues = by[("queue", *key)]
                assert len(queues) == len(es)
                assert all(q.end <= e.start <= e.end for q, e in zip(queues, es))
        health = [c.call("Health", pb.HealthRequest()) for c in m.clients]
        assert health[0].pinned_buffers == 0  # token ids: small bodies
        assert all(h.pinned_buffers >= 1 for h in health[1:]), health
        assert (sum(h.fast_path_prompts for h in health) > 0) == on_loop  # the second chunked pass
        # hidden states (stages 1 and 2) reuse kept buffers; stage 0's token ids are below the pool's minimum
        assert [h.staged_reuses > 0 for h in health] == [False, pooled, pooled], health
        # hidden-state chunks of the later passes went straight into their prompt graphs' inputs (not token ids)
        assert [h.direct_uploads > 0 for h in health] == [False, direct, direct], health
        assert all(cluster.alive)


@pytest.mark.parametrize("codec", ["raw", "int8"])
def test_armed_steps_equal_launched_steps_and_a_release_changes_nothing(codec):
    """``decode_armed.Arming``: a wire graph enqueued behind the gate before its inputs exist, then fired
    (inputs, then the flag), gives the bytes a launched step gives, on every stage; the gate holds the
    stream until the flag; an armed step released without a frame runs as padding and leaves the
    session's cache as it was (the steps after it still match)."""
    import time

    from hyperlane_lab.models.decode_armed import Arming

    stages = _stages(SPEC, [1, 2], torch.float16, "cuda")
    c = None if codec == "raw" else codecs.get(codec, 16, backend="triton")
    cid, gs = (0, 0) if c is None else (c.codec_id, c.group_size)
    specs = [WireSpec(0, 0, cid, gs), WireSpec(cid, gs, cid, gs), WireSpec(cid, gs, 0, 0)]
    ids, pos = _prompt([5], SPEC.vocab_size)
    for sid in ("launched", "armed"):
        x = ids
        for i, st in enumerate(stages):
            st.open_session(sid, 1, 24)
            x = st.forward(sid, x, pos)
            x = _hop(c, x) if i < 2 else x
    nxt = x.argmax(-1).cpu().numpy().astype(np.int64)
    arming, stream = Arming(), torch.cuda.current_stream()

    def events() -> tuple[torch.cuda.Event, torch.cuda.Event]:
        return torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    for t in range(6):
        pos_np = np.array([5 + t], dtype=np.int64)
        pay_l: object = nxt.copy()
        pay_a: object = nxt.copy()
        for i, st in enumerate(stages):
            gd = st.graph_decoder()
            gl = gd.step_wire(st.session("launched"), specs[i], pos_np, pay_l)
            torch.cuda.synchronize()
            pay_l = bytes(gl.wire.payload())
            cache = st.session("armed")
            if t == 0:  # the session's first wire step captures its graph
                gd.step_wire(cache, specs[i], pos_np, pay_a)
            else:
                if t == 3:  # armed, then released without a frame: a padding run
                    a = arming.arm("armed", cache.graph, *events(), stream)
                    arming.release(a)
                    torch.cuda.synchronize()
                    assert not arming.gave_up_on(a)
                a = arming.arm("armed", cache.graph, *events(), stream)
                time.sleep(0.005)
                assert not a.end.query()  # held by the gate
                assert arming.fire(a, pos_np, pay_a, first=i == 0)
                a.end.synchronize()
                assert not arming.gave_up_on(a) and a.start.elapsed_time(a.end) > 0
            torch.cuda.synchronize()
            pay_a = bytes(cache.graph.wire.payload())
            assert pay_a == pay_l, f"step {t}, stage {i}"
        nxt = np.frombuffer(pay_l, dtype=np.int64)[:-1].copy()  # the last stage's ids (then its flag)
    assert arming.fired == 3 * 5 and arming.released == 3


@pytest.mark.multiprocess
def test_hop_warm_ups_change_no_token(tmp_path):
    """Workers that warm each hop shortly before a lone decode step's frame (runtime/hop_warm.py), with a 50 µs
    lead and a model whose steps are long enough for the completion thread to catch them (tiny-100m, random
    weights, two stages on one GPU): every stage sent WARM frames, each arrived at the stage its frames go to
    (the last stage's: the first, the token loop's) and was dropped there; lone sessions' greedy tokens equal
    the same prompts' run side by side and a second lone pass. No ship waited for a warm-up's sleep: the first
    session's first decode step captures its graph (seconds in its "GPU time"), which must not set the next sleep
    (a step's send starts within 50 ms of its GPU end, everywhere)."""
    from concurrent.futures import ThreadPoolExecutor

    from hyperlane_lab.runtime import AutoDistributedModel, LocalCluster
    from hyperlane_lab.runtime.proto_gen import hyperlane_pb2 as pb

    g = torch.Generator().manual_seed(5)
    env = {"HYPERLANE_HOP_WARM_LEAD_US": "50"}
    with (
        LocalCluster(2, devices=["cuda:0"] * 2, cache_dir=tmp_path, env=env) as cluster,
        AutoDistributedModel.from_pretrained(
            "tiny-100m", workers=cluster.addresses, random_weights=True, dtype="fp16", progress=False
        ) as m,
    ):
        prompts = [torch.randint(3, m.spec.vocab_size, (n,), generator=g).tolist() for n in (8, 17, 5, 30)]

        def run(p: list[int]) -> list[int]:
            return list(m.generate(p, max_tokens=24).token_ids)

        def counts() -> tuple[list[int], list[int]]:
            h = [c.call("Health", pb.HealthRequest()) for c in m.clients]
            return [x.hop_warmups for x in h], [x.warm_frames_in for x in h]

        alone = [run(p) for p in prompts]
        assert sum(len(t) for t in alone) >= 40, alone
        sent, got = counts()
        # (steps this short often end before the completion thread can place a warm-up: 9 a stage in s29d)
        assert all(n >= 3 for n in sent), sent
        deadline = time.monotonic() + 10  # (the last WARM frames may still be on the way)
        while got != [sent[1], sent[0]] and time.monotonic() < deadline:
            time.sleep(0.05)
            sent, got = counts()
        assert got == [sent[1], sent[0]], (sent, got)
        with ThreadPoolExecutor(4) as ex:
            assert list(ex.map(run, prompts)) == alone
        assert [run(p) for p in prompts] == alone
        assert all(a > b for a, b in zip(counts()[0], sent)), (sent, counts())
        ev = {(e.kind.value, e.stage, e.session, e.step): e for e in m.trace_events() if e.step > 0}
        gaps = [
            ev[("send", st, ss, k)].start - e.end
            for (kind, st, ss, k), e in ev.items()
            if kind == "compute" and ("send", st, ss, k) in ev
        ]
        assert len(gaps) > 50 and max(gaps) < 0.05, sorted(gaps)[-5:]
        h = [c.call("Health", pb.HealthRequest()) for c in m.clients]
        # the waits count from the step's GPU start and are timed by the GPU (gpu_timer.py), ending 61-97 µs past
        # their mark in the s30d bench (4 workers, MPS), which the next wait allows for: a warm-up comes too late
        # only when a step ran shorter than the recent ones by more than that (s30a-c, before: 113-144 of ~150)
        late, done = [x.hop_warm_late for x in h], [x.hop_warmups for x in h]
        assert sum(late) <= max(4, (sum(late) + sum(done)) // 10), (late, done)
        assert max(x.hop_warm_wake_us for x in h) < 150, [x.hop_warm_wake_us for x in h]
        assert all(cluster.alive)


@pytest.mark.multiprocess
@pytest.mark.parametrize("compression", ["raw", "int8"])
def test_armed_graphs_gpu_workers_match_the_probe(tmp_path, compression):
    """Workers with ``--armed-graphs`` (one per GPU where there are several): a lone session's decode
    steps are armed and fired by their frames (Health's ``armed_fired`` on every stage), sessions side by
    side release them, and every generation gives the in-process probe's greedy tokens."""
    from concurrent.futures import ThreadPoolExecutor

    from hyperlane_lab.probes import greedy_sequences, load_pipeline
    from hyperlane_lab.runtime import AutoDistributedModel, LocalCluster
    from hyperlane_lab.runtime.proto_gen import hyperlane_pb2 as pb

    prompts = ["Once upon a time", "Lily and Ben went to the park. They saw", "The dog", "Tom had a red"]
    pipe = load_pipeline(None, n_stages=3, dtype="fp16", device="cuda")
    want = greedy_sequences(pipe, prompts, [compression] * 2, 64, 32)
    n = torch.cuda.device_count()
    devices = [f"cuda:{i % n}" for i in range(3)]
    with (
        LocalCluster(3, devices=devices, cache_dir=tmp_path, extra_args=["--armed-graphs"]) as cluster,
        AutoDistributedModel.from_pretrained(
            None, workers=cluster.addresses, dtype="fp16", compression=compression, progress=False
        ) as m,
    ):
        eos = m.spec.eos_token_ids[0]

        def run(p: str) -> list[int]:
            r = m.generate(p, max_tokens=32)
            return list(r.token_ids) + ([eos] if r.finish_reason == "eos" else [])

        def health() -> list[Any]:
            return [c.call("Health", pb.HealthRequest()) for c in m.clients]

        # the first session captures each stage's graphs and compiles its kernels (seconds): a step armed
        # meanwhile may wait past the gate's limit, and its late frame is then launched as usual
        assert run(prompts[3]) == want[3]
        base = health()
        assert [run(p) for p in prompts[:2]] == want[:2]
        mid = health()
        assert all(h.armed_fired > b.armed_fired for h, b in zip(mid, base)), mid
        with ThreadPoolExecutor(4) as ex:
            assert list(ex.map(run, prompts)) == want
        assert run(prompts[2]) == want[2]  # alone again: armed again
        after = health()
        assert all(a.armed_fired > h.armed_fired for a, h in zip(after, mid)), after
        assert sum(h.armed_released for h in after) > 0  # closes and side-by-side sessions released some
        assert all(a.armed_gave_up <= a.armed_released for a in after), after
        # warm, no gate waited its whole limit: every armed step was fired or released in time
        assert [a.armed_gave_up for a in after] == [b.armed_gave_up for b in base], (base, after)
        assert all(cluster.alive)


@pytest.mark.multiprocess
@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs a GPU for each of 2 workers"
)
def test_local_cluster_arms_workers_with_a_gpu_each_by_default(tmp_path, monkeypatch):
    """No flag, no environment: a LocalCluster whose workers have a GPU each arms their decode steps (Health's
    ``armed_fired`` on both stages) and still gives the probe's greedy tokens; after a run's last step nothing
    is armed (nothing released at the session's close, no gate left to give up)."""
    from hyperlane_lab.models.decode_armed import host_orders_stores
    from hyperlane_lab.probes import greedy_sequences, load_pipeline
    from hyperlane_lab.runtime import AutoDistributedModel, LocalCluster
    from hyperlane_lab.runtime.proto_gen import hyperlane_pb2 as pb

    if not host_orders_stores():
        pytest.skip("armed steps need an x86-64 host")
    monkeypatch.delenv("HYPERLANE_ARMED_GRAPHS", raising=False)  # the default must decide
    prompts = ["Once upon a time", "The dog"]
    want = greedy_sequences(
        load_pipeline(None, n_stages=2, dtype="fp16", device="cuda"), prompts, ["raw"], 64, 32
    )
    with (
        LocalCluster(2, devices=["cuda:0", "cuda:1"], cache_dir=tmp_path) as cluster,
        AutoDistributedModel.from_pretrained(
            None, workers=cluster.addresses, dtype="fp16", progress=False
        ) as m,
    ):
        assert cluster.armed
        eos = m.spec.eos_token_ids[0]

        def releases() -> list[tuple[int, int]]:
            return [
                (h.armed_released, h.armed_gave_up)
                for h in (c.call("Health", pb.HealthRequest()) for c in m.clients)
            ]

        got, first = [], None
        for p in prompts * 2:  # the first run captures the graphs; the others replay them, armed
            r = m.generate(p, max_tokens=32)
            got.append(list(r.token_ids) + ([eos] if r.finish_reason == "eos" else []))
            # (in the first run a gate may give up while the next stage captures its graph for > 2 s)
            first = first or releases()
        assert got == want * 2
        health = [c.call("Health", pb.HealthRequest()) for c in m.clients]
        assert all(h.armed_fired > 0 for h in health), health
        # the later runs used their whole budget (no EOS within 32 tokens), and the ring frame of each one's
        # last step said so (FLAG_LAST): stage 0 armed nothing after it, so no session's close released an armed
        # step (one release per run before) and no gate waited out its 2 s
        assert all(len(g) == 32 and g[-1] != eos for g in got)
        assert releases() == first, (first, health)


def test_armed_gate_holds_its_stream_until_the_host_writes_the_pinned_flag():
    """The protocol as the worker uses it: pinned words, the gate then a copy from pinned inputs on one
    stream. Nothing after the gate runs before the flag; the copy then sees the inputs written before it."""
    import time

    from hyperlane_lab.codecs._kernels import kernel_module

    gate = kernel_module("armed_wait")
    flag = torch.zeros(1, dtype=torch.int64, pin_memory=True)
    status = torch.zeros(1, dtype=torch.int64, pin_memory=True)
    pos = torch.zeros(4, dtype=torch.int64, pin_memory=True)
    dev = torch.full((4,), -7, dtype=torch.int64, device="cuda")
    done = torch.cuda.Event()
    for target in (1, 2, 3):
        gate.armed_wait(flag, status, pos, target, int(2e9), timer=True)
        dev.copy_(pos, non_blocking=True)
        done.record()
        time.sleep(0.02)
        assert not done.query()  # held by the gate
        pos.numpy()[:] = [target, target + 1, target + 2, target + 3]
        flag.numpy()[0] = target
        done.synchronize()
        assert int(status[0]) == target and dev.tolist() == [target + i for i in range(4)]
    gate.armed_wait(flag, status, pos, 4, 1_000_000, timer=True)  # never released: gives up after 1 ms
    torch.cuda.synchronize()
    assert int(status[0]) == -4 and pos.tolist() == [-1] * 4
