"""Where a 1-GPU prompt step's wall time goes (issue 9): host enqueue vs GPU window vs the rest.

For a Llama-2-7B-shaped stage with random fp16 weights on one GPU, after warm-up, per prompt
length: ``generate(max_tokens=1)``'s prefill time; one ``forward`` + sync; the time ``forward``
takes to return (host enqueue) and the GPU window between CUDA events around it; forwards back to
back; the same for the first and the second half of the layers (a 2-stage split's stages); and a
cProfile of one ``generate`` (top host functions). JSON to $OUT/prefill_probe.json (or --out).

    PYTHONPATH=$PWD python3 bench/prefill_probe.py --lengths 512,2048
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import statistics
import time
import uuid
from pathlib import Path
from typing import Any

import torch

from hyperlane_lab.generation.pipeline import InProcessPipeline
from hyperlane_lab.models.config import ModelSpec
from hyperlane_lab.models.stage import TorchStage
from hyperlane_lab.types import LayerSpan


def forward_times(stage: TorchStage, ids: torch.Tensor, reps: int) -> dict[str, float]:
    """Per rep: host time until ``forward`` returns, GPU window (events), wall to sync."""
    n = ids.shape[1]
    pos = torch.arange(n)[None]
    x = ids if stage.is_first else torch.randn(1, n, stage.spec.hidden_size, dtype=stage.dtype)
    host, gpu, wall = [], [], []
    for r in range(reps + 1):
        sid = uuid.uuid4().hex
        stage.open_session(sid, 1, n + 1)
        torch.cuda.synchronize()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0 = time.perf_counter()
        a.record()
        stage.forward(sid, x, pos)
        b.record()
        t1 = time.perf_counter()
        b.synchronize()
        t2 = time.perf_counter()
        stage.close_session(sid)
        if r:  # the first is a warm-up
            host.append(t1 - t0)
            wall.append(t2 - t0)
            gpu.append(a.elapsed_time(b) / 1e3)
    sids = [uuid.uuid4().hex for _ in range(reps)]
    for sid in sids:
        stage.open_session(sid, 1, n + 1)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for sid in sids:
        stage.forward(sid, x, pos)
    torch.cuda.synchronize()
    b2b = (time.perf_counter() - t0) / reps
    for sid in sids:
        stage.close_session(sid)
    med = statistics.median
    return {"host_enqueue_s": med(host), "gpu_window_s": med(gpu), "wall_s": med(wall), "back_to_back_s": b2b}


def prompt_host_split(stage: TorchStage, n: int, reps: int) -> dict[str, float]:
    """Host time of each piece of a prompt-graph step (``PromptGraphs.run``) for a hidden-state
    input already on the device (as a worker stages it), the GPU drained between pieces: copy
    into the graph's input, replay, the K/V copy into the session cache, the output clone; and
    a worker's staging of the input (``CudaStager.to_device`` from pinned memory), and the whole
    ``forward``."""
    x = torch.randn(1, n, stage.spec.hidden_size, dtype=stage.dtype, device=stage.device)
    if stage.is_first:
        x = torch.randint(3, stage.spec.vocab_size, (1, n), device=stage.device)
    sid = uuid.uuid4().hex
    stage.open_session(sid, 1, n + 1)
    stage.forward(sid, x, torch.arange(n)[None])  # captures the bucket's graph
    with torch.inference_mode():
        return _host_split(stage, sid, x, n, reps)


def _host_split(stage: TorchStage, sid: str, x: torch.Tensor, n: int, reps: int) -> dict[str, float]:
    from hyperlane_lab.models.prompt_graphs import prompt_bucket
    from hyperlane_lab.models.sessions import copy_slots
    from hyperlane_lab.runtime.wire import CudaStager

    pg = stage.graph_decoder().prompt_graphs()
    bucket = prompt_bucket(n, pg.max_tokens)
    g = pg._graphs[(1, bucket, 0)]
    scratch = pg._scratch[1]
    cache = stage.session(sid)
    parts: dict[str, list[float]] = {
        name: [] for name in ("input_copy", "replay", "kv_copy", "clone", "stage_in", "forward")
    }
    stager = CudaStager(stage.device)
    host_x = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
    pos = torch.arange(n)[None]

    def timed(name: str, fn: Any) -> None:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        parts[name].append(time.perf_counter() - t0)

    for _ in range(reps + 1):
        timed("input_copy", lambda: g.x_in[:, :n].copy_(x))
        timed("replay", g.graph.replay)
        timed("kv_copy", lambda: copy_slots(cache, scratch, 0, n))
        timed("clone", lambda: g.out.clone() if stage.is_last else g.out[:, :n].clone())
        timed("stage_in", lambda: stager.to_device(host_x))
        timed("forward", lambda: stage.forward(sid, x, pos))
    torch.cuda.synchronize()
    stage.close_session(sid)
    return {f"{name}_host_s": statistics.median(ts[1:]) for name, ts in parts.items()}


def explain_layer(stage: TorchStage, n: int) -> dict[str, Any]:
    """torch._dynamo.explain of one prompt layer on this device: graphs and graph-break reasons."""
    import torch._dynamo as dyn

    from hyperlane_lab.models.layers import decoder_layer

    sid = uuid.uuid4().hex
    stage.open_session(sid, 1, n + 1)
    cache = stage.session(sid)
    pos = torch.arange(n, device=stage.device)[None]
    cos_t, sin_t = stage._rope_for(n + 1)
    cos, sin = cos_t[pos].to(stage.dtype)[:, None], sin_t[pos].to(stage.dtype)[:, None]
    x = torch.randn(1, n, stage.spec.hidden_size, dtype=stage.dtype, device=stage.device)
    lw = stage.weights.layers[0]
    ex = dyn.explain(decoder_layer)(x, lw, stage.spec, cos, sin, cache.k[0], cache.v[0], pos, None, True)
    stage.close_session(sid)
    return {
        "graphs": ex.graph_count,
        "breaks": ex.graph_break_count,
        "reasons": [
            f"{b.reason[:400]} @ {b.user_stack[-1] if b.user_stack else ''}" for b in ex.break_reasons
        ],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="512,2048")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default=None)
    ap.add_argument("--explain", type=int, default=1, help="print the prompt layer's graph breaks first")
    args = ap.parse_args()
    spec = ModelSpec.preset("llama-2-7b")
    half = spec.n_layers // 2
    full = TorchStage.random(spec, LayerSpan(0, spec.n_layers), dtype=torch.float16, device="cuda:0")
    pipe = InProcessPipeline([full], None, spec)
    res: dict[str, Any] = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__}
    if args.explain:
        res["explain"] = explain_layer(full, 512)
        print("explain:", json.dumps(res["explain"], indent=1), flush=True)
    g = torch.Generator().manual_seed(0)
    for n in [int(s) for s in args.lengths.split(",")]:
        ids = torch.randint(3, spec.vocab_size, (1, n), generator=g)
        r: dict[str, Any] = {}
        for _ in range(2):
            pipe.generate(ids[0].tolist(), max_tokens=1)
        r["generate_prefill_s"] = statistics.median(
            pipe.generate(ids[0].tolist(), max_tokens=1).timings.prefill_s for _ in range(args.reps)
        )
        r["full"] = forward_times(full, ids, args.reps)
        prof = cProfile.Profile()
        prof.enable()
        pipe.generate(ids[0].tolist(), max_tokens=1)
        prof.disable()
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(25)
        r["cprofile_tottime"] = s.getvalue().splitlines()[:45]
        res[str(n)] = r
        print(n, json.dumps({k: v for k, v in r.items() if k != "cprofile_tottime"}), flush=True)
    full.graph_decoder().configure(False)  # the prompt layers eager (no torch.compile)
    for n in [int(s) for s in args.lengths.split(",")]:
        ids = torch.randint(3, spec.vocab_size, (1, n), generator=g)
        res[str(n)]["full_eager"] = forward_times(full, ids, args.reps)
        print(n, "full_eager", json.dumps(res[str(n)]["full_eager"]), flush=True)
    del pipe, full
    torch.cuda.empty_cache()
    for name, span in (("first_half", LayerSpan(0, half)), ("second_half", LayerSpan(half, spec.n_layers))):
        st = TorchStage.random(spec, span, dtype=torch.float16, device="cuda:0")
        for n in [int(s) for s in args.lengths.split(",")]:
            ids = torch.randint(3, spec.vocab_size, (1, n), generator=g)
            res[str(n)][name] = forward_times(st, ids, args.reps)
            if n <= st.graph_decoder().prompt_graphs().max_tokens:
                res[str(n)][name]["host_split"] = prompt_host_split(st, n, args.reps)
            print(n, name, json.dumps(res[str(n)][name]), flush=True)
        del st
        torch.cuda.empty_cache()
    out = Path(args.out or Path(os.environ.get("OUT", "bench/out")) / "prefill_probe.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1))
    for n in args.lengths.split(","):
        print("\n".join(res[n]["cprofile_tottime"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
