"""``models.capture.graph_capture``: the cyclic GC is off exactly while a graph captures (CPU; a stand-in
graph records the calls), and comes back on afterwards, also when the captured body raises."""

from __future__ import annotations

import gc

import pytest

from hyperlane_lab.models.capture import graph_capture


class _Graph:
    def __init__(self) -> None:
        self.calls: list[tuple[str, object, bool]] = []

    def capture_begin(self, pool: object = None, capture_error_mode: str = "global") -> None:
        self.calls.append(("begin", (pool, capture_error_mode), gc.isenabled()))

    def capture_end(self) -> None:
        self.calls.append(("end", None, gc.isenabled()))


def test_gc_is_off_during_the_capture_and_restored() -> None:
    assert gc.isenabled()
    g = _Graph()
    with graph_capture(g, pool="pool"):  # type: ignore[arg-type]
        inside = gc.isenabled()
    assert not inside and gc.isenabled()
    assert g.calls == [("begin", ("pool", "thread_local"), False), ("end", None, False)]


def test_gc_restored_and_capture_ended_when_the_body_raises() -> None:
    g = _Graph()
    with pytest.raises(RuntimeError, match="boom"), graph_capture(g):  # type: ignore[arg-type]
        raise RuntimeError("boom")
    assert gc.isenabled()
    assert [c[0] for c in g.calls] == ["begin", "end"]


def test_a_failed_begin_ends_nothing_and_restores_gc() -> None:
    class _Refuses(_Graph):
        def capture_begin(self, pool: object = None, capture_error_mode: str = "global") -> None:
            raise RuntimeError("no capture")

    g = _Refuses()
    with pytest.raises(RuntimeError, match="no capture"), graph_capture(g):  # type: ignore[arg-type]
        pass
    assert gc.isenabled() and g.calls == []


def test_gc_left_off_when_it_was_off_before() -> None:
    gc.disable()
    try:
        with graph_capture(_Graph()):  # type: ignore[arg-type]
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()
