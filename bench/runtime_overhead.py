"""Per-token and per-hop overhead of the distributed runtime on loopback.

Same run, same machine: the in-process pipeline (3 stages), the same model over 3 worker
processes (LocalCluster, TCP on 127.0.0.1), and a raw-socket round trip of the same payload
(a header plus one token's hidden state) through a TCP echo server with TCP_NODELAY.

    python bench/runtime_overhead.py [--tokens 64] [--repeats 5] [--model PATH]

Writes bench/out/runtime_overhead.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import threading
import time
from pathlib import Path

OUT = Path(os.environ.get("OUT", Path(__file__).resolve().parent / "out"))


def raw_socket_rtt(payload: int, rounds: int = 2000) -> float:
    """Median round trip (s) of `payload` bytes through a NODELAY echo server on loopback."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    port = srv.getsockname()[1]

    def echo() -> None:
        conn, _ = srv.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        buf = bytearray(payload)
        view = memoryview(buf)
        while True:
            got = 0
            while got < payload:
                n = conn.recv_into(view[got:])
                if n == 0:
                    conn.close()
                    return
                got += n
            conn.sendall(view)

    th = threading.Thread(target=echo, daemon=True)
    th.start()
    cli = socket.create_connection(("127.0.0.1", port))
    cli.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    data = bytes(payload)
    buf = bytearray(payload)
    view = memoryview(buf)
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        cli.sendall(data)
        got = 0
        while got < payload:
            got += cli.recv_into(view[got:])
        times.append(time.perf_counter() - t0)
    cli.close()
    srv.close()
    return statistics.median(times[rounds // 10 :])


def decode_s_per_token(gen, prompt: str, tokens: int, repeats: int) -> float:
    samples = []
    for _ in range(repeats):
        r = gen.generate(prompt, max_tokens=tokens)
        samples.append(r.timings.decode_s / max(1, r.timings.decode_steps))
    return statistics.median(samples)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--model", default=None)
    ap.add_argument("--stages", type=int, default=3)
    args = ap.parse_args()

    import torch

    torch.set_num_threads(1)  # each worker process runs 1 thread (LocalCluster): same budget in-process
    from hyperlane_lab.generation.pipeline import InProcessPipeline
    from hyperlane_lab.runtime import AutoDistributedModel, LocalCluster

    prompt = "Once upon a time"
    local = InProcessPipeline.from_pretrained(args.model, n_stages=args.stages)
    local.generate(prompt, max_tokens=8)
    t_local = decode_s_per_token(local, prompt, args.tokens, args.repeats)
    hidden = local.spec.hidden_size
    with (
        LocalCluster(args.stages) as cluster,
        AutoDistributedModel.from_pretrained(args.model, workers=cluster.addresses, progress=False) as model,
    ):
        model.generate(prompt, max_tokens=8)
        t_dist = decode_s_per_token(model, prompt, args.tokens, args.repeats)
        model.trace_events()
        model.generate(prompt, max_tokens=args.tokens)
        events = model.trace_events()
    hops = args.stages + 1  # client -> s0 -> ... -> s_last -> client
    payload = 64 + 8 + hidden * 4  # header + one position + one fp32 hidden state
    rtt = raw_socket_rtt(payload)
    # measured stage-to-stage gaps from the traces: send start on stage i -> receive end on stage i+1
    sends = {(e.session, e.step, e.stage): e for e in events if e.kind.value == "send"}
    gaps = [
        e.end - sends[(e.session, e.step, e.stage - 1)].start
        for e in events
        if e.kind.value == "receive" and (e.session, e.step, e.stage - 1) in sends
    ]
    per_hop = (t_dist - t_local) / hops
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores (CPU only)",
        "model": args.model or "bundled stories260K",
        "stages": args.stages,
        "tokens": args.tokens,
        "inprocess_ms_per_token": t_local * 1e3,
        "distributed_ms_per_token": t_dist * 1e3,
        "overhead_ms_per_token": (t_dist - t_local) * 1e3,
        "hops": hops,
        "overhead_us_per_hop": per_hop * 1e6,
        "raw_socket_one_way_us": rtt / 2 * 1e6,
        "overhead_over_raw_us_per_hop": (per_hop - rtt / 2) * 1e6,
        "traced_stage_to_stage_us_median": statistics.median(gaps) * 1e6 if gaps else None,
    }
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "runtime_overhead.json").write_text(json.dumps(result, indent=2))
    print("| metric | value |\n|---|---|")
    for k, v in result.items():
        print(f"| {k} | {v:.1f} |" if isinstance(v, float) else f"| {k} | {v} |")


if __name__ == "__main__":
    main()
