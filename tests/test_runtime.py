"""Multi-process tests: real worker processes, real gRPC and TCP on 127.0.0.1."""

from __future__ import annotations

import collections
import itertools
import os
import random
import re
import socket
import struct
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch

from hyperlane_lab.errors import InfeasiblePlanError, WorkerError
from hyperlane_lab.generation.pipeline import InProcessPipeline
from hyperlane_lab.runtime import AutoDistributedModel, LocalCluster, WorkerClient
from hyperlane_lab.runtime.frame import FrameHeader, FrameKind, pack_header
from hyperlane_lab.runtime.proto_gen import hyperlane_pb2 as pb

pytestmark = pytest.mark.multiprocess

PROMPTS = ["Once upon a time", "The cat sat on the mat", "Lily and Ben went to the park. They saw"]


@pytest.fixture(scope="module")
def model3(cluster3):
    with AutoDistributedModel.from_pretrained(None, workers=cluster3.addresses, progress=False) as m:
        yield m


@pytest.fixture(scope="module")
def local_pipe():
    return InProcessPipeline.from_pretrained(None, n_stages=3)


def test_greedy_equals_inprocess_and_transformers(model3, local_pipe, hf_greedy):
    assert [s.span.start for s in model3.plan.stages] == [0, 2, 4]
    for prompt in PROMPTS:
        remote = model3.generate(prompt, max_tokens=48)
        local = local_pipe.generate(prompt, max_tokens=48)
        assert remote.token_ids == local.token_ids == hf_greedy(prompt, 48)
        assert remote.text == local.text


def test_sampled_generation_is_seeded_like_inprocess(model3, local_pipe):
    kw = dict(max_tokens=24, temperature=0.9, top_k=40, top_p=0.95, seed=1234)
    assert model3.generate(PROMPTS[0], **kw).token_ids == local_pipe.generate(PROMPTS[0], **kw).token_ids


def test_batch_of_prompts_matches_single(model3):
    batch = model3.generate(PROMPTS, max_tokens=20)
    singles = [model3.generate(p, max_tokens=20) for p in PROMPTS]
    assert [b.token_ids for b in batch] == [s.token_ids for s in singles]


def test_concurrent_sessions_equal_sequential(model3):
    prompts = [f"{PROMPTS[i % 3]} {i}" for i in range(8)]
    sequential = [model3.generate(p, max_tokens=16).token_ids for p in prompts]
    with ThreadPoolExecutor(8) as pool:
        concurrent = list(pool.map(lambda p: model3.generate(p, max_tokens=16).token_ids, prompts))
    assert concurrent == sequential
    # they really were in flight together: different sessions overlapped on the stages
    events = [e for e in model3.trace_events() if e.kind.value == "compute"]
    sessions = {e.session for e in events}
    assert len(sessions) >= 8


def test_streaming_yields_same_text(model3):
    full = model3.generate(PROMPTS[0], max_tokens=30, stop=["park"])
    pieces = list(model3.generate(PROMPTS[0], max_tokens=30, stop=["park"], stream=True))
    assert "".join(pieces) == full.text and len(pieces) > 3


def test_trace_has_events_from_every_stage(model3):
    model3.trace_events()  # drain
    model3.generate(PROMPTS[1], max_tokens=5)
    events = model3.trace_events()
    kinds = {(e.stage, e.kind.value) for e in events}
    for stage in range(3):
        assert (stage, "compute") in kinds and (stage, "receive") in kinds
    assert (2, "sample") in kinds
    for e in events:
        assert e.end >= e.start


def _fuzz_frames(rng: random.Random, target: tuple[str, int], session: str, n: int) -> int:
    """Send n malformed frames, each on its own connection (the worker closes it)."""
    sent = 0
    good = FrameHeader(FrameKind.TENSOR, session, 0, 1, 1, torch.float32, 0, 0, (1, 1, 64), 256)
    for i in range(n):
        kind = i % 8
        hdr = bytearray(pack_header(good))
        body = bytes(8) + bytes(256)
        if kind == 0:
            hdr[:4] = b"EVIL"
        elif kind == 1:
            hdr[4] = 99  # version
        elif kind == 2:
            hdr[56:64] = struct.pack("<Q", 1 << 40)  # oversized payload_len
        elif kind == 3:
            body = body[: rng.randrange(0, len(body))]  # truncated, then close
        elif kind == 4:
            hdr = bytearray(
                pack_header(
                    FrameHeader(FrameKind.TENSOR, session, 0, 1, 1, torch.float32, 0, 0, (1, 1, 64), 200)
                )
            )  # length disagrees with shape
            body = bytes(8) + bytes(200)
        elif kind == 5:
            hdr = bytearray(
                pack_header(
                    FrameHeader(
                        FrameKind.TENSOR, uuid.uuid4().hex, 0, 1, 1, torch.float32, 0, 0, (1, 1, 64), 256
                    )
                )
            )  # unknown session
        elif kind == 6:
            hdr = bytearray(rng.randbytes(64))
        else:
            hdr[32] = 42  # dtype code
        try:
            with socket.create_connection(target, timeout=2) as s:
                s.sendall(bytes(hdr) + body)
                s.shutdown(socket.SHUT_WR)
                s.settimeout(2)
                while s.recv(4096):
                    pass
        except OSError:
            pass
        sent += 1
    return sent


