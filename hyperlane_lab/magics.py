"""IPython magics: ``%load_ext hyperlane_lab`` then ``%hyperlane <command>`` (``%hyperlane --help``).

    %hyperlane cluster start 2                  # local worker processes (LocalCluster)
    %hyperlane generate "Once upon a time" --max-tokens 32
    %%hyperlane generate --max-tokens 32        # prompt = the cell body
    df = %hyperlane timeline                    # BubbleTimeline of the last requests
    plan = %hyperlane plan llama-2-7b --cluster my_cluster.yaml --partitioner dp
    %hyperlane probe --codec int8 --codec int4
    df = %hyperlane sweep experiments/partitioners_catalog.yaml
    %hyperlane discover                         # workers announcing themselves on the LAN
    %hyperlane cluster stop

Each command returns its object (a DataFrame, Plan, GenerationResult, widget) so the next cell can
use it. The magics only parse arguments and call library functions; their state (the running
cluster and the loaded model) lives on the ``HyperlaneMagics`` instance. Bad options print the
usage, never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from contextlib import ExitStack
from typing import Any

from IPython.core.magic import Magics, line_cell_magic, magics_class

__all__ = ["HyperlaneMagics", "load_ipython_extension", "unload_ipython_extension"]

log = logging.getLogger(__name__)


class _UsageError(Exception):
    """argparse wanted to exit; the message is what it would have printed."""

    def __init__(self, message: str, status: int = 2) -> None:
        super().__init__(message)
        self.status = status


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser that raises instead of calling ``sys.exit`` (a notebook must survive it)."""

    # exit_on_error stays True: argparse then routes every error through ``error`` below
    def error(self, message: str) -> None:  # type: ignore[override]
        raise _UsageError(f"{self.format_usage()}{self.prog}: error: {message}\n")

    def exit(self, status: int = 0, message: str | None = None) -> None:  # type: ignore[override]
        raise _UsageError(message or "", status)


def _add_gen_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=32, help="tokens to generate (default 32)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--stream", action="store_true", help="print text as it arrives")
    p.add_argument("--model", default=None, help="model folder / .gguf / hub id (default: bundled)")
    p.add_argument("--partitioner", default="uniform")
    p.add_argument("--compression", default="fp16", help="boundary codec (fp16, int8, int4, ...)")
    p.add_argument("--group-size", type=int, default=64, help="quantization group of int codecs")
    p.add_argument("--engine", default="torch")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    p.add_argument(
        "--workers", default=None, help="host:port,... of running workers (default: the local cluster)"
    )


