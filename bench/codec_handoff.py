"""Hand-off time of a 2048 x 4096 prefill activation between two workers over a 1 Gbit/s link, per codec.

Builds a ``tests.netns.NetnsLab(3)`` (needs root; the run is skipped with the reason otherwise), shapes
the links of hosts 0 and 1 to ``--rate`` (netem when the kernel has it, else a token bucket), starts a real
worker in each of those two namespaces and, in the third, a client that deploys a random-weight llama-2-7b
shape cut to 2 layers (hidden 4096, vocab 32000) split 1 + 1 and runs a prefill of ``--tokens`` token ids
with ``max_tokens=1``, once per codec (fp16, int8, int4 by default).

From the workers' trace (``model.trace_events()``, times on the client clock) for the prefill step:
- ``handoff_s``: stage 0 SEND start -> stage 1 RECEIVE end (the bytes on the wire, the number to compare);
- ``receive_s``: stage 1 RECEIVE (first header byte -> last byte);
- ``quantize_s`` (stage 0) and ``decode_s`` (stage 1), and ``total_s`` = stage 0 compute end -> stage 1
  decode end (what the hand-off costs the pipeline, codec work included).
Speed-ups are fp16 time / codec time; goal: int4 hand-off >= 3.5x faster than fp16.

Writes ``bench/out/codec_handoff.json`` and ``.md``; prints the table.
Usage (root): python bench/codec_handoff.py [--codecs fp16,int8,int4] [--tokens 2048] [--rate 1gbit]
              [--repeats 3] [--device cpu|auto] [--dtype fp32]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "bench" / "out" / "codec_handoff.json"
GRPC_PORT = 50051


# ------------------------------------------------------------------------------------------- client side


def _step_times(events: list[Any]) -> dict[str, float]:
    """Hand-off intervals of the prefill step (step 0) from one generate call's events."""

    def one(stage: int, kind: str) -> Any:
        found = [e for e in events if e.stage == stage and e.kind.value == kind and e.step == 0]
        if len(found) != 1:
            raise RuntimeError(f"expected one {kind} event on stage {stage}, got {len(found)}")
        return found[0]

    comp0, send0 = one(0, "compute"), one(0, "send")
    recv1, dec1 = one(1, "receive"), one(1, "decode")
    quant0 = one(0, "quantize")
    return {
        "handoff_s": recv1.end - send0.start,
        "receive_s": recv1.duration,
        "quantize_s": quant0.duration,
        "decode_s": dec1.duration,
        "total_s": dec1.end - comp0.end,
        "payload_bytes": send0.nbytes,
        "stage0_compute_s": comp0.duration,
        "stage1_compute_s": one(1, "compute").duration,
    }


def client(cfg: dict[str, Any]) -> dict[str, Any]:
    """Runs in the client namespace: one deployment and ``repeats`` prefills per codec."""
    import torch

    from hyperlane_lab.runtime import AutoDistributedModel

    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, cfg["vocab"], (cfg["tokens"],), generator=gen).tolist()
    out: dict[str, Any] = {}
    for codec in cfg["codecs"]:
        t0 = time.perf_counter()
        with AutoDistributedModel.from_pretrained(
            cfg["model_dir"],
            workers=cfg["workers"],
            random_weights=True,
            dtype=cfg["dtype"],
            compression=codec,
            group_size=cfg["group_size"],
            progress=False,
            context=cfg["tokens"] + 8,
            step_timeout=900,
        ) as m:
            load_s = time.perf_counter() - t0
            runs = []
            for _ in range(cfg["repeats"]):
                m.trace_events()  # drain
                t1 = time.perf_counter()
                m.generate(ids, max_tokens=1)
                wall = time.perf_counter() - t1
                runs.append({**_step_times(m.trace_events()), "prefill_wall_s": wall})
        out[codec] = {"load_s": load_s, "runs": runs}
        print(f"client: {codec} done ({len(runs)} runs)", file=sys.stderr, flush=True)
    return out


# ------------------------------------------------------------------------------------------- orchestrator


def _start_worker(lab: Any, i: int, device: str, tmp: Path, threads: int) -> Any:
    from hyperlane_lab.runtime.server import READY_PREFIX
    from tests.netns import LineReader

    argv = [sys.executable, "-m", "hyperlane_lab.cli.main", "worker", str(GRPC_PORT), "--host", lab.ip(i)]
    argv += [
        "--device",
        device,
        "--no-advertise",
        "--cache-dir",
        str(tmp / f"cache{i}"),
        "--id",
        f"handoff{i}",
    ]
    env = {"OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    p = lab.popen(i, argv, env=env)
    log = open(tmp / f"worker{i}.log", "w")  # noqa: SIM115 - closed by the drain thread

    def drain() -> None:
        assert p.stderr is not None
        with log:
            for line in p.stderr:
                log.write(line)

    threading.Thread(target=drain, daemon=True).start()
    LineReader(p).expect(lambda s: s.startswith(READY_PREFIX), timeout=120)
    return p


def _summary(codec_runs: dict[str, Any], rate_bps: float) -> list[dict[str, Any]]:
    rows = []
    for codec, r in codec_runs.items():
        med = {k: statistics.median(run[k] for run in r["runs"]) for k in r["runs"][0]}
        med["codec"] = codec
        med["ideal_wire_s"] = med["payload_bytes"] * 8 / rate_bps
        rows.append(med)
    base = next((r for r in rows if r["codec"] == "fp16"), None)
    for r in rows:
        r["speedup_handoff"] = base["handoff_s"] / r["handoff_s"] if base else float("nan")
        r["speedup_total"] = base["total_s"] / r["total_s"] if base else float("nan")
    return rows


def _table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| codec | frame MB | ideal wire ms | hand-off ms | receive ms | quantize ms | decode ms | "
        "total ms | hand-off speed-up vs fp16 | total speed-up vs fp16 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['codec']} | {r['payload_bytes'] / 1e6:.2f} | {r['ideal_wire_s'] * 1e3:.1f} | "
            f"{r['handoff_s'] * 1e3:.1f} | {r['receive_s'] * 1e3:.1f} | {r['quantize_s'] * 1e3:.1f} | "
            f"{r['decode_s'] * 1e3:.1f} | {r['total_s'] * 1e3:.1f} | {r['speedup_handoff']:.2f}x | "
            f"{r['speedup_total']:.2f}x |"
        )
    return "\n".join(lines)


