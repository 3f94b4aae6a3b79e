"""Live table of discovered workers (their mDNS TXT stats) and a memory bar chart.

``ClusterView(discovery)`` accepts a ``DiscoveryManager`` (refreshes on its add/update/remove
callbacks), anything with ``workers()`` or ``discovered_workers`` (polled by ``refresh()`` or a timer
thread when ``refresh_s`` is set), or a plain list of ``WorkerInfo``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from hyperlane_lab.types import WorkerInfo
from hyperlane_lab.widgets._base import FigureWidget, new_figure

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure

__all__ = ["ClusterView", "as_workers", "plot_cluster", "workers_frame"]

log = logging.getLogger(__name__)
GIB = 2**30
FRAME_COLUMNS = (
    "worker_id",
    "address",
    "device",
    "gpu_name",
    "total_gib",
    "free_gib",
    "tflops",
    "mem_bw_gbs",
    "shard_loaded",
    "auth_required",
)


def as_workers(source: Any) -> list[WorkerInfo]:
    """WorkerInfo list (sorted by id) from a discovery object, a ``{id: info}`` dict or an iterable."""
    if source is None:
        return []
    if hasattr(source, "discovered_workers"):
        items: Iterable[WorkerInfo] = source.discovered_workers.values()
    elif hasattr(source, "workers") and callable(source.workers):
        items = source.workers()
    elif isinstance(source, dict):
        items = source.values()
    else:
        items = source
    workers = list(items)
    bad = [w for w in workers if not isinstance(w, WorkerInfo)]
    if bad:
        raise TypeError(
            f"expected WorkerInfo items, got {type(bad[0]).__name__}; pass a discovery or WorkerInfo list"
        )
    return sorted(workers, key=lambda w: w.worker_id)


def workers_frame(source: Any) -> pd.DataFrame:
    """One row per worker: id, address, device, GPU, memory in GiB, TFLOP/s, GB/s, shard/auth flags."""
    import pandas as pd

    rows = [
        {
            "worker_id": w.worker_id,
            "address": w.address,
            "device": w.device,
            "gpu_name": w.gpu_name,
            "total_gib": round(w.total_memory / GIB, 2),
            "free_gib": round(w.free_memory / GIB, 2),
            "tflops": round(w.flops / 1e12, 2),
            "mem_bw_gbs": round(w.mem_bw / 1e9, 1),
            "shard_loaded": w.shard_loaded,
            "auth_required": w.auth_required,
        }
        for w in as_workers(source)
    ]
    return pd.DataFrame(rows, columns=list(FRAME_COLUMNS))


def plot_cluster(workers: Any) -> Figure:
    """Bars of used and free memory (GiB) per worker; two bar containers, x labels = worker ids."""
    import numpy as np

    ws = as_workers(workers)
    fig = new_figure(max(4.0, 1.2 * len(ws) + 2.0), 3.2)
    ax = fig.add_subplot(1, 1, 1)
    x = np.arange(len(ws))
    used = np.array([(w.total_memory - w.free_memory) / GIB for w in ws], dtype=float)
    free = np.array([w.free_memory / GIB for w in ws], dtype=float)
    ax.bar(x, used, 0.6, label="used", color="#e15759")
    ax.bar(x, free, 0.6, bottom=used, label="free", color="#59a14f")
    ax.set_xticks(x)
    ax.set_xticklabels([w.worker_id for w in ws], rotation=20, ha="right")
    ax.set_ylabel("memory (GiB)")
    ax.set_title(f"{len(ws)} worker(s)" if ws else "no workers")
    ax.legend(fontsize="small")
    return fig


class ClusterView(FigureWidget):
    """HTML table + memory chart of the workers a discovery sees, refreshed on its callbacks and/or
    every ``refresh_s`` seconds (timer thread; call ``close()`` to stop it)."""

    def __init__(self, discovery: Any, refresh_s: float | None = None, show_plot: bool = True) -> None:
        import ipywidgets as w

        self.discovery = discovery
        self.show_plot = show_plot
        self.table = w.HTML()
        self.refresh_button = w.Button(description="refresh", icon="refresh")
        self.refresh_button.on_click(lambda _b: self.refresh())
        super().__init__([self.refresh_button])
        self.widget.children = (self.controls, self.table, self.image, self.status)
        self.refreshes = 0
        self._closed = threading.Event()
        for hook in ("on_add", "on_update", "on_remove"):
            register = getattr(discovery, hook, None)
            if callable(register):
                register(self._on_change)
        self._timer: threading.Thread | None = None
        if refresh_s is not None:
            if refresh_s <= 0:
                raise ValueError(f"refresh_s must be > 0 seconds (or None for no timer), got {refresh_s}")
            self._timer = threading.Thread(
                target=self._tick, args=(float(refresh_s),), name="cluster-view-refresh", daemon=True
            )
            self._timer.start()
        self.refresh()

    def _on_change(self, _info: WorkerInfo) -> None:
        if not self._closed.is_set():
            self.refresh()

    def _tick(self, period: float) -> None:
        while not self._closed.wait(period):
            try:
                self.refresh()
            except Exception:  # a flaky discovery must not kill the timer
                log.exception("cluster view refresh failed")

    def frame(self) -> pd.DataFrame:
        return workers_frame(self.discovery)

    def refresh(self) -> pd.DataFrame:
        """Re-read the workers, redraw the table (and chart); returns the table as a DataFrame."""
        with self._lock:
            df = self.frame()
            self.table.value = df.to_html(index=False, border=0) if len(df) else "<i>no workers found yet</i>"
            if self.show_plot:
                self.redraw()
            self.refreshes += 1
            self.status.value = f"{len(df)} worker(s), updated {time.strftime('%H:%M:%S')}"
            return df

    def _draw(self) -> Figure:
        return plot_cluster(self.discovery)

    def close(self) -> None:
        self._closed.set()
        if self._timer is not None and self._timer is not threading.current_thread():
            self._timer.join(timeout=2.0)
        super().close()
