"""Report tables: cells with mean ± std in percent, rendered as markdown and CSV."""

from __future__ import annotations

import csv
import dataclasses
import io
import math
import os
from typing import Any, Mapping, Sequence

from bmnas_jax.checkpoint import write_text_atomic

METRIC_LABELS = {"accuracy": "Acc", "f1_weighted": "F1-W", "f1_macro": "F1-M",
                 "f1_micro": "F1-mi"}
DASH = "—"


def metric_label(metric: str) -> str:
  """Column label of a metric as the paper writes it (`Acc`, `F1-W`)."""
  return METRIC_LABELS.get(metric, metric)


@dataclasses.dataclass(frozen=True)
class Stat:
  """A metric as a table cell: mean (and std) over n runs, stored as fractions.

  Rendered in percent with 2 decimals, `62.92 ± 0.03`; a single run (or no std)
  renders without the ± part.
  """
  mean: float
  std: float | None = None
  n: int = 1                                  # runs behind the mean; 0 if unknown

  @classmethod
  def from_summary(cls, d: Mapping[str, Any]) -> "Stat":
    """From `{"mean", "std", "values"}` (the trainers' mean_std form)."""
    n = len(d.get("values") or [])           # 0: unknown
    std = d.get("std")
    return cls(float(d["mean"]), None if std is None or n == 1 else float(std), n)

  @classmethod
  def from_values(cls, values: Sequence[float]) -> "Stat":
    """Mean and population std (ddof 0, as the trainers report) of `values`."""
    v = [float(x) for x in values]
    mean = sum(v) / len(v)
    std = math.sqrt(sum((x - mean) ** 2 for x in v) / len(v)) if len(v) > 1 else None
    return cls(mean, std, len(v))

  def pct(self) -> tuple[float, float | None]:
    return 100.0 * self.mean, None if self.std is None else 100.0 * self.std

  def __str__(self) -> str:
    m, s = self.pct()
    return f"{m:.2f}" if s is None else f"{m:.2f} ± {s:.2f}"


def format_pct(value: float) -> str:
  """A fraction as a percent with 2 decimals: 0.6292 -> `62.92`."""
  return f"{100.0 * value:.2f}"


def format_params(n: int) -> str:
  """A parameter count in millions, always 3 decimals (one precision in a table):
  `0.980 M`, `0.019 M`."""
  return f"{n / 1e6:.3f} M"


def format_seconds(s: float) -> str:
  return f"{s:.2f}"


def format_hours(s: float) -> str:
  """Seconds as device-hours, 4 decimals (short runs would read 0.00 with 2)."""
  return f"{s / 3600.0:.4f}"


def _md_cell(v: Any) -> str:
  if v is None:
    return DASH
  return str(v).replace("|", "\\|").replace("\n", " ")


@dataclasses.dataclass
class Table:
  """A report table: markdown for report.md, CSV (numbers unformatted) for tools.

  Attributes:
    name: file stem of the CSV (`report/<name>.csv`).
    title: the caption, in the paper's "Table N:" style.
    columns: column names.
    rows: one list per row, cells are str, int, float, Stat or None (a dash).
    stat_columns: columns holding Stat cells; in the CSV each becomes
      `<col> mean`, `<col> std` (percent, full precision) and `<col> n`.
  """
  name: str
  title: str
  columns: list[str]
  rows: list[list[Any]]

  def stat_columns(self) -> set[int]:
    return {i for i in range(len(self.columns))
            if any(isinstance(r[i], Stat) for r in self.rows)}

  def markdown(self) -> str:
    """Caption line, header, separator and rows."""
    lines = [f"**{self.title}**", "",
             "| " + " | ".join(self.columns) + " |",
             "|" + "|".join("---" for _ in self.columns) + "|"]
    for r in self.rows:
      lines.append("| " + " | ".join(_md_cell(v) for v in r) + " |")
    return "\n".join(lines) + "\n"

  def csv_header(self) -> list[str]:
    stats = self.stat_columns()
    out = []
    for i, c in enumerate(self.columns):
      out += [f"{c} mean", f"{c} std", f"{c} n"] if i in stats else [c]
    return out

  def csv_rows(self) -> list[list[str]]:
    stats = self.stat_columns()
    rows = []
    for r in self.rows:
      out = []
      for i, v in enumerate(r):
        if i in stats:
          if isinstance(v, Stat):
            m, s = v.pct()
            out += [repr(m), "" if s is None else repr(s), str(v.n) if v.n else ""]
          else:
            out += ["", "", ""]
        else:
          out.append("" if v is None else str(v))
      rows.append(out)
    return rows

  def csv_text(self) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(self.csv_header())
    w.writerows(self.csv_rows())
    return buf.getvalue()


def write_csv(table: Table, folder: str | os.PathLike) -> str:
  """Writes `folder/<table.name>.csv` atomically; returns its path."""
  path = os.path.join(os.fspath(folder), f"{table.name}.csv")
  write_text_atomic(path, table.csv_text())
  os.chmod(path, 0o644)                 # the temporary file it was renamed from is private
  return path
