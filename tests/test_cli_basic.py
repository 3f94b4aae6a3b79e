"""`hyperlane run --json` and `hyperlane demo --in-process` against transformers' greedy output."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from hyperlane_lab.cli.main import main
from tests.helpers_models import hf_bundled, hf_greedy, single_thread


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    with single_thread():
        yield


def _expected(prompt: str, n: int) -> tuple[list[int], str]:
    model, tok = hf_bundled()
    ids = tok(prompt)["input_ids"]
    new = hf_greedy(model, ids, n)
    return new, tok.decode(ids + new, skip_special_tokens=True)


def test_run_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--stages", "2", "--max-tokens", "8", "--json"]) == 0
    out = capsys.readouterr().out.strip()
    assert len(out.splitlines()) == 1
    obj = json.loads(out)
    assert set(obj) == {"text", "token_ids", "stages", "timings"}
    ids, full = _expected("Once upon a time", 8)
    assert obj["token_ids"] == ids  # generated ids only, as transformers generates them
    assert "Once upon a time" + obj["text"] == full
    assert [s["span"] for s in obj["stages"]] == [[0, 3], [3, 5]]
    assert obj["timings"]["generated_tokens"] == 8 and obj["timings"]["prompt_tokens"] == 5


def test_run_json_prompt_and_stop(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--prompt", "The cat", "--max-tokens", "30", "--stop", ".", "--json"]) == 0
    obj = json.loads(capsys.readouterr().out)
    _, full = _expected("The cat", 30)
    continuation = full[len("The cat") :]
    assert "." in continuation
    assert obj["text"] == continuation[: continuation.find(".")]
    assert len(obj["stages"]) == 1


def test_run_reports_bad_model(capsys: pytest.CaptureFixture[str], tmp_path) -> None:
    assert main(["run", str(tmp_path / "missing"), "--max-tokens", "2"]) == 1
    err = capsys.readouterr().err
    assert "error" in err and "not found" in err


def test_demo_in_process_prints_the_story(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--in-process", "--max-tokens", "20"]) == 0
    out = capsys.readouterr().out
    _, full = _expected("Once upon a time", 20)
    assert full.startswith("Once upon a time, there was a little girl named Lily")
    assert full in out
    assert all(
        s in out for s in ("[0, 2)", "[2, 4)", "[4, 5)")
    )  # the stage table lists the 3 half-open spans


def test_worker_refuses_a_bad_gemv_pin_at_start(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``HYPERLANE_GEMV_PIN`` is an operator's setting: a worker with a malformed one exits 1 with the reason
    before it serves anything, rather than failing every session later."""
    from hyperlane_lab.runtime import server

    def started(config: object) -> None:  # fails the test rather than serving forever
        raise AssertionError("the worker started with a bad HYPERLANE_GEMV_PIN")

    monkeypatch.setattr(server, "_loop_for", started)
    monkeypatch.setenv("HYPERLANE_GEMV_PIN", "4096x4096")
    assert main(["worker", "0", "--device", "cpu", "--host", "127.0.0.1", "--no-advertise"]) == 1
    assert "HYPERLANE_GEMV_PIN: '4096x4096' is not SHAPE=CONFIG" in capsys.readouterr().err
