"""Parts of bench/gpu_pipeline.py: transformers baselines, split runs over worker processes, 70B.

Trace times: workers on one host share CLOCK_MONOTONIC (``time.perf_counter``), so the raw worker
times are read straight from GetTrace (no clock-offset estimate, whose error would be larger than
the hop times being measured).
"""

from __future__ import annotations

import argparse
import contextlib
import re
import shlex
import socket
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from hyperlane_lab.types import EventKind, TraceEvent

med = statistics.median
CUDA = torch.cuda.is_available()


def _main() -> Any:
    return sys.modules.get("__main__")


def _save() -> None:
    for f in getattr(_main(), "SAVE", []):
        f()


# ---------------------------------------------------------------------- transformers baseline


def part_hf(args: argparse.Namespace, res: dict[str, Any]) -> dict[str, Any]:
    from transformers import LlamaConfig, LlamaForCausalLM

    m = _main()
    spec = m.spec_for(args.model)
    cfg = LlamaConfig(
        vocab_size=spec.vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.n_layers,
        num_attention_heads=spec.n_heads,
        num_key_value_heads=spec.n_kv_heads,
        head_dim=spec.head_dim,
        rms_norm_eps=spec.rms_eps,
        max_position_embeddings=4096,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    dev = "cuda:0" if CUDA else "cpu"
    dtype = torch.float16 if CUDA else torch.float32
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(dev):
            model = LlamaForCausalLM(cfg).eval()
    finally:
        torch.set_default_dtype(old)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02) if p.dim() > 1 else p.fill_(1.0)
    out: dict[str, Any] = {
        "attn_implementation": str(getattr(model.config, "_attn_implementation", "?")),
        "transformers": __import__("transformers").__version__,
    }
    ids = torch.tensor([m.prompt_ids(32, spec.vocab_size)], device=dev)
    n = min(args.decode_tokens, 64)

    def gen(k: int) -> float:
        m.sync()
        t0 = time.perf_counter()
        with torch.no_grad():
            model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=k,
                min_new_tokens=k,
                do_sample=False,
                pad_token_id=0,
            )
        m.sync()
        return time.perf_counter() - t0

    gen(n)
    t1 = med([gen(1) for _ in range(args.reps)])
    tn = med([gen(n) for _ in range(args.reps)])
    out["decode_generate"] = {"tok_s": (n - 1) / (tn - t1), "new_tokens": n, "t1_s": t1, "tn_s": tn}

    def loop(k: int) -> float:
        with torch.no_grad():
            o = model(ids, use_cache=True)
            past, tok = o.past_key_values, o.logits[:, -1:].argmax(-1)
            m.sync()
            t0 = time.perf_counter()
            for _ in range(k):
                o = model(tok, past_key_values=past, use_cache=True)
                past, tok = o.past_key_values, o.logits[:, -1:].argmax(-1)
                int(tok)  # the token leaves the GPU every step, as in a generation loop
            return (time.perf_counter() - t0) / k

    loop(4)
    out["decode_forward_loop"] = {"tok_s": 1 / med([loop(n) for _ in range(args.reps)])}
    for s in args.prefill:
        x = torch.tensor([m.prompt_ids(s, spec.vocab_size, seed=s)], device=dev)

        def fwd(x: torch.Tensor = x) -> float:
            m.sync()
            t0 = time.perf_counter()
            with torch.no_grad():
                try:
                    model(x, use_cache=True, logits_to_keep=1)
                except TypeError:
                    model(x, use_cache=True)
            m.sync()
            return time.perf_counter() - t0

        fwd()
        out[f"prefill_{s}"] = {"tok_s": s / med([fwd() for _ in range(args.reps)])}
        print(f"  hf prefill {s}: {out[f'prefill_{s}']['tok_s']:.0f}", flush=True)
    print(
        f"  hf decode: generate {out['decode_generate']['tok_s']:.1f}, loop {out['decode_forward_loop']['tok_s']:.1f}"
    )
    model = None  # free it before the next part
    if CUDA:
        torch.cuda.empty_cache()
    return out


