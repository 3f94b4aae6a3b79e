"""Shared plumbing of the views: display-free figures and a widget that shows one as a PNG."""

from __future__ import annotations

import io
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["FigureWidget", "figure_png", "new_figure", "set_range"]


def new_figure(width: float = 9.0, height: float = 4.0) -> Figure:
    """A Figure with its own Agg canvas: no pyplot, no global backend change, no display needed.

    In a notebook with ``%matplotlib inline`` a returned Figure renders as a PNG like any other.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def figure_png(fig: Figure, dpi: int = 90) -> bytes:
    """Render ``fig`` to PNG bytes with Agg."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    if not isinstance(fig.canvas, FigureCanvasAgg):
        FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def set_range(slider: Any, lo: float, hi: float, value: Sequence[float] | None = None) -> None:
    """Set a (Float|Int)RangeSlider's bounds and value without tripping its min <= max validation."""
    if hi <= lo:
        hi = lo + (1 if isinstance(lo, int) else 1e-9)
    if lo > slider.max:  # widen first so that neither assignment sees min > max
        slider.max = hi
        slider.min = lo
    else:
        slider.min = lo
        slider.max = hi
    slider.value = tuple(value) if value is not None else (lo, hi)


class FigureWidget:
    """Controls above a rendered figure. Subclasses implement ``_draw() -> Figure`` and build controls.

    ``figure`` is the last drawn Figure, ``image`` the PNG widget showing it, ``widget`` the whole box
    (displaying the object displays ``widget``).
    """

    def __init__(self, controls: Sequence[Any] = (), dpi: int = 90) -> None:
        import ipywidgets as w

        self.dpi = dpi
        self.figure: Figure | None = None
        self.image = w.Image(format="png")
        self.status = w.HTML()
        self.controls = w.HBox(list(controls))
        self.widget = w.VBox([self.controls, self.image, self.status])
        self._lock = threading.RLock()
        self._suspended = False

    def _draw(self) -> Figure:
        raise NotImplementedError

    def redraw(self, *_: Any) -> Figure | None:
        """Redraw from the current data and control values (also a widget ``observe`` callback)."""
        if self._suspended:
            return self.figure
        with self._lock:
            self.figure = self._draw()
            self.image.value = figure_png(self.figure, self.dpi)
            return self.figure

    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        return self.widget._repr_mimebundle_(**kwargs)

    def close(self) -> None:
        self.widget.close()