def test_fuzzer_does_not_disturb_generation(cluster3, model3, hf_greedy):
    targets = [("127.0.0.1", p) for p in cluster3.data_ports]
    session = uuid.uuid4().hex
    counts = []

    def fuzz() -> None:
        rng = random.Random(7)
        counts.append(sum(_fuzz_frames(rng, t, session, 350) for t in targets))

    th = threading.Thread(target=fuzz)
    th.start()
    results = []
    while th.is_alive() and len(results) < 50:
        results.append(model3.generate(PROMPTS[2], max_tokens=24).token_ids)
    th.join(120)
    assert counts and counts[0] >= 1000
    assert results and all(r == hf_greedy(PROMPTS[2], 24) for r in results)
    assert all(cluster3.alive)
    assert model3.generate(PROMPTS[0], max_tokens=24).token_ids == hf_greedy(PROMPTS[0], 24)


def test_invalid_grpc_requests(cluster3):
    c = WorkerClient(cluster3.addresses[0])
    bad = [
        ("LoadShard", pb.LoadShardRequest(start=3, end=1, model_path="/nope"), "empty or negative"),
        ("LoadShard", pb.LoadShardRequest(start=0, end=1, dtype="fp8"), "unknown dtype"),
        ("LoadShard", pb.LoadShardRequest(start=0, end=1, engine="tensorrt"), "unknown engine"),
        ("LoadShard", pb.LoadShardRequest(start=0, end=1, model_path="/does/not/exist"), "does not exist"),
        (
            "LoadShard",
            pb.LoadShardRequest(start=0, end=1, config_sha256="ab" * 32),
            "not in the worker's cache",
        ),
        ("OpenSession", pb.OpenSessionRequest(session_id="xyz", batch=1, max_len=8), "32 lowercase hex"),
        ("OpenSession", pb.OpenSessionRequest(session_id="a" * 32, batch=0, max_len=8), "batch must be"),
        ("Connect", pb.ConnectRequest(next_address="nonsense"), "host:port"),
        ("Connect", pb.ConnectRequest(next_address="", codec="int3"), "unknown codec"),
        ("HasBlobs", pb.HasBlobsRequest(sha256=["zz"]), "bad sha256"),
    ]
    for method, req, message in bad:
        with pytest.raises(grpc.RpcError) as info:
            getattr(c.stub, method)(req, timeout=20)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (method, info.value.details())
        assert message in info.value.details(), (method, info.value.details())
    assert c.info().worker_id  # still serving
    c.close()


def test_unreachable_worker_names_address():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(WorkerError, match=f"127.0.0.1:{port}"):
        AutoDistributedModel.from_pretrained(None, workers=[f"127.0.0.1:{port}"], progress=False)


def test_shard_shipping_and_cache(tmp_path, hf_greedy, monkeypatch):
    """Workers have no weights on disk: the client ships them; a second load sends nothing."""
    with LocalCluster(2, cache_dir=tmp_path / "cache") as cluster:
        with AutoDistributedModel.from_pretrained(None, workers=cluster.addresses, progress=False) as m:
            assert m.generate(PROMPTS[0], max_tokens=12).token_ids == hf_greedy(PROMPTS[0], 12)
        blobs = [f for f in (tmp_path / "cache").iterdir() if re.fullmatch("[0-9a-f]{64}", f.name)]
        assert len(blobs) >= 3  # config + 2 weight shards
        calls, sent = [], []
        orig = WorkerClient.upload_blob

        def spy(self, data, progress=None):
            calls.append(len(data))
            real_put = self.stub.PutBlob
            self.stub.PutBlob = lambda *a, **kw: sent.append(1) or real_put(*a, **kw)
            return orig(self, data, progress)

        monkeypatch.setattr(WorkerClient, "upload_blob", spy)
        with AutoDistributedModel.from_pretrained(None, workers=cluster.addresses, progress=False) as m:
            assert m.generate(PROMPTS[0], max_tokens=12).token_ids == hf_greedy(PROMPTS[0], 12)
        assert calls and not sent  # asked, but nothing was sent


