"""%hyperlane magics inside a real IPython shell: usage on bad input (never a traceback), plans equal to
direct planner calls, sweeps from files and cells, state kept on the Magics instance."""

from __future__ import annotations

import textwrap
from pathlib import Path
from types import SimpleNamespace
from typing import Any, ClassVar

import pandas as pd
import pytest
from IPython.core.interactiveshell import InteractiveShell

from hyperlane_lab.types import EventKind, TraceEvent


@pytest.fixture
def shell() -> Any:
    sh = InteractiveShell.instance()
    sh.run_line_magic("load_ext", "hyperlane_lab")
    yield sh
    sh.magics_manager.registry["HyperlaneMagics"].close()


def magics(sh: Any) -> Any:
    return sh.magics_manager.registry["HyperlaneMagics"]


def test_help_lists_every_command(shell: Any, capsys: pytest.CaptureFixture[str]) -> None:
    assert shell.run_line_magic("hyperlane", "--help") is None
    out = capsys.readouterr().out
    for cmd in ("discover", "cluster", "plan", "generate", "timeline", "probe", "sweep"):
        assert cmd in out
    shell.run_line_magic("hyperlane", "")
    assert "usage: %hyperlane" in capsys.readouterr().out
    shell.run_line_magic("hyperlane", "plan --help")
    out = capsys.readouterr().out
    assert "--partitioner" in out and "--concurrency" in out


@pytest.mark.parametrize(
    ("line", "expect"),
    [
        ("bogus", "invalid choice: 'bogus'"),
        ("plan", "the following arguments are required: model"),
        ("generate hi --max-tokens many", "invalid int value: 'many'"),
        ("plan llama-2-7b --objective fastest", "invalid choice: 'fastest'"),
        ("cluster start --nope", "unrecognized arguments: --nope"),
        ('generate "unclosed', "No closing quotation"),
    ],
)
def test_bad_options_print_usage_not_traceback(
    shell: Any, capsys: pytest.CaptureFixture[str], line: str, expect: str
) -> None:
    assert shell.run_line_magic("hyperlane", line) is None
    captured = capsys.readouterr()
    assert "usage: %hyperlane" in captured.err
    assert expect in captured.err
    assert "Traceback" not in captured.err + captured.out


def test_runtime_errors_print_a_message(shell: Any, capsys: pytest.CaptureFixture[str]) -> None:
    assert shell.run_line_magic("hyperlane", 'generate "Once upon a time"') is None
    assert "%hyperlane cluster start 2" in capsys.readouterr().err
    assert shell.run_line_magic("hyperlane", "timeline") is None
    assert "no model yet" in capsys.readouterr().err
    assert shell.run_line_magic("hyperlane", "cluster start") is None
    assert "cluster start N" in capsys.readouterr().err


# ---------------------------------------------------------------- plan


def cluster_file(tmp_path: Path) -> Path:
    p = tmp_path / "lab.yaml"
    p.write_text(
        textwrap.dedent("""
        devices:
          - name: rtx4090
          - name: rtx3060
          - name: rtx3090
        links:
          default: {gbit_s: 2.5, latency_ms: 0.2}
        context: 2048
    """)
    )
    return p


def test_plan_equals_direct_planner_call(shell: Any, tmp_path: Path) -> None:
    planning = pytest.importorskip("hyperlane_lab.planning")
    f = cluster_file(tmp_path)
    plan = shell.run_line_magic(
        "hyperlane", f"plan llama-2-7b --cluster {f} --partitioner dp --objective throughput --concurrency 2"
    )
    want = planning.plan_model(
        "llama-2-7b", planning.load_cluster(f), partitioner="dp", objective="throughput", concurrency=2
    )
    assert plan.spans == want.spans
    assert [s.device for s in plan.stages] == [s.device for s in want.stages]
    assert plan.predicted_tokens_per_s == pytest.approx(want.predicted_tokens_per_s)
    assert magics(shell).last_plan is plan


def test_plan_from_catalog_cards_and_view(shell: Any) -> None:
    planning = pytest.importorskip("hyperlane_lab.planning")
    from hyperlane_lab.widgets import PlanView

    plan = shell.run_line_magic(
        "hyperlane", "plan llama-2-13b --cluster rtx4090,2xrtx3090 --partitioner uniform"
    )
    cluster = planning.cluster_from_dict(
        {"devices": [{"name": n} for n in ("rtx4090", "rtx3090", "rtx3090")]}
    )
    want = planning.plan_model("llama-2-13b", cluster, partitioner="uniform")
    assert plan.spans == want.spans
    assert [s.device for s in plan.stages] == ["rtx4090", "rtx3090", "rtx3090#2"]
    view = shell.run_line_magic("hyperlane", "plan llama-2-13b --cluster rtx4090,rtx3090 --view")
    assert isinstance(view, PlanView) and view.image.value[:4] == b"\x89PNG"