# ---------------------------------------------------------------------- traces


def fetch_events(model: Any) -> list[TraceEvent]:
    """Every stage's events since the last fetch (cleared on the workers), raw worker times."""
    from hyperlane_lab.runtime.proto_gen import hyperlane_pb2 as pb

    events = []
    for i, c in enumerate(model.clients):
        reply = c.call("GetTrace", pb.GetTraceRequest(since_seq=0, clear=True))
        for r in reply.events:
            events.append(
                TraceEvent(
                    stage=i,
                    kind=EventKind(r.kind),
                    start=r.start,
                    end=r.end,
                    session=r.session,
                    step=r.step,
                    nbytes=r.nbytes,
                    tokens=r.tokens,
                )
            )
    return events


def per_stage_compute(events: list[TraceEvent], p: int, decode: bool = True) -> list[float]:
    """Median compute time per stage for decode (step >= 1) or prefill (step 0) steps."""
    out = []
    for i in range(p):
        ts = [
            e.end - e.start
            for e in events
            if e.kind == EventKind.COMPUTE and e.stage == i and (e.step >= 1) == decode
        ]
        out.append(med(ts) if ts else 0.0)
    return out


def stage_gaps(events: list[TraceEvent], p: int) -> list[float]:
    """Median time from stage i's compute end to stage i+1's compute start, same (session, step)."""
    comp = {(e.stage, e.session, e.step): e for e in events if e.kind == EventKind.COMPUTE and e.step >= 1}
    gaps = []
    for i in range(p - 1):
        g = [
            comp[(i + 1, s, k)].start - e.end
            for (st, s, k), e in comp.items()
            if st == i and (i + 1, s, k) in comp
        ]
        gaps.append(med(g) if g else 0.0)
    return gaps


def hop_breakdown(events: list[TraceEvent], p: int, token_s: float, prefill: bool = False) -> dict[str, Any]:
    """Where a decode token's time goes, per segment (medians over decode steps, seconds); with
    ``prefill``, where a prompt step's time goes (step 0, medians over the prompts).

    Per stage i: ``dispatch`` = frame fully received -> GPU starts the step (hand-off, checks,
    staging, launch; inside it ``queue`` is the wait for the thread that runs it and ``launch`` the
    host's staging and enqueueing, which the GPU's start may overlap), ``compute`` = GPU time,
    ``complete`` = GPU done -> send begins (D2H,
    completion wake-up, argmax read, header), ``send`` = socket write. Between stages, ``wire`` =
    send done -> next stage has the whole frame. ``client`` = what is left of a token's time:
    the last stage's tokens reaching the client, the client's loop and its send to stage 0. A one-stage
    token loop handed over in memory has ``s0_handover`` = GPU done -> the next step's frame made instead.
    All stage clocks are this host's monotonic clock (one host), so differences are exact."""
    by: dict[tuple[str, int, int, str], TraceEvent] = {}
    for e in sorted(events, key=lambda e: e.start):
        if (e.step == 0) if prefill else (e.step >= 1):
            key = (e.kind.value, e.stage, hash(e.session), e.step)
            if e.kind.value == "send" and key in by:  # the last stage: its ring frame went first
                by[("ring", *key[1:])] = by[key]
            by[key] = e
    keys = {(k[1], k[2], k[3]) for k in by if k[0] == "compute"}

    def seg(name: str, fn: Any) -> None:
        vals = []
        for st, s, k in keys:
            with contextlib.suppress(KeyError):
                vals.append(fn(st, s, k))
        if vals:
            out[name] = med(vals)

    def dur(kind: str, i: int) -> Any:  # a segment that is one event's own duration
        return lambda st, s, k: by[(kind, i, s, k)].end - by[(kind, i, s, k)].start

    out: dict[str, Any] = {}
    for i in range(p):
        seg(
            f"s{i}_dispatch",
            lambda st, s, k, i=i: by[("compute", i, s, k)].start - by[("receive", i, s, k)].end,
        )
        seg(f"s{i}_queue", dur("queue", i))  # inside dispatch: waiting for the step's thread
        seg(f"s{i}_launch", dur("launch", i))  # host staging + enqueueing (overlaps the GPU's start)
        seg(f"s{i}_compute", dur("compute", i))
        seg(
            f"s{i}_complete", lambda st, s, k, i=i: by[("send", i, s, k)].start - by[("compute", i, s, k)].end
        )
        seg(f"s{i}_send", dur("send", i))
        if i == p - 1:  # inside s{i}_complete: wake-up -> ring frame ready, and the ring frame's send
            seg(f"s{i}_sample", dur("sample", i))
            seg(f"s{i}_ring_send", dur("ring", i))
        if i + 1 < p:
            seg(
                f"wire_{i}_{i + 1}",
                lambda st, s, k, i=i: by[("receive", i + 1, s, k)].end - by[("send", i, s, k)].end,
            )
    inside = {f"s{p - 1}_sample", f"s{p - 1}_ring_send"}  # already counted in s{p-1}_complete
    inside |= {f"s{i}_{k}" for i in range(p) for k in ("queue", "launch")}  # counted in s{i}_dispatch
    if p == 1 and not prefill and "s0_ring_send" not in out:
        # a worker's token loop to itself in memory (outbox.ring_here): the next step is handed over (its
        # "receive" ends) before the tokens' send, and its launch runs inside this step's "complete": the
        # token's path is compute -> handover -> the next step's dispatch; complete and send run beside it
        seg("s0_handover", lambda st, s, k: by[("receive", 0, s, k + 1)].end - by[("compute", 0, s, k)].end)
        if "s0_handover" in out:
            inside |= {"s0_complete", "s0_send"}
    out["client"] = token_s - sum(v for k, v in out.items() if k not in inside)
    return out