def test_shards_live_in_the_workers_cache_and_a_lost_blob_is_linked_again(tmp_path, hf_greedy, monkeypatch):
    """A worker builds a shipped shard's folder inside its own cache, so caches side by side never share one,
    with a relative link to the weights blob (a relative cache path works); a shard whose link dangles (its
    blob deleted, or the link pointing where a cache used to be) is linked again to the blob shipped next."""

    def generate(cache: Path) -> list[int]:
        with (
            LocalCluster(1, cache_dir=cache) as cluster,
            AutoDistributedModel.from_pretrained(None, workers=cluster.addresses, progress=False) as m,
        ):
            return list(m.generate(PROMPTS[0], max_tokens=8).token_ids)

    want = hf_greedy(PROMPTS[0], 8)
    monkeypatch.chdir(tmp_path)
    for cache in (Path("a"), tmp_path / "b"):  # relative, absolute
        assert generate(cache) == want
        (shard,) = (tmp_path / cache / "shards").iterdir()
        link = shard / "model.safetensors"
        assert link.is_symlink() and link.resolve().parent == (tmp_path / cache).resolve()
        assert not os.path.isabs(os.readlink(link))
    assert not (tmp_path / "shards").exists()  # nothing written beside the caches
    link.resolve().unlink()  # cache b loses the weights blob: its shard's link dangles
    assert link.is_symlink() and not link.exists()
    assert generate(tmp_path / "b") == want  # shipped again, linked again
    link.unlink()
    link.symlink_to(tmp_path / "gone" / link.resolve().name)  # where a cache used to be
    assert generate(tmp_path / "b") == want
    assert link.exists() and link.resolve().parent == (tmp_path / "b").resolve()


def test_one_worker_token_loop_runs_in_memory_or_through_its_own_socket(tmp_path, hf_greedy):
    """A worker holding every layer is its own first stage: its token loop hands each next step to the step
    path in memory, so a step sends one frame (the client's tokens); with ``--no-local-ring`` the next step's
    frame goes through the worker's own socket first (two sends a step but the last). Greedy tokens equal
    transformers' either way, sampled ones with a seed agree between the two, and three sessions' loops run side
    by side give each its own tokens."""
    want = hf_greedy(PROMPTS[0], 12)
    sampled = []
    for extra, sends in (([], 1), (["--no-local-ring"], 2)):
        with (
            LocalCluster(1, cache_dir=tmp_path / "c", extra_args=extra) as cluster,
            AutoDistributedModel.from_pretrained(None, workers=cluster.addresses, progress=False) as m,
        ):
            m.trace_events()  # drain
            assert m.generate(PROMPTS[0], max_tokens=12).token_ids == want
            per_step = collections.Counter(e.step for e in m.trace_events() if e.kind.value == "send")
            assert sorted(per_step) == list(range(12)), per_step
            assert {per_step[k] for k in range(11)} == {sends} and per_step[11] == 1, per_step
            kw = dict(max_tokens=10, temperature=0.9, top_k=40, seed=3)
            sampled.append(m.generate(PROMPTS[1], **kw).token_ids)
            if not extra:  # three sessions' loops side by side on the one worker: each its own tokens
                seq = [m.generate(p, max_tokens=8).token_ids for p in PROMPTS]
                with ThreadPoolExecutor(3) as ex:
                    assert list(ex.map(lambda p: m.generate(p, max_tokens=8).token_ids, PROMPTS)) == seq
                assert seq[0] == want[:8]
    assert sampled[0] == sampled[1] and len(sampled[0]) == 10


def test_model_does_not_fit(tmp_path):
    with (
        LocalCluster(2, cache_dir=tmp_path / "c", extra_args=["--memory-limit-gib", "0.0002"]) as cluster,
        pytest.raises(InfeasiblePlanError, match=r"needs .* GiB, has .* GiB free"),
    ):
        AutoDistributedModel.from_pretrained(None, workers=cluster.addresses, progress=False)


def test_sigterm_shuts_down_cleanly(tmp_path):
    cluster = LocalCluster(1, cache_dir=tmp_path / "c").start()
    try:
        p = cluster.procs[0]
        p.terminate()
        assert p.wait(20) == 0
    finally:
        cluster.close()


def test_cli_run_with_workers(capsys, hf_greedy):
    import json

    from hyperlane_lab.cli.main import main

    for extra in ([], ["--prefill-chunk", "2"]):  # the prompt in one frame (short: auto), in chunks of 2
        assert main(["run", "--workers", "2", "--max-tokens", "10", "--json", *extra]) == 0
        out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert out["token_ids"] == hf_greedy("Once upon a time", 10), extra
        assert [s["span"] for s in out["stages"]] == [[0, 3], [3, 5]]
    with pytest.raises(SystemExit) as e:
        main(["run", "--workers", "2", "--prefill-chunk", "1"])
    assert e.value.code == 2 and "use auto, none, or an int >= 2" in capsys.readouterr().err
    # local workers kept on one CPU: same tokens; a CPU list for workers it did not start is refused
    one = str(max(os.sched_getaffinity(0)))
    assert main(["run", "--workers", "2", "--max-tokens", "10", "--json", "--cpus", one]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["token_ids"] == hf_greedy("Once upon a time", 10)
    assert main(["run", "--workers", "127.0.0.1:1", "--cpus", one]) == 1
    assert "start each with `hyperlane worker --cpus" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["run", "--workers", "2", "--cpus", "two"])
    assert e.value.code == 2 and "not N or N-M" in capsys.readouterr().err


