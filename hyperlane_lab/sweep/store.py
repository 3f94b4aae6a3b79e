"""Sweep results on disk: one table, rewritten atomically after every point so a crash loses at most
the point in flight. Parquet when pyarrow imports, CSV otherwise."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["ResultStore", "has_parquet"]

log = logging.getLogger(__name__)


def has_parquet() -> bool:
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        return False
    return True


def _cell(value: Any) -> Any:
    """Lists/tuples/dicts become JSON text so every format stores them the same way."""
    if isinstance(value, list | tuple | dict):
        return json.dumps(value)
    return value


class ResultStore:
    """Rows of a sweep in ``folder/results.{parquet,csv}``; each row carries its ``point_hash`` and
    ``status`` ("ok", or "error" with ``error`` text; error points run again on resume)."""

    def __init__(self, folder: str | Path, fmt: str = "auto") -> None:
        self.folder = Path(folder)
        if fmt == "auto":
            fmt = "parquet" if has_parquet() else "csv"
        if fmt not in ("parquet", "csv"):
            raise ValueError(f"unknown results format {fmt!r}; use 'parquet', 'csv' or 'auto'")
        self.fmt = fmt
        self.path = self.folder / f"results.{fmt}"
        self._rows: list[dict[str, Any]] = []
        self._load()

    def _load(self) -> None:
        import pandas as pd

        if not self.path.exists():
            return
        df = (
            pd.read_parquet(self.path)
            if self.fmt == "parquet"
            else pd.read_csv(self.path, dtype={"point_hash": str})
        )
        self._rows = df.to_dict("records")
        log.info("resuming from %s (%d rows)", self.path, len(self._rows))

    def completed(self) -> set[str]:
        """Hashes of points that finished with status ok."""
        return {str(r["point_hash"]) for r in self._rows if r.get("status") == "ok"}

    def add(
        self,
        point_hash: str,
        params: Mapping[str, Any],
        rows: Iterable[Mapping[str, Any]],
        status: str = "ok",
        error: str = "",
    ) -> None:
        """Replace any earlier rows of ``point_hash`` with ``rows`` (each merged with ``params``)."""
        self._rows = [r for r in self._rows if str(r["point_hash"]) != point_hash]
        for metrics in rows:
            row = {"point_hash": point_hash, "status": status, "error": error}
            row.update({k: _cell(v) for k, v in params.items()})
            row.update({k: _cell(v) for k, v in metrics.items()})
            self._rows.append(row)

    def save(self) -> Path:
        """Write all rows atomically (temp file + rename)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        df = self.frame()
        tmp = self.path.with_name(self.path.name + ".tmp")
        if self.fmt == "parquet":
            df.to_parquet(tmp, index=False)
        else:
            df.to_csv(tmp, index=False)
        os.replace(tmp, self.path)
        return self.path

    def frame(self, hashes: Iterable[str] | None = None) -> pd.DataFrame:
        """All rows (or those of ``hashes``, in that order) as a DataFrame."""
        import pandas as pd

        rows = self._rows
        if hashes is not None:
            order = {h: i for i, h in enumerate(hashes)}
            rows = sorted(
                (r for r in rows if str(r["point_hash"]) in order), key=lambda r: order[str(r["point_hash"])]
            )
        return pd.DataFrame(rows)