def _short_config(text: str) -> str:
    """``GemvConfig(block_n=16, block_k=256, num_warps=4, num_stages=4, split_k=1)`` -> ``16x256w4s4``
    (``kernels/gemv.config_name``'s form; + ``k<n>`` for split-K); other text as it is."""
    f = dict(re.findall(r"(\w+)=(\d+)", text))
    if not {"block_n", "block_k", "num_warps", "num_stages"} <= f.keys():
        return text
    split = f"k{f['split_k']}" if f.get("split_k", "1") != "1" else ""
    return f"{f['block_n']}x{f['block_k']}w{f['num_warps']}s{f['num_stages']}{split}"


def choice_summary(choices: dict[str, Any]) -> str:
    """One stage's decode kernel choices (its Health's ``decode_choices``) in a few words: the weight
    shapes on the Triton GEMV against all timed, the all-Triton layer, the PDL mode."""
    if not choices:
        return "none reported"
    shapes = [v for k, v in choices.items() if re.fullmatch(r"\d+x\d+", k) and isinstance(v, dict)]
    words = [f"triton GEMV {sum(bool(v.get('triton')) for v in shapes)}/{len(shapes)} shapes"]
    pinned = sum("pinned" in v for v in shapes)
    unmatched = len(choices.get("pins_unmatched", []))
    notes = [f"{pinned} pinned"] * bool(pinned) + [f"{unmatched} pins not in this stage"] * bool(unmatched)
    if notes:
        words[0] += f" ({', '.join(notes)})"
    layer = choices.get("triton_layer")
    if layer is not None:
        cfgs = (
            [f"{role} {_short_config(str(c))}" for role, c in layer.items()]
            if isinstance(layer, dict)
            else []
        )
        words.append("all-Triton layer" + (f" ({', '.join(cfgs)})" if cfgs else ""))
    tune = choices.get("triton_layer_tune")
    if isinstance(tune, dict) and "chosen" in tune:
        moved = [r for r, c in tune["chosen"].items() if c != tune.get("alone", {}).get(r)]
        words.append(f"tuned in the step ({len(tune.get('trials', []))} trials, {len(moved)} roles changed)")
    pdl = choices.get("triton_layer_pdl", choices.get("pdl", "off"))
    if pdl != "off":
        words.append(str(pdl))
    if "error" in choices:
        words.append(str(choices["error"]))
    return ", ".join(words)