def test_link_probe(model3):
    rows = model3.probe_links(sizes=(64, 1 << 16, 1 << 20), repeats=2)
    assert len(rows) == 3
    for r in rows:
        assert 0 < r["latency_s"] < 0.5 and r["bandwidth"] > 1e6


def test_profile_rpc(cluster3, bundled_path):
    import json
    from pathlib import Path

    c = WorkerClient(cluster3.addresses[0])
    cfg = json.loads((Path(bundled_path) / "config.json").read_text())
    r = c.call("Profile", pb.ProfileRequest(model_config_json=json.dumps(cfg), dtype="fp32", context=64))
    assert r.flops > 1e8 and r.mem_bw > 1e8 and 0 < r.layer_decode_s < 1 and r.layer_prefill_s_per_token > 0
    info = c.info()
    assert info.flops == pytest.approx(r.flops) and info.mem_bw == pytest.approx(r.mem_bw)
    c.close()
    time.sleep(0)


def test_auto_compression_on_loopback(cluster3, hf_greedy):
    with AutoDistributedModel.from_pretrained(
        None, workers=cluster3.addresses, compression="auto", progress=False
    ) as m:
        # loopback moves a 64-wide activation faster than any codec can encode it
        assert [s.codec for s in m.plan.stages[:-1]] == ["raw", "raw"]
        assert m.generate(PROMPTS[0], max_tokens=16).token_ids == hf_greedy(PROMPTS[0], 16)


def test_auto_rule_compresses_only_where_it_pays():
    from hyperlane_lab import codecs
    from hyperlane_lab.runtime.codec_choice import choose_codec
    from hyperlane_lab.types import LinkProfile

    slow = LinkProfile(0.3e-3, 1e9 / 8)  # 1 Gbit/s
    name, predicted = choose_codec(slow, 4096, torch.float16, tokens=512, device_kind="cuda")
    raw = 512 * 4096 * 2
    assert predicted["raw"] == pytest.approx(slow.transfer_s(raw))
    enc = codecs.get("int8").encoded_nbytes((1, 512, 4096), torch.float16)
    assert predicted["int8"] == pytest.approx(slow.transfer_s(enc) + 3 * raw / 1e12)
    assert name == "int8"
    fast = LinkProfile(5e-6, 1e12)  # a link faster than the codec's passes over memory
    assert choose_codec(fast, 4096, torch.float16, device_kind="cuda")[0] == "raw"


def test_async_tasks_run_concurrently(model3):
    import asyncio

    async def main():
        return await asyncio.gather(*(model3.agenerate(p, max_tokens=12) for p in PROMPTS))

    results = asyncio.run(main())
    assert [r.token_ids for r in results] == [model3.generate(p, max_tokens=12).token_ids for p in PROMPTS]


def test_profiled_partitioner_plans_real_workers(cluster3, hf_greedy):
    with AutoDistributedModel.from_pretrained(
        None,
        workers=cluster3.addresses,
        partitioner="dp",
        objective="throughput",
        concurrency=3,
        progress=False,
    ) as m:
        assert m.plan.partitioner == "dp"
        spans = [s.span for s in m.plan.stages]
        assert spans[0].start == 0 and spans[-1].end == 5
        assert all(a.end == b.start for a, b in itertools.pairwise(spans))
        assert all(s.predicted_s > 0 for s in m.plan.stages) and m.plan.predicted_tokens_per_s > 0
        assert m.generate(PROMPTS[0], max_tokens=16).token_ids == hf_greedy(PROMPTS[0], 16)
    with pytest.raises(ValueError, match="valid names"):
        AutoDistributedModel.from_pretrained(
            None, workers=cluster3.addresses, partitioner="magic", progress=False
        )