def _write(result: dict[str, Any], md: str, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    out.with_suffix(".md").write_text(md + "\n")
    print(md)
    print(f"\nwrote {out} and {out.with_suffix('.md')}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--codecs", default="fp16,int8,int4")
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--rate", default="1gbit")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu", help="worker device: cpu, cuda:N or auto")
    ap.add_argument("--dtype", default=None, help="weights/activations (default fp32 on CPU, fp16 on CUDA)")
    ap.add_argument("--threads", type=int, default=1, help="OMP threads per CPU worker")
    ap.add_argument("--timeout", type=float, default=1800.0, help="client time limit (s)")
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--client", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.client is not None:  # inside the client namespace
        print(json.dumps(client(json.loads(args.client))), flush=True)
        return 0

    sys.path.insert(0, str(REPO))
    import torch

    from hyperlane_lab.models import ModelSpec
    from tests.netns import NetnsLab, _rate_bits, netns_available

    device = args.device
    if device == "auto":
        device = "cuda:0" if torch.cuda.is_available() else "cpu"
    dtype = args.dtype or ("fp16" if device.startswith("cuda") else "fp32")
    codecs = [c.strip() for c in args.codecs.split(",") if c.strip()]
    meta = {
        "bench": "codec_handoff",
        "tokens": args.tokens,
        "hidden_size": 4096,
        "rate": args.rate,
        "codecs": codecs,
        "group_size": args.group_size,
        "device": device,
        "dtype": dtype,
        "host": platform.node(),
    }
    ok, why = netns_available()
    if not ok:
        _write({**meta, "skipped": why}, f"codec_handoff skipped: {why}", Path(args.out))
        return 0

    spec = ModelSpec.preset("llama-2-7b").with_layers(2)
    tmp = Path(tempfile.mkdtemp(prefix="hyperlane-handoff-"))
    try:
        model_dir = tmp / "model"
        model_dir.mkdir()
        (model_dir / "config.json").write_text(json.dumps(spec.to_hf_config_dict()))
        with NetnsLab(3) as lab:
            shaping = [lab.shape(i, rate=args.rate) for i in (0, 1)]
            for i in (0, 1):
                _start_worker(lab, i, device, tmp, args.threads)
            cfg = {
                "model_dir": str(model_dir),
                "workers": [f"{lab.ip(i)}:{GRPC_PORT}" for i in (0, 1)],
                "dtype": dtype,
                "codecs": codecs,
                "group_size": args.group_size,
                "tokens": args.tokens,
                "vocab": spec.vocab_size,
                "repeats": args.repeats,
            }
            t0 = time.perf_counter()
            proc = lab.run(2, [sys.executable, __file__, "--client", json.dumps(cfg)], timeout=args.timeout,
                           check=False, env={"OMP_NUM_THREADS": "1"})  # fmt: skip
            if proc.returncode != 0:
                logs = "\n".join((tmp / f"worker{i}.log").read_text()[-3000:] for i in (0, 1))
                raise RuntimeError(f"client failed ({proc.returncode}):\n{proc.stderr[-4000:]}\n{logs}")
            runs = json.loads(proc.stdout.strip().splitlines()[-1])
            elapsed = time.perf_counter() - t0
    except subprocess.TimeoutExpired as e:
        raise SystemExit(f"the client did not finish within {args.timeout:.0f}s; raise --timeout") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    rows = _summary(runs, _rate_bits(args.rate))
    int4 = next((r for r in rows if r["codec"] == "int4"), None)
    goal = {"int4_speedup_goal": 3.5}
    if int4 is not None:
        goal |= {"int4_speedup": int4["speedup_handoff"], "int4_ok": bool(int4["speedup_handoff"] >= 3.5)}
    result = {**meta, "shaping": shaping, "elapsed_s": round(elapsed, 1), "goal": goal, "summary": rows,
              "runs": runs, "cpu_count": os.cpu_count()}  # fmt: skip
    md = "\n".join(
        [
            f"# Codec hand-off: [1, {args.tokens}, 4096] {dtype} activation, stage 0 -> stage 1 over "
            f"{args.rate} ({shaping[0]['qdisc']}), workers on {device}; median of {args.repeats}",
            "",
            _table(rows),
            "",
            "- goal: int4 hand-off >= 3.5x faster than fp16: "
            + (f"{goal['int4_speedup']:.2f}x {'OK' if goal['int4_ok'] else 'MISSED'}" if int4 else "n/a"),
        ]
    )
    _write(result, md, Path(args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