def build_parser() -> _Parser:
    parser = _Parser(prog="%hyperlane", description="hyperlane_lab from a notebook.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser("discover", help="list workers announcing themselves on the LAN (mDNS)")
    p.add_argument("--timeout", type=float, default=3.0, help="seconds to listen")
    p.add_argument("--count", type=int, default=0, help="return once N workers are found")
    p.add_argument("--interface", action="append", default=None, metavar="IP")
    p.add_argument("--watch", action="store_true", help="return a live ClusterView instead of a table")
    p.add_argument("--service-type", default=None, help=argparse.SUPPRESS)  # tests browse a unique type

    p = sub.add_parser("cluster", help="start/stop local worker processes")
    p.add_argument("action", choices=["start", "stop", "status"])
    p.add_argument("n", nargs="?", type=int, default=None, help="number of workers (start)")

    p = sub.add_parser("plan", help="plan a partition of MODEL over a cluster")
    p.add_argument("model", help="preset (e.g. llama-2-7b), HF folder or config")
    p.add_argument("--cluster", default=None, help="cluster YAML or catalog cards 'rtx4090,rtx3090'")
    p.add_argument("--partitioner", default="dp", help="partitioner name (default: dp)")
    p.add_argument("--objective", default="latency", choices=["latency", "throughput"])
    p.add_argument("--concurrency", type=int, default=1, help="micro-batches in flight")
    p.add_argument("--codec", default="fp16", help="boundary codec")
    p.add_argument(
        "--context", type=int, default=None, help="KV tokens per sequence (default: the cluster's)"
    )
    p.add_argument("--view", action="store_true", help="return a PlanView widget instead of the Plan")

    p = sub.add_parser("generate", help="generate text on the current cluster")
    p.add_argument("prompt", nargs="?", default=None, help="prompt (cell magic: the cell body)")
    _add_gen_options(p)

    p = sub.add_parser("timeline", help="pipeline timeline of the current model's trace")
    p.add_argument("--no-simulated", action="store_true", help="do not overlay the simulator's trace")
    p.add_argument("--frame", action="store_true", help="return the trace DataFrame instead of a widget")

    p = sub.add_parser("probe", help="codec accuracy at every stage boundary")
    p.add_argument("--codec", action="append", default=None, help="codec (repeatable; default int8, int4)")
    p.add_argument("--group-size", action="append", type=int, default=None, help="group size (repeatable)")
    p.add_argument("--model", default=None, help="model (default: bundled)")
    p.add_argument("--view", action="store_true", help="return a QuantErrorView instead of the DataFrame")

    p = sub.add_parser("sweep", help="run a YAML sweep (resumable) -> DataFrame")
    p.add_argument("file", nargs="?", default=None, help="sweep YAML (cell magic: the YAML may be the body)")
    p.add_argument("--out", default=None, help="results folder")
    p.add_argument("--no-progress", action="store_true")
    return parser


@magics_class
class HyperlaneMagics(Magics):
    """``%hyperlane`` / ``%%hyperlane``; holds the current local cluster and model."""

    def __init__(self, shell: Any = None) -> None:
        super().__init__(shell)
        self.cluster: Any = None
        self.model: Any = None
        self._model_key: tuple[Any, ...] | None = None
        self._stack = ExitStack()
        self.last_result: Any = None
        self.last_plan: Any = None
        self.last_events: list[Any] | None = None  # trace of the last generate

    # ------------------------------------------------------------------ entry point

    @line_cell_magic
    def hyperlane(self, line: str, cell: str | None = None) -> Any:
        """%hyperlane COMMAND [options]; run ``%hyperlane --help`` for the commands."""
        parser = build_parser()
        try:
            argv = shlex.split(line)
        except ValueError as e:
            print(f"{parser.format_usage()}%hyperlane: error: {e}", file=sys.stderr)
            return None
        try:
            args = parser.parse_args(argv)
        except _UsageError as e:
            if e.status == 0:
                print(str(e), end="")  # --help already printed itself
            else:
                print(str(e), end="", file=sys.stderr)
            return None
        except argparse.ArgumentError as e:
            print(f"{parser.format_usage()}%hyperlane: error: {e}", file=sys.stderr)
            return None
        if args.command is None:
            parser.print_help(sys.stdout)
            return None
        handler = getattr(self, f"_cmd_{args.command}")
        try:
            return handler(args, cell)
        except (
            ValueError,
            FileNotFoundError,
            RuntimeError,
            TimeoutError,
            ConnectionError,
            ImportError,
            KeyError,
        ) as e:
            print(f"%hyperlane {args.command}: error: {e}", file=sys.stderr)
            return None

    # ------------------------------------------------------------------ commands

    def _cmd_discover(self, args: argparse.Namespace, cell: str | None) -> Any:
        from hyperlane_lab.discovery import DiscoveryManager
        from hyperlane_lab.widgets import ClusterView, workers_frame

        kw = {"service_type": args.service_type} if args.service_type else {}
        dm = DiscoveryManager(interfaces=args.interface or "all", **kw)
        if args.watch:
            dm.start_discovery()
            self._stack.callback(dm.stop_discovery)
            return ClusterView(dm)
        with dm:
            if args.count:
                dm.wait_for(args.count, timeout=args.timeout)
            else:
                import time

                time.sleep(args.timeout)
            return workers_frame(dm)

    def _cmd_cluster(self, args: argparse.Namespace, cell: str | None) -> Any:
        if args.action == "status":
            return self.cluster
        if args.action == "stop":
            self.close()
            print("cluster stopped")
            return None
        if args.n is None or args.n < 1:
            raise ValueError("say how many workers: %hyperlane cluster start N (N >= 1)")
        from hyperlane_lab.runtime import LocalCluster

        self.close()
        self.cluster = self._stack.enter_context(LocalCluster(args.n))
        print(f"started {args.n} worker(s): {', '.join(self.cluster.addresses)}")
        return self.cluster

    def _cmd_plan(self, args: argparse.Namespace, cell: str | None) -> Any:
        from hyperlane_lab.planning import plan_model
        from hyperlane_lab.sweep.config import PointConfig
        from hyperlane_lab.sweep.simulate import cards_of, point_cluster, point_model_profile

        if not args.cluster:
            raise ValueError(
                "say which devices to plan for: --cluster my_cluster.yaml (planning.cluster format) "
                "or catalog cards --cluster rtx4090,rtx3090"
            )
        yaml_file = args.cluster.endswith((".yaml", ".yml"))
        spec = args.cluster if yaml_file else tuple(cards_of(args.cluster.replace(",", "+")))
        cluster = point_cluster(PointConfig(cluster=spec))
        overrides: dict[str, Any] = {"codec": args.codec}
        if args.context is not None:
            overrides["context"] = args.context
        plan = plan_model(
            point_model_profile(args.model, cluster.dtype_bytes),
            cluster,
            partitioner=args.partitioner,
            objective=args.objective,
            concurrency=args.concurrency,
            **overrides,
        )
        self.last_plan = plan
        if args.view:
            from hyperlane_lab.widgets import PlanView

            return PlanView(plan, devices=cluster.devices)
        return plan

    def _load_model(self, args: argparse.Namespace) -> Any:
        """The distributed model for these options: reused when nothing changed, else (re)loaded."""
        from hyperlane_lab.runtime import AutoDistributedModel

        if args.workers:
            workers = [a.strip() for a in args.workers.split(",") if a.strip()]
        elif self.cluster is not None:
            workers = list(self.cluster.addresses)
        else:
            raise ValueError(
                "no workers: start local ones with `%hyperlane cluster start 2`, or pass --workers host:port,..."
            )
        key = (
            args.model,
            tuple(workers),
            args.partitioner,
            args.compression,
            args.group_size,
            args.engine,
            args.dtype,
        )
        if self.model is not None and key == self._model_key:
            return self.model
        self._close_model()
        self.model = AutoDistributedModel.from_pretrained(
            args.model,
            workers=workers,
            partitioner=args.partitioner,
            compression=args.compression,
            group_size=args.group_size,
            engine=args.engine,
            dtype=args.dtype,
        )
        self._model_key = key
        return self.model

    def _cmd_generate(self, args: argparse.Namespace, cell: str | None) -> Any:
        prompt = cell.strip("\n") if cell is not None and cell.strip() else args.prompt
        if not prompt:
            raise ValueError(
                'give a prompt: %hyperlane generate "Once upon a time" (or put it in a %%hyperlane cell)'
            )
        model = self._load_model(args)
        kw = {
            "max_tokens": args.max_tokens,
            "temperature": args.temperature,
            "top_k": args.top_k,
            "top_p": args.top_p,
            "seed": args.seed,
            "stop": args.stop,
        }
        if args.stream:
            pieces = []
            for piece in model.generate(prompt, stream=True, **kw):
                print(piece, end="", flush=True)
                pieces.append(piece)
            print()
            self.last_result = "".join(pieces)
        else:
            self.last_result = model.generate(prompt, **kw)
        # the runtime hands out trace events once ("since the last call"): keep this request's events
        try:
            self.last_events = list(model.trace_events())
        except Exception:
            log.debug("could not fetch the trace", exc_info=True)
            self.last_events = None
        return self.last_result

    def _cmd_timeline(self, args: argparse.Namespace, cell: str | None) -> Any:
        if self.model is None:
            raise ValueError('no model yet: run `%hyperlane generate "..."` first')
        events = self.last_events if self.last_events is not None else list(self.model.trace_events())
        if args.frame:
            from hyperlane_lab.tracing import events_to_frame

            return events_to_frame(events)
        from hyperlane_lab.widgets import BubbleTimeline

        simulated = None
        if not args.no_simulated:
            simulated = _simulate_like(self.model, events)
        return BubbleTimeline(events, simulated)

    def _cmd_probe(self, args: argparse.Namespace, cell: str | None) -> Any:
        from hyperlane_lab.sweep.accuracy import probe_frame

        df = probe_frame(args.model, args.codec or ["int8", "int4"], args.group_size or [64])
        if args.view:
            from hyperlane_lab.widgets import QuantErrorView

            return QuantErrorView(df)
        return df

    def _cmd_sweep(self, args: argparse.Namespace, cell: str | None) -> Any:
        from hyperlane_lab import sweep

        if args.file:
            return sweep.run(args.file, args.out, progress=not args.no_progress)
        if cell is None or not cell.strip():
            raise ValueError("give a sweep file: %hyperlane sweep experiments/partitioners_catalog.yaml")
        import yaml

        return sweep.run_config(
            sweep.parse_config(yaml.safe_load(cell), "<cell>"), args.out, progress=not args.no_progress
        )

    # ------------------------------------------------------------------ cleanup

    def _close_model(self) -> None:
        if self.model is not None:
            try:
                self.model.close()
            except Exception:
                log.exception("closing the model failed")
        self.model, self._model_key, self.last_events = None, None, None

    def close(self) -> None:
        """Close the model and stop the local cluster (and any discovery a watch started)."""
        self._close_model()
        self._stack.close()
        self._stack = ExitStack()
        self.cluster = None


def _simulate_like(model: Any, events: Any) -> Any:
    """The pipeline simulator fed with the trace's own service times (None when it cannot run)."""
    try:
        from hyperlane_lab.tracing import simulate_from_trace

        return list(simulate_from_trace(events).events)
    except Exception:
        log.debug("could not simulate the measured trace", exc_info=True)
        return None


def load_ipython_extension(ipython: Any) -> None:
    """``%load_ext hyperlane_lab``: register ``%hyperlane``."""
    ipython.register_magics(HyperlaneMagics(ipython))


def unload_ipython_extension(ipython: Any) -> None:
    magics = ipython.magics_manager.registry.get("HyperlaneMagics")
    if magics is not None:
        magics.close()