def test_server_side_token_loop_equals_client_loop(model3, local_pipe, monkeypatch):
    """The workers' token loop (last stage feeds the first) gives the client loop's tokens for a
    padded batch whose rows stop at different steps: EOS (retired on the ring), a stop string
    (ignored on the ring, cut here), length; greedy and seeded sampling. The client sends only the
    prompt step; a later session is unaffected by the previous one's leftover steps."""
    import dataclasses

    from hyperlane_lab.runtime import client as client_mod

    probe = local_pipe.generate(PROMPTS[1], max_tokens=12).token_ids
    eos = probe[7]  # a token row 1 samples at step 7: EOS for this test
    spec = dataclasses.replace(model3.spec, eos_token_ids=(eos,))
    monkeypatch.setattr(model3, "spec", spec)
    monkeypatch.setattr(local_pipe, "spec", spec)
    sent: list[int] = []
    real_step = client_mod._RemoteSession.step

    def counting_step(self, ids, positions):
        sent.append(self.step_no)
        return real_step(self, ids, positions)

    monkeypatch.setattr(client_mod._RemoteSession, "step", counting_step)
    cases = [
        dict(prompt=PROMPTS, max_tokens=20),
        dict(prompt=PROMPTS, max_tokens=20, stop=[" the "]),
        dict(prompt=PROMPTS[0], max_tokens=20, temperature=0.9, top_k=40, top_p=0.95, seed=7),
        dict(prompt=PROMPTS[2], max_tokens=1),
    ]
    for c in cases:
        sent.clear()
        assert model3.server_loop
        ring = model3.generate(**c)
        assert sent == [0]  # only the prompt step went out from the client
        model3.server_loop = False
        try:
            relay = model3.generate(**c)
        finally:
            model3.server_loop = True
        local = local_pipe.generate(**c)

        def as_list(r):
            return r if isinstance(r, list) else [r]

        for got in (as_list(ring), as_list(relay)):
            assert [r.token_ids for r in got] == [r.token_ids for r in as_list(local)]
            assert [r.finish_reason for r in got] == [r.finish_reason for r in as_list(local)]
    reasons = {r.finish_reason for r in model3.generate(PROMPTS, max_tokens=20)}
    assert "eos" in reasons and "length" in reasons


@pytest.fixture
def sent_chunks(monkeypatch) -> list[int]:
    """Widths of the leading prompt chunks the client sends (``ClientDataPlane.send_chunk``)."""
    from hyperlane_lab.runtime.client_dataplane import ClientDataPlane

    sent: list[int] = []
    real = ClientDataPlane.send_chunk

    def counting(self, sid, step, ids, positions):
        sent.append(ids.shape[1])
        return real(self, sid, step, ids, positions)

    monkeypatch.setattr(ClientDataPlane, "send_chunk", counting)
    return sent