def prompt_timeline(events: list[TraceEvent], p: int) -> dict[str, list[list[Any]]]:
    """The last prompt's events (step 0 of the session that started last) per stage, as
    [kind, start, end] in µs from its first event: where a chunked prompt's time goes."""
    ev = [e for e in events if e.step == 0]
    if not ev:
        return {}
    sid = max(ev, key=lambda e: e.start).session
    mine = sorted((e for e in ev if e.session == sid), key=lambda e: e.start)
    t0 = mine[0].start
    return {
        f"s{i}": [
            [e.kind.value, round((e.start - t0) * 1e6), round((e.end - t0) * 1e6)]
            for e in mine
            if e.stage == i
        ]
        for i in range(p)
    }


def window_stats(events: list[TraceEvent], p: int) -> dict[str, Any]:
    """Decode throughput and per-stage busy share while every session is decoding."""
    comp = [e for e in events if e.kind == EventKind.COMPUTE and e.step >= 1]
    sess = {e.session for e in comp}
    if not comp:
        return {}
    first = {s: min(e.start for e in comp if e.session == s and e.stage == 0) for s in sess}
    last = {s: max(e.end for e in comp if e.session == s and e.stage == p - 1) for s in sess}
    t0, t1 = max(first.values()), min(last.values())
    overlapped = t1 - t0 > 0.3 * (max(last.values()) - min(first.values()))
    if not overlapped:
        t0, t1 = min(first.values()), max(last.values())
    n = sum(1 for e in comp if e.stage == p - 1 and t0 <= e.end <= t1)
    busy = [
        sum(max(0.0, min(e.end, t1) - max(e.start, t0)) for e in comp if e.stage == i) / (t1 - t0)
        for i in range(p)
    ]
    return {
        "tok_s": n / (t1 - t0),
        "window_s": t1 - t0,
        "tokens": n,
        "all_overlapped": overlapped,
        "busy": busy,
        "bubble": [1 - b for b in busy],
    }


def simulate(
    decode_s: list[float], prefill_s: list[float], hop_s: float, m: int, steps: int
) -> dict[str, Any]:
    """The planning simulator with the measured m=1 stage times and hop time (analytic if absent)."""
    p = len(decode_s)
    try:
        from hyperlane_lab.planning.simulator import PipelineTimes
        from hyperlane_lab.planning.simulator import simulate as sim
    except ImportError:
        cycle = sum(decode_s) + (p + 1) * hop_s
        tput = min(m / cycle, 1 / max(decode_s))
        return {"tok_s": tput, "bubble": [1 - tput * d for d in decode_s], "source": "analytic"}
    z = (0.0,) * (p + 1)
    times = PipelineTimes(tuple(prefill_s), tuple(decode_s), (hop_s,) * (p + 1), z, z)
    r = sim(times, m, steps)
    w = window_stats(list(r.events), p)
    return {
        "tok_s": w.get("tok_s", r.summary.decode_tokens_per_s),
        "bubble": w.get("bubble"),
        "latency_per_token_s": r.summary.latency_per_token_s,
        "source": "planning.simulator",
    }


# ---------------------------------------------------------------------- raw socket baseline

_ECHO = r"""
import socket, sys
s = socket.socket(); s.bind(("127.0.0.1", 0)); s.listen(1)
print(s.getsockname()[1], flush=True)
c, _ = s.accept(); c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
n = int(sys.argv[1]); buf = bytearray(n); view = memoryview(buf)
while True:
    got = 0
    while got < n:
        r = c.recv_into(view[got:])
        if not r:
            sys.exit(0)
        got += r
    c.sendall(view)
"""