def test_plan_errors_are_messages(shell: Any, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("hyperlane_lab.planning")
    assert (
        shell.run_line_magic("hyperlane", "plan llama-2-7b --cluster rtx4090 --partitioner fastest") is None
    )
    err = capsys.readouterr().err
    assert "unknown partitioner 'fastest'" in err and "dp" in err and "Traceback" not in err
    assert shell.run_line_magic("hyperlane", "plan llama-2-70b --cluster rtx3060") is None
    err = capsys.readouterr().err  # infeasible: a message naming needed vs available memory, no exception
    assert "fits device memory" in err and "rtx3060" in err and "Traceback" not in err
    assert shell.run_line_magic("hyperlane", "plan llama-2-7b") is None
    assert "--cluster" in capsys.readouterr().err


# ---------------------------------------------------------------- sweep and probe


SWEEP = """
mode: simulate
base: {model: llama-2-7b, cluster: [rtx4090, rtx3090], max_tokens: 2}
grid:
  partitioner: [uniform, dp]
  concurrency: [1, 3]
"""


def test_sweep_from_file_and_from_cell(shell: Any, tmp_path: Path) -> None:
    pytest.importorskip("hyperlane_lab.planning")
    f = tmp_path / "s.yaml"
    f.write_text(SWEEP)
    df = shell.run_line_magic("hyperlane", f"sweep {f} --out {tmp_path / 'a'} --no-progress")
    assert isinstance(df, pd.DataFrame) and len(df) == 4 and (df.status == "ok").all()
    df2 = shell.run_cell_magic("hyperlane", f"sweep --out {tmp_path / 'b'} --no-progress", SWEEP)
    assert df2["predicted_tokens_per_s"].tolist() == pytest.approx(df["predicted_tokens_per_s"].tolist())


def test_probe_passes_options_through(shell: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from hyperlane_lab.sweep import accuracy
    from hyperlane_lab.widgets import QuantErrorView

    seen = []
    frame = pd.DataFrame(
        {"boundary": [1, 2], "codec": ["int8", "int8"], "group_size": [32, 32], "rel_error": [0.01, 0.02]}
    )

    def fake_probe_frame(model, codecs, group_sizes):
        seen.append((model, list(codecs), list(group_sizes)))
        return frame

    monkeypatch.setattr(accuracy, "probe_frame", fake_probe_frame)
    out = shell.run_line_magic("hyperlane", "probe --codec int8 --codec int4 --group-size 32")
    assert out is frame and seen[-1] == (None, ["int8", "int4"], [32])
    view = shell.run_line_magic("hyperlane", "probe --view")
    assert isinstance(view, QuantErrorView) and seen[-1] == (None, ["int8", "int4"], [64])


# ---------------------------------------------------------------- cluster / generate / timeline wiring


class FakeCluster:
    instances: ClassVar[list[FakeCluster]] = []

    def __init__(self, n: int) -> None:
        self.addresses = [f"127.0.0.1:{50000 + i}" for i in range(n)]
        self.closed = False
        FakeCluster.instances.append(self)

    def __enter__(self) -> FakeCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.closed = True


class FakeModel:
    loads: ClassVar[list[dict]] = []

    def __init__(self, **kw: Any) -> None:
        self.kw, self.prompts, self.closed = kw, [], False

    @classmethod
    def from_pretrained(cls, model: Any, **kw: Any) -> FakeModel:
        cls.loads.append({"model": model, **kw})
        return cls(model=model, **kw)

    def generate(self, prompt: str, stream: bool = False, **kw: Any) -> Any:
        self.prompts.append((prompt, kw))
        if stream:
            return iter(["a", "b"])
        return SimpleNamespace(text="!", kw=kw)

    def trace_events(self) -> list[TraceEvent]:
        return [
            TraceEvent(0, EventKind.COMPUTE, 0.0, 0.01, session="s", step=0, tokens=3),
            TraceEvent(1, EventKind.COMPUTE, 0.011, 0.02, session="s", step=0, tokens=3),
            TraceEvent(0, EventKind.COMPUTE, 0.03, 0.031, session="s", step=1, tokens=1),
            TraceEvent(1, EventKind.COMPUTE, 0.032, 0.033, session="s", step=1, tokens=1),
        ]

    def close(self) -> None:
        self.closed = True


def test_cluster_generate_timeline_keep_state_on_the_instance(
    shell: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import hyperlane_lab.runtime as runtime
    from hyperlane_lab.widgets import BubbleTimeline

    monkeypatch.setattr(runtime, "LocalCluster", FakeCluster, raising=False)
    monkeypatch.setattr(runtime, "AutoDistributedModel", FakeModel, raising=False)
    FakeModel.loads.clear()
    m = magics(shell)
    cluster = shell.run_line_magic("hyperlane", "cluster start 3")
    assert m.cluster is cluster and len(cluster.addresses) == 3
    assert "hyperlane" not in shell.user_ns  # no globals: state lives on the Magics instance

    res = shell.run_line_magic("hyperlane", 'generate "Once upon a time" --max-tokens 5 --compression int8')
    assert res.text == "!" and res.kw["max_tokens"] == 5
    assert FakeModel.loads[-1]["workers"] == cluster.addresses
    assert FakeModel.loads[-1]["compression"] == "int8"
    model = m.model
    shell.run_cell_magic("hyperlane", "generate --max-tokens 2 --compression int8", "A cell\nprompt\n")
    assert m.model is model and len(FakeModel.loads) == 1  # same options: model reused
    assert model.prompts[-1][0] == "A cell\nprompt"
    shell.run_line_magic("hyperlane", 'generate "x" --compression fp16 --stream')
    assert len(FakeModel.loads) == 2 and model.closed  # options changed: reloaded, old one closed
    assert "ab" in capsys.readouterr().out

    view = shell.run_line_magic("hyperlane", "timeline")
    assert isinstance(view, BubbleTimeline)
    assert not view.simulated.empty  # overlay simulated from the measured service times
    df = shell.run_line_magic("hyperlane", "timeline --frame")
    assert len(df) == 4
    assert len(shell.run_line_magic("hyperlane", "timeline --frame")) == 4  # the last request's trace is kept

    shell.run_line_magic("hyperlane", "cluster stop")
    assert cluster.closed and m.cluster is None and m.model is None


@pytest.mark.multiprocess
@pytest.mark.timeout(240)
def test_generate_on_a_real_local_cluster_matches_in_process(shell: Any) -> None:
    pytest.importorskip("hyperlane_lab.runtime.local_cluster")
    from hyperlane_lab.generation.pipeline import InProcessPipeline

    m = magics(shell)
    shell.run_line_magic("hyperlane", "cluster start 2")
    assert m.cluster is not None
    res = shell.run_line_magic("hyperlane", 'generate "Once upon a time" --max-tokens 8 --compression fp16')
    want = InProcessPipeline.from_pretrained(None, n_stages=2).generate("Once upon a time", max_tokens=8)
    assert res.token_ids == want.token_ids  # greedy; fp16 wire rounding does not flip this short sequence
    events = shell.run_line_magic("hyperlane", "timeline --frame")
    assert set(events["stage"]) == {0, 1}
    shell.run_line_magic("hyperlane", "cluster stop")
    assert m.cluster is None


# ---------------------------------------------------------------- discover (real mDNS on loopback)


def test_discover_table_and_live_view(shell: Any) -> None:
    import dataclasses
    import secrets
    import time

    from hyperlane_lab.discovery import WorkerAdvertiser
    from hyperlane_lab.types import WorkerInfo
    from hyperlane_lab.widgets import ClusterView

    service = f"_hl{secrets.token_hex(4)}._tcp.local."
    info = WorkerInfo(
        "mag0",
        "0.0.0.0",
        50071,
        50072,
        device_kind="cuda",
        gpu_name="RTX 3090",
        total_memory=24 * 2**30,
        free_memory=20 * 2**30,
    )
    opts = f"--interface 127.0.0.1 --service-type {service}"
    with WorkerAdvertiser(info, interfaces=["127.0.0.1"], service_type=service) as adv:
        df = shell.run_line_magic("hyperlane", f"discover --count 1 --timeout 10 {opts}")
        assert df["worker_id"].tolist() == ["mag0"] and df["total_gib"].tolist() == [24.0]
        view = shell.run_line_magic("hyperlane", f"discover --watch {opts}")
        assert isinstance(view, ClusterView)
        deadline = time.monotonic() + 10
        while "mag0" not in view.table.value and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "mag0" in view.table.value  # refreshed by the DiscoveryManager's add callback
        adv.update(dataclasses.replace(info, free_memory=2 * 2**30))  # a shard was loaded
        while "<td>2.0</td>" not in view.table.value and time.monotonic() < deadline + 10:
            time.sleep(0.05)
        assert "<td>2.0</td>" in view.table.value  # refreshed by the update callback (free_gib 20 -> 2)
    view.close()
