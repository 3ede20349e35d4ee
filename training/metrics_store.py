"""Training and evaluation metrics as Parquet beside the run's manifests: ``<run>/metrics/<job>/``.

One long ("tidy") schema for every job and phase — (job, kind, phase, dataset, step, epoch, name,
value, time) — so a glob over all jobs always unions and DuckDB reads it as is::

    SELECT step, value FROM '<run>/metrics/*/*.parquet' WHERE job = 'recognition' AND name = 'loss'

Rows are flushed when a checkpoint commits (and at the end), into a file named after the step range
it covers. A resumed run restarts from the last checkpoint, so it rewrites no committed range and
leaves no rows for steps that no checkpoint holds.
"""

from __future__ import annotations

import io
import time
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from manifests.sql import glob_escape

METRICS_SCHEMA = pa.schema(
    [
        pa.field("job", pa.string()),
        pa.field("kind", pa.string()),  # recognition | enhancement | verification
        pa.field("phase", pa.string()),  # train | eval
        pa.field("dataset", pa.string()),  # split or pair-file name for eval rows; null for train rows
        pa.field("step", pa.int64()),
        pa.field("epoch", pa.float64()),
        pa.field("name", pa.string()),
        pa.field("value", pa.float64()),
        pa.field("time", pa.timestamp("ms", tz="UTC")),
    ]
)


def metrics_dir(run_dir: str, job: str) -> str:
    return f"{run_dir.rstrip('/')}/metrics/{job}"


class MetricsWriter:
    """Buffers metric rows of one job and writes them as Parquet files on ``flush``."""

    def __init__(
        self, run_dir: str, job: str, kind: str, storage_options: dict[str, Any] | None = None
    ) -> None:
        self.folder = metrics_dir(run_dir, job)
        self.job, self.kind = job, kind
        self.storage_options = storage_options or {}
        self._rows: list[dict[str, Any]] = []

    def log(
        self,
        step: int,
        values: dict[str, float],
        *,
        phase: str = "train",
        epoch: float | None = None,
        dataset: str | None = None,
    ) -> None:
        now = int(time.time() * 1000)
        for name, value in values.items():
            self._rows.append(
                {
                    "job": self.job,
                    "kind": self.kind,
                    "phase": phase,
                    "dataset": dataset,
                    "step": int(step),
                    "epoch": None if epoch is None else float(epoch),
                    "name": name,
                    "value": float(value),
                    "time": now,
                }
            )

    def flush(self, tag: str = "") -> str | None:
        """Write buffered rows to one file named ``<tag or phases>-<first step>-<last step>.parquet``;
        returns its path (None if nothing was buffered)."""
        if not self._rows:
            return None
        steps = [r["step"] for r in self._rows]
        phases = sorted({r["phase"] for r in self._rows})
        name = f"{tag or '-'.join(phases)}-{min(steps):08d}-{max(steps):08d}.parquet"
        table = pa.Table.from_pylist(self._rows, schema=METRICS_SCHEMA)
        buf = io.BytesIO()
        pq.write_table(table, buf)
        fs, folder = fsspec.core.url_to_fs(self.folder, **self.storage_options)
        fs.makedirs(folder, exist_ok=True)
        fs.pipe_file(f"{folder}/{name}", buf.getvalue())
        self._rows = []
        return f"{self.folder}/{name}"


def read_metrics(run_dir: str, job: str, storage_options: dict[str, Any] | None = None) -> pa.Table:
    """All metric rows of a job (for tests and reports; `facefoundry query` reads the same files)."""
    fs, folder = fsspec.core.url_to_fs(metrics_dir(run_dir, job), **(storage_options or {}))
    files = sorted(fs.glob(f"{glob_escape(folder)}/*.parquet"))
    tables = [pq.read_table(io.BytesIO(fs.cat_file(f)), schema=METRICS_SCHEMA) for f in files]
    return pa.concat_tables(tables) if tables else METRICS_SCHEMA.empty_table()