def raw_socket_rtt(nbytes: int, reps: int = 2000) -> float:
    """Median round trip of ``nbytes`` over loopback TCP between two processes (plain sockets)."""
    proc = subprocess.Popen([sys.executable, "-c", _ECHO, str(nbytes)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        payload, buf = bytes(nbytes), bytearray(nbytes)
        view, times = memoryview(buf), []
        for i in range(reps + 100):
            t0 = time.perf_counter()
            s.sendall(payload)
            got = 0
            while got < nbytes:
                got += s.recv_into(view[got:])
            if i >= 100:
                times.append(time.perf_counter() - t0)
        s.close()
        return med(times)
    finally:
        proc.kill()
        proc.wait()


# ---------------------------------------------------------------------- split runs


def _concurrent(model: Any, m: int, k: int, vocab: int) -> list[Any]:
    mm = _main()
    prompts = [mm.prompt_ids(32, vocab, seed=100 + i) for i in range(m)]
    barrier = threading.Barrier(m)

    def one(i: int) -> Any:
        barrier.wait()
        return model.generate(prompts[i], max_tokens=k)

    with ThreadPoolExecutor(m) as ex:
        return list(ex.map(one, range(m)))


def run_split(
    args: argparse.Namespace,
    model_name: str,
    p: int,
    ms: list[int],
    n_decode: int,
    prefill: list[int],
    bw: float,
    out: dict[str, Any],
    flags: list[str] | None = None,
) -> dict[str, Any]:
    """Fills ``out`` as it goes, so partial results survive a failure. ``flags``: extra worker flags."""
    from hyperlane_lab.runtime import AutoDistributedModel, LocalCluster

    mm = _main()
    spec = mm.spec_for(model_name)
    ngpu = torch.cuda.device_count() if CUDA else 0
    devices = [f"cuda:{i % ngpu}" for i in range(p)] if ngpu else ["cpu"] * p
    out.update({"model": model_name, "stages": p, "devices": devices})
    out["compression"] = getattr(args, "compression", "raw")
    t0 = time.perf_counter()
    extra = ["--cpu-latency-us", str(args.cpu_latency_us)] if args.cpu_latency_us is not None else []
    out["cpu_latency_us"] = args.cpu_latency_us
    env, variant_flags = split_env(flags or [])
    extra += variant_flags
    out["worker_flags"], out["worker_env"] = extra, env
    with LocalCluster(p, devices=devices, startup_timeout=180, extra_args=extra, env=env) as cl:
        out["armed"] = cl.armed  # armed decode steps (on by default with one GPU per worker)
        source = None if model_name == "bundled" else model_name
        with AutoDistributedModel.from_pretrained(
            source,
            workers=cl.addresses,
            random_weights=True,
            dtype="fp16" if CUDA else "fp32",
            compression=getattr(args, "compression", "raw"),
            progress=False,
        ) as model:
            out["load_s"] = time.perf_counter() - t0
            spans = [st.span for st in model.plan.stages]
            out["spans"] = [[s.start, s.end] for s in spans]
            itemsize = 2 if CUDA else 4
            read = [mm.stage_read_bytes(spec, s, itemsize) for s in spans]
            out["read_bytes_per_stage"] = read
            if bw:
                out["copy_bw"] = bw
                out["roofline_tok_s"] = bw / sum(read)  # batch 1: the stages run one after another
                out["roofline_throughput_tok_s"] = bw / max(read)  # every stage busy
            prompt = mm.prompt_ids(32, spec.vocab_size)
            model.generate(prompt, max_tokens=2)  # compiles; its events are dropped just below
            fetch_events(model)  # (a compiling prefill took seconds and skewed the stage times)
            out["decode"] = mm.gen_decode(model, prompt, n_decode, args.reps)
            ev = fetch_events(model)
            dec, pre = per_stage_compute(ev, p), per_stage_compute(ev, p, decode=False)
            step = 1 / out["decode"]["tok_s"]
            hop = max(0.0, (step - sum(dec)) / (p + 1))
            hidden_bytes = spec.hidden_size * itemsize
            rtt = raw_socket_rtt(64 + 8 + hidden_bytes)
            out["stage_decode_s"], out["stage_prefill32_s"] = dec, pre
            out["hops"] = {
                "per_hop_s": hop,
                "stage_to_stage_gap_s": stage_gaps(ev, p),
                "raw_rtt_s": rtt,
                "raw_one_way_s": rtt / 2,
                "excess_over_rtt_s": hop - rtt,
                "excess_over_one_way_s": hop - rtt / 2,
                "payload_bytes": 64 + 8 + hidden_bytes,
            }
            print(
                f"  p={p} decode {out['decode']['tok_s']:.1f} tok/s, stages {[round(d * 1e3, 3) for d in dec]} ms, "
                f"hop {hop * 1e6:.0f} us, raw rtt {rtt * 1e6:.0f} us",
                flush=True,
            )
            out["hops"]["breakdown_s"] = hop_breakdown(ev, p, step)
            print(
                "  where a token goes (us):",
                {k: round(v * 1e6) for k, v in out["hops"]["breakdown_s"].items()},
            )
            try:
                from hyperlane_lab.runtime.proto_gen import hyperlane_pb2 as pb

                health = [c.call("Health", pb.HealthRequest()) for c in model.clients]
                out["fast_path_steps"] = [int(h.fast_path_steps) for h in health]
                out["ring_here_steps"] = [int(h.ring_here_steps) for h in health]
                out["ring_chained_steps"] = [int(h.ring_chained_steps) for h in health]
                out["hop_warmups"] = [
                    [
                        int(h.hop_warmups),
                        int(h.warm_frames_in),
                        int(h.hop_warm_late),
                        round(h.hop_warm_wake_us),
                    ]
                    for h in health
                ]
                print(
                    "  hop warm-ups per stage (sent, received, late, recent lateness us):", out["hop_warmups"]
                )
                out["busy_poll"] = [[int(h.busy_poll_spun), int(h.busy_poll_blocked)] for h in health]
                out["armed_counts"] = [
                    [int(h.armed_fired), int(h.armed_released), int(h.armed_gave_up)] for h in health
                ]
                out["decode_choices"] = model.decode_choices()
                print("  decode kernels per stage:", [choice_summary(c) for c in out["decode_choices"]])
            except Exception as e:  # an older worker build
                out["fast_path_steps"] = str(e)[:200]
            out["sim_batch1"] = simulate(dec, pre, hop, 1, n_decode)
            _save()
            out["prefill"] = {}
            model.prefill_chunk = None  # the whole prompt in one frame; chunks below
            for s in prefill:  # each length's events on their own: where a prompt step's time goes
                fetch_events(model)
                r = out["prefill"][str(s)] = mm.gen_prefill(model, s, spec.vocab_size, args.reps)
                r["breakdown_s"] = hop_breakdown(fetch_events(model), p, r["prefill_s"], prefill=True)
                print(
                    f"  prefill {s}: {r['tok_s']:.0f} tok/s, runs {[round(t * 1e3, 1) for t in r['runs_s']]} ms;"
                    f" where it goes (us): { ({k: round(v * 1e6) for k, v in r['breakdown_s'].items()}) }",
                    flush=True,
                )
            for c in getattr(args, "prefill_chunk", None) or []:  # the prompt in chunks of c tokens
                model.prefill_chunk = c
                try:
                    for s in prefill:
                        fetch_events(model)
                        r = out.setdefault("prefill_chunked", {})[f"{s}/{c}"] = mm.gen_prefill(
                            model, s, spec.vocab_size, args.reps
                        )
                        r["timeline_us"] = prompt_timeline(fetch_events(model), p)
                        print(f"  prefill {s} in chunks of {c}: {r['tok_s']:.0f} tok/s; last prompt's events"
                              f" (kind, start, end us): {r['timeline_us']}", flush=True)  # fmt: skip
                finally:
                    model.prefill_chunk = "auto"
            with contextlib.suppress(Exception):  # prompt hand-offs split over connections (--stripes N)
                from hyperlane_lab.runtime.proto_gen import hyperlane_pb2 as pb

                health = [c.call("Health", pb.HealthRequest()) for c in model.clients]
                out["striped_in_out"] = [[int(h.striped_in), int(h.striped_out)] for h in health]
            fetch_events(model)
            k = max(16, n_decode // 2)
            if ms:  # capture a graph per pooled cache once, with the measured runs' lengths (a cache
                # and its graph are reused for sessions of the same pooled length)
                _concurrent(model, max(ms), k, spec.vocab_size)
            out["concurrency"] = {}
            for m in ms:
                fetch_events(model)
                t1 = time.perf_counter()
                try:
                    results = _concurrent(model, m, k, spec.vocab_size)
                except Exception as e:
                    out["concurrency"][str(m)] = {"error": f"{type(e).__name__}: {e}"[:400]}
                    print(f"  m={m}: {e}", flush=True)
                    continue
                wall = time.perf_counter() - t1
                ev = fetch_events(model)
                w = window_stats(ev, p)
                w["wall_tok_s"] = sum(len(r.token_ids) for r in results) / wall
                w["gpipe_bubble"] = (p - 1) / (m + p - 1)
                w["target_tok_s"] = 1 / max(dec)
                w["sim"] = simulate(dec, pre, hop, m, k)
                out["concurrency"][str(m)] = w
                _save()
                print(
                    f"  m={m}: {w.get('tok_s', 0):.1f} tok/s (target {w['target_tok_s']:.1f}), "
                    f"bubble {[round(b, 3) for b in w.get('bubble', [])]}",
                    flush=True,
                )
    return out


def worker_flags(args: argparse.Namespace, variant: str | None) -> list[str]:
    """The extra worker flags of ``--worker-variant NAME=FLAGS`` for NAME (none for None)."""
    if variant is None:
        return []
    found = worker_variants(getattr(args, "worker_variant", []))
    if variant not in found:
        raise ValueError(f"no --worker-variant named {variant!r}; given: {sorted(found) or 'none'}")
    return found[variant]


ENV_WORD = r"[A-Za-z_]\w*="  # a leading word of a worker variant that sets an environment variable


def split_env(words: list[str]) -> tuple[dict[str, str], list[str]]:
    """A worker variant's words -> (environment, flags): ``VAR=value`` words before the first flag are the
    workers' environment, as in a shell command line."""
    n = next((i for i, w in enumerate(words) if not re.match(ENV_WORD, w)), len(words))
    return dict(w.split("=", 1) for w in words[:n]), words[n:]


def worker_variants(given: list[str]) -> dict[str, list[str]]:
    """``["NAME=FLAGS", ...]`` -> {NAME: words}; NAME is letters, digits and underscores; the words are
    ``VAR=value`` settings of the workers' environment first (``pdl=HYPERLANE_PDL=1``), then worker flags."""
    out: dict[str, list[str]] = {}
    for v in given:
        name, eq, flags = v.partition("=")
        if not eq or not re.fullmatch(r"\w+", name):
            raise ValueError(f"--worker-variant {v!r}: expected NAME=FLAGS with NAME of letters, digits, _")
        if name in out:
            raise ValueError(f"--worker-variant {name!r} is given twice")
        words = shlex.split(flags)
        rest = split_env(words)[1]
        if rest and not rest[0].startswith("-"):
            raise ValueError(
                f"--worker-variant {name!r}: {rest[0]!r} is neither VAR=value (environment settings come first) "
                "nor a worker flag (--...)"
            )
        out[name] = words
    return out


def part_split(
    args: argparse.Namespace, res: dict[str, Any], p: int, key: str = "", flags: list[str] | None = None
) -> dict[str, Any]:
    mm = _main()
    # the copy bandwidth of this run's 1gpu part (measured on an idle GPU) when there is one
    bw = (res.get("1gpu") or {}).get("copy_bw") or res.get("meta", {}).get("copy_bw")
    bw = bw or (mm.copy_bandwidth() if CUDA else 0.0)
    res.setdefault("meta", {})["copy_bw"] = bw
    out: dict[str, Any] = {}
    res[key or f"split{p}"] = out
    return run_split(args, args.model, p, args.ms, args.decode_tokens, args.prefill, bw, out, flags or [])


def part_70b(
    args: argparse.Namespace, res: dict[str, Any], p: int = 4, key: str = "", flags: list[str] | None = None
) -> dict[str, Any]:
    mm = _main()
    # the copy bandwidth of this run's 1gpu part (measured on an idle GPU) when there is one
    bw = (res.get("1gpu") or {}).get("copy_bw") or res.get("meta", {}).get("copy_bw")
    bw = bw or (mm.copy_bandwidth() if CUDA else 0.0)
    res.setdefault("meta", {})["copy_bw"] = bw
    name = "llama-2-70b" if CUDA and args.model != "bundled" else "bundled"
    out: dict[str, Any] = {}
    res[key or ("70b" if p == 4 else f"70b{p}")] = out
    ms = [m for m in args.ms if m >= p] or ([p, 2 * p, 4 * p] if p > 4 else [4, 8, 16])  # --ms, from p up
    prefill = [512] if CUDA else args.prefill
    return run_split(args, name, p, ms, min(args.decode_tokens, 32), prefill, bw, out, flags or [])


# ---------------------------------------------------------------------- table rows


def table_rows(
    key: str, r: dict[str, Any] | None, g1: dict[str, Any] | None
) -> list[tuple[str, str, str, str]]:
    if not r:
        return []
    if "error" in r:
        return [(key, "error", r["error"][:80], "")]
    rows = []
    dec = r["decode"]["tok_s"]
    if re.fullmatch(r"70b\d*", re.split(r"[@#]", key)[0]):
        roof = r.get("roofline_tok_s")
        if roof:
            rows.append(
                (
                    f"{key}: 70B over {r['stages']} GPUs decode",
                    f"{dec:.1f} tok/s",
                    f"{dec / roof:.1%} of split roofline {roof:.1f}",
                    "PASS" if dec / roof >= 0.5 else "MISS (goal 50%)",
                )
            )
    else:
        ref = g1["decode"][g1["best_decode"]]["tok_s"] if g1 else None
        rows.append(
            (
                f"{key} decode",
                f"{dec:.1f} tok/s",
                f"{dec / ref:.1%} of 1 GPU" if ref else "",
                ("PASS" if dec / ref >= 0.95 else "MISS (goal 95%)") if ref else "",
            )
        )
        for s, v in [*r.get("prefill", {}).items(), *r.get("prefill_chunked", {}).items()]:
            ref_p = g1["prefill"].get(s.split("/")[0], {}).get("tok_s") if g1 else None
            rows.append(
                (
                    f"{key} prefill {s}"
                    if "/" not in s
                    else f"{key} prefill {s.replace('/', ' (chunks of ')})".replace(" of auto", ": auto"),
                    f"{v['tok_s']:.0f} tok/s",
                    f"{v['tok_s'] / ref_p:.1%} of 1 GPU" if ref_p else "",
                    ("PASS" if v["tok_s"] / ref_p >= 0.9 else "MISS (goal 90%)") if ref_p else "",
                )
            )
    h = r.get("hops", {})
    if h:
        rows.append(
            (
                f"{key} per-hop time",
                f"{h['per_hop_s'] * 1e6:.0f} us",
                f"raw RTT {h['raw_rtt_s'] * 1e6:.0f} us; stage gaps {[round(g * 1e6) for g in h['stage_to_stage_gap_s']]} us",
                "PASS" if h["excess_over_rtt_s"] <= 100e-6 else "MISS (goal <= RTT + 100 us)",
            )
        )
    for m, w in r.get("concurrency", {}).items():
        if "tok_s" not in w:
            continue
        p = r["stages"]
        ratio = w["tok_s"] / w["target_tok_s"]
        goal = ("PASS" if ratio >= 0.95 else "MISS (goal 95%)") if int(m) >= 4 * p else ""
        rows.append(
            (
                f"{key} m={m}",
                f"{w['tok_s']:.1f} tok/s",
                f"{ratio:.1%} of 1/slowest ({w['target_tok_s']:.1f}); sim {w['sim']['tok_s']:.1f}; "
                f"bubble {max(w['bubble']):.1%} (sim {max(w['sim']['bubble'] or [0]):.1%}, (p-1)/(m+p-1) {w['gpipe_bubble']:.1%})",
                goal,
            )
        )
    return rows