def test_chunked_prompt_equals_the_whole_prompt(model3, local_pipe, sent_chunks):
    """``prefill_chunk``: the prompt goes down the pipeline in chunks (FLAG_MORE frames, no reply),
    each row's last token in the last chunk; the tokens equal the in-process pipeline's, with the
    workers' token loop and with the client relaying; no TOKENS frame answers a chunk."""
    sent = sent_chunks
    widest = max(len(local_pipe.encode(p)) for p in PROMPTS)
    want = [r.token_ids for r in local_pipe.generate(PROMPTS, max_tokens=12)]
    try:
        for chunk, ring in ((2, True), (3, True), (3, False), (widest - 1, True)):
            model3.prefill_chunk, model3.server_loop = chunk, ring
            sent.clear()
            model3.trace_events()  # drain
            got = model3.generate(PROMPTS, max_tokens=12)
            assert [r.token_ids for r in got] == want, (chunk, ring)
            n_chunks = -(-widest // chunk)
            assert sent == [chunk] * (n_chunks - 1), (chunk, sent)
            # every chunk was computed on the last stage, and only the last one was sampled
            last = [e for e in model3.trace_events() if e.stage == 2 and e.step == 0]
            assert sum(e.kind.value == "compute" for e in last) == n_chunks, (chunk, ring)
            assert sum(e.kind.value == "sample" for e in last) == 1, (chunk, ring)
        model3.prefill_chunk = widest  # not longer than one chunk: one frame, as without chunking
        sent.clear()
        assert [r.token_ids for r in model3.generate(PROMPTS, max_tokens=12)] == want and sent == []
    finally:
        model3.prefill_chunk, model3.server_loop = "auto", True
    for bad in (1, "big", 2.5, True):
        with pytest.raises(ValueError, match="prefill_chunk must be None, 'auto' or an int >= 2"):
            model3.prefill_chunk = bad


def test_auto_prefill_chunk_rule():
    from hyperlane_lab.runtime.client import auto_prefill_chunk

    assert auto_prefill_chunk(4096, 1) is None  # one stage: nothing to overlap
    assert [auto_prefill_chunk(n, 2) for n in (100, 511)] == [None, None]  # short: one frame
    assert [auto_prefill_chunk(n, 2) for n in (512, 600, 1024, 2048, 2100, 4096, 10_000)] == [
        256, 256, 256, 512, 576, 1024, 1024,
    ]  # fmt: skip
    for n in range(512, 9000, 37):  # at least two chunks, about four up to the cap
        c = auto_prefill_chunk(n, 4)
        assert c is not None and c % 64 == 0 and 256 <= c <= 1024 and c < n
        assert -(-n // c) >= 2 and (c == 1024 or -(-n // c) <= 4)


def test_auto_prefill_chunk_sends_long_unpadded_prompts_in_chunks(
    model3, local_pipe, sent_chunks, monkeypatch
):
    """The default ``prefill_chunk="auto"`` chunks a long prompt (lengths scaled down here: the
    bundled model's context is short) and gives the same tokens; a padded batch goes whole."""
    from hyperlane_lab.runtime import client

    sent = sent_chunks
    for name, value in (("AUTO_CHUNK_MIN", 4), ("AUTO_CHUNK_MAX", 16), ("AUTO_CHUNK_ALIGN", 2)):
        monkeypatch.setattr(client, name, value)
    assert model3.prefill_chunk == "auto"
    prompt = PROMPTS[2]
    n = len(local_pipe.encode(prompt))
    want = local_pipe.generate(prompt, max_tokens=8).token_ids
    assert model3.generate(prompt, max_tokens=8).token_ids == want
    chunk = client.auto_prefill_chunk(n, 3)
    assert chunk is not None and chunk < n  # so the prompt went in chunks
    assert len(sent) >= 2 and sent == [chunk] * (-(-n // chunk) - 1)
    sent.clear()
    got = model3.generate(PROMPTS, max_tokens=8)  # rows of different lengths: padded, one frame
    assert [r.token_ids for r in got] == [r.token_ids for r in local_pipe.generate(PROMPTS, max_tokens=8)]
    assert sent == []


def test_an_error_on_a_prompt_chunk_reaches_the_client(model3, monkeypatch):
    """A chunk that a stage rejects fails the step at once (not after ``step_timeout``): a prompt
    past the session's max length, and a bad early chunk whose error comes back while later chunks
    are still being sent (the step's last chunk is fine, so only that error says anything)."""
    from hyperlane_lab.runtime.client_dataplane import ClientDataPlane
    from hyperlane_lab.types import SamplingParams

    real = ClientDataPlane.send_chunk

    def slow(self, sid, step, ids, positions):
        real(self, sid, step, ids, positions)
        time.sleep(0.2)  # the first chunk's error frame arrives before the last chunk goes out

    monkeypatch.setattr(ClientDataPlane, "send_chunk", slow)
    monkeypatch.setattr(model3, "step_timeout", 30.0)
    model3.prefill_chunk = 4
    try:
        for max_new in (0, 4):  # the client relays / the workers run the token loop
            ids = torch.randint(0, 100, (2, 12))
            positions = torch.arange(12).expand(2, 12).contiguous()
            t0 = time.perf_counter()
            with (
                pytest.raises(RuntimeError, match=r"beyond session .* max length 8"),
                model3.runner.open_session(2, 8, SamplingParams(), max_new_tokens=max_new) as s,
            ):
                s.step(ids, positions)
            bad = ids.clone()
            bad[0, 1] = model3.spec.vocab_size  # only the first chunk is bad
            model3.trace_events()  # drain
            with (
                pytest.raises(RuntimeError, match="token ids must be in"),
                model3.runner.open_session(2, 16, SamplingParams(), max_new_tokens=max_new) as s,
            ):
                sid = s.sid
                s.step(bad, positions)
            assert time.perf_counter() - t0 < 20
            # the failed session's later chunks were dropped by the first stage: nothing computed
            ev = [e for e in model3.trace_events() if e.session == sid]
            assert ev and not [e for e in ev if e.kind.value == "compute"], ev
    finally:
        model3.prefill_chunk = None
    assert model3.generate(PROMPTS[0], max_tokens=4).token_ids  # the workers still serve


def test_right_align_keeps_each_rows_tokens_in_order():
    from hyperlane_lab.runtime.client import right_align

    ids = torch.tensor([[5, 6, 7, 0, 0], [1, 2, 3, 4, 9], [0, 0, 0, 0, 0]])
    pos = torch.tensor([[0, 1, 2, -1, -1], [0, 1, 2, 3, 4], [-1, -1, -1, -1, -1]])
    a, p = right_align(ids, pos)
    assert a.tolist() == [[0, 0, 5, 6, 7], [1, 2, 3, 4, 9], [0, 0, 0, 0, 0]]
    assert p.tolist() == [[-1, -1, 0, 1, 2], [0, 1, 2, 3, 4], [-1, -1, -1, -1, -1]]


def test_ring_stops_on_eos_by_itself(model3, local_pipe, monkeypatch):
    """With every row retired by EOS the last stage stops feeding the first: no step after the
    EOS step is computed anywhere (the ring frame would go out before the client even saw EOS)."""
    import dataclasses

    ids = local_pipe.generate(PROMPTS[0], max_tokens=12).token_ids
    eos = ids[4]  # sampled at step 4 (the prompt step is step 0)
    assert eos not in ids[:4]
    monkeypatch.setattr(model3, "spec", dataclasses.replace(model3.spec, eos_token_ids=(eos,)))
    model3.trace_events()  # drain
    res = model3.generate(PROMPTS[0], max_tokens=12)
    assert res.finish_reason == "eos" and res.token_ids == ids[:4]
    time.sleep(0.3)  # let any stray step land in the traces
    steps = {e.step for e in model3.trace_events() if e.kind.value == "compute"}
    assert max(steps) == 4, steps


def test_ring_request_validation(cluster3, model3):
    first = WorkerClient(cluster3.addresses[0])  # stage 0 of model3's pipeline
    last = WorkerClient(cluster3.addresses[-1])
    base = dict(batch=1, max_len=8, reply_to=model3._data.reply_address)
    with pytest.raises(Exception, match="max_new_tokens"):
        last.call("OpenSession", pb.OpenSessionRequest(session_id="ab" * 16, ring_to="127.0.0.1:2", **base))
    with pytest.raises(Exception, match="max_new_tokens <= max_len"):
        last.call(
            "OpenSession",
            pb.OpenSessionRequest(session_id="ab" * 16, ring_to="127.0.0.1:2", max_new_tokens=9, **base),
        )
    with pytest.raises(Exception, match="host:port"):
        last.call(
            "OpenSession",
            pb.OpenSessionRequest(session_id="cd" * 16, ring_to="nowhere", max_new_tokens=4, **base),
        )
    with pytest.raises(Exception, match="only the last stage"):
        first.call(
            "OpenSession",
            pb.OpenSessionRequest(session_id="ef" * 16, ring_to="127.0.0.1:2", max_new_tokens=4, **base),
        )
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))
    port = dead.getsockname()[1]
    dead.close()  # nothing listens there
    with pytest.raises(Exception, match="cannot open a data connection"):
        last.call(
            "OpenSession",
            pb.OpenSessionRequest(
                session_id="12" * 16, ring_to=f"127.0.0.1:{port}", max_new_tokens=4, **base
            ),
        )
    assert model3.generate(PROMPTS[0], max_tokens=4).token_ids  # the workers still serve


def test_ring_client_raises_a_failure_that_came_while_nobody_waited():
    from hyperlane_lab.runtime.client_dataplane import ClientDataPlane

    dp = ClientDataPlane("127.0.0.1:1", "127.0.0.1")  # not started: only its bookkeeping is used
    dp.open_ring("s1")
    dp.fail_session("s1", RuntimeError("pipeline error: stage 1: boom"))
    with pytest.raises(RuntimeError, match="boom"):
        dp.expect("s1", 3, timeout=5)
    dp.end_session("s1")
    with pytest.raises(TimeoutError):  # forgotten after the close: an unknown session just waits
        dp.expect("s1", 3, timeout=0.05)


def test_socket_sender_gives_up_on_a_peer_that_stops_reading():
    """A peer that accepts but never reads: once the kernel's buffers are full the send fails within
    its timeout (blocking socket, SO_SNDTIMEO) with an error that says why, and the sender is closed."""
    from hyperlane_lab.runtime.sender import SocketSender

    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(1)
    sender = SocketSender(f"127.0.0.1:{ls.getsockname()[1]}", send_timeout=0.3)
    peer, _ = ls.accept()
    body = bytes(1 << 20)
    header = FrameHeader(FrameKind.PING, "ab" * 16, 0, 0, 0, torch.uint8, 0, 0, (), len(body))
    t0 = time.monotonic()
    with pytest.raises(ConnectionError, match="stopped reading"):
        for _ in range(256):  # at most 256 MB: far beyond any loopback socket buffer
            sender.send(header, body)
    assert time.monotonic() - t0 < 30
    assert not sender.is_open
    with pytest.raises(ConnectionError, match="closed"):
        sender.send(header, b"abc")
    peer.close()
    ls.close()


def test_socket_sender_notices_a_closed_peer():
    from hyperlane_lab.runtime.sender import SocketSender

    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(1)
    sender = SocketSender(f"127.0.0.1:{ls.getsockname()[1]}")
    peer, _ = ls.accept()
    header = FrameHeader(FrameKind.PING, "ab" * 16, 0, 0, 0, torch.uint8, 0, 0, (), 3)
    assert sender.is_open and sender.send(header, b"abc") > 3
    peer.close()
    ls.close()
    deadline = time.monotonic() + 5
    while sender.is_open and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not sender.is_open
    sender.close()
    with pytest.raises(ConnectionError, match="closed"):
        sender.send(header, b"abc")


def test_token_loop_one_row_rule_equals_the_numpy_rule():
    """``ring_frame``'s batch-1 path (Python ints) gives what the numpy rule gives for every kind of row:
    a decode position, a prompt's positions, padding, EOS or not, an empty or absent EOS set; the numpy
    rule itself checked by hand on a 3-row batch."""
    from hyperlane_lab.runtime.outbox import ring_frame, ring_frame_rows

    rng = np.random.default_rng(11)
    cases = 0
    for seq in (1, 2, 7, 512):
        for _ in range(40):
            pos = np.arange(seq, dtype=np.int64) + int(rng.integers(0, 4000))
            if rng.random() < 0.2:
                pos[:] = -1  # a padding row
            elif rng.random() < 0.2:
                pos[: int(rng.integers(0, seq))] = -1  # left padding
            ids = rng.integers(0, 50, size=1).astype(np.int64)
            eos = rng.choice([None, set(), {int(ids[0])}, {int(ids[0]) + 1, 3}])
            got, want = ring_frame(1, pos.tobytes(), ids, eos), ring_frame_rows(1, pos.tobytes(), ids, eos)
            assert got == want, (pos, ids, eos)
            cases += want is not None
    assert cases > 50  # most cases go on to a next step
    pos = np.array([[5, 6], [-1, -1], [2, 9]], dtype=np.int64)
    ids = np.array([4, 8, 2], dtype=np.int64)
    top, pos_out, ids_out = ring_frame(3, pos.tobytes(), ids, {2})
    assert top == 7 and np.frombuffer(pos_out, dtype=np.int64).tolist() == [7, -1, -1]
    assert np.frombuffer(ids_out, dtype=np.int64).tolist() == [4, 8, 2]
    assert ring_frame(3, pos.tobytes(), ids, {4, 2}) is None


def test_the_token_loops_last_step_is_flagged_so_no_stage_arms_after_it(tmp_path):
    """The last stage feeds step k + 1 to the first stage while k + 1 is within the session's budget; the
    frame of the budget's last step carries ``FLAG_LAST`` (the stages pass it on and arm nothing after
    it, ``ArmedSteps._maybe_arm``) when every stage takes the flag, the ones before it carry no flag, and
    past the budget nothing is sent."""
    from hyperlane_lab.runtime.frame import FLAG_LAST
    from hyperlane_lab.runtime.worker import Worker, WorkerConfig, _Session

    w = Worker(WorkerConfig(device="cpu", cache_dir=str(tmp_path)))
    sent: list = []
    w._send = lambda address, header, parts, sid, step: sent.append((address, header)) or ""  # type: ignore[method-assign]
    sid = uuid.uuid4().hex
    for flag_last in (True, False):  # False: a stage before this one is older and would refuse the flag
        sess = _Session(1, 64, None, "client:1", ring=("first:1", 4, frozenset({2})), flag_last=flag_last)
        sent.clear()
        goes_on = [w.ring_next(sess, sid, k, np.array([7]), np.array([10 + k]).tobytes()) for k in range(4)]
        assert goes_on == [True, True, True, False]  # a budget of 4 steps: 0 (the prompt) .. 3
        last = FLAG_LAST if flag_last else 0
        assert [(a, h.step, h.flags) for a, h in sent] == [
            ("first:1", 1, 0),
            ("first:1", 2, 0),
            ("first:1", 3, last),
        ]
    sent.clear()
    assert not w.ring_next(sess, sid, 1, np.array([2]), np.array([11]).tobytes())  # EOS: no next step
    assert not sent


@pytest.mark.parametrize("old_stage", [None, 0, 1, 2])
def test_the_client_asks_for_flagged_last_steps_only_when_every_stage_takes_the_flag(old_stage):
    """OpenSession: each worker's reply says whether it takes frames flagged LAST; the last stage, opened last,
    is asked to flag the token loop's last step only if every stage before it said so (an older worker
    refuses unknown flags and would drop the connection). An older last stage ignores the request field."""
    from types import SimpleNamespace

    from hyperlane_lab.generation.sampling import SamplingParams
    from hyperlane_lab.runtime.client import _RemoteRunner
    from hyperlane_lab.runtime.proto_gen import hyperlane_pb2 as pb

    requests: list = []

    class Client:
        def __init__(self, i: int) -> None:
            self.i = i

        def call(self, method: str, req: object) -> object:
            if method == "OpenSession":
                requests.append(req)
                return pb.OpenSessionReply(
                    ring=self.i == 2, prompt_chunks=True, flag_last=self.i != old_stage
                )
            return pb.CloseSessionReply()

    class Data:
        reply_address, first_stage = "client:1", "first:1"

        def open_ring(self, sid: str) -> None:
            pass

        def end_session(self, sid: str) -> None:
            pass

    model = SimpleNamespace(
        clients=[Client(i) for i in range(3)], server_loop=True, _data=Data(),
        spec=SimpleNamespace(eos_token_ids=(2,)),
    )  # fmt: skip
    with _RemoteRunner(model).open_session(1, 64, SamplingParams(), max_new_tokens=8) as s:  # type: ignore[arg-type]
        assert s.ring
    assert [r.ring_to for r in requests] == ["", "", "first:1"]
    assert requests[2].ring_flag_last == (old_stage is None or old_stage == 2)
