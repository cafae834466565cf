"""Tables for reports: group-and-summarise rows, paired Wilcoxon tables, markdown rendering."""
from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from mri_poison import metrics


def group_rows(rows: Iterable[Mapping[str, Any]], keys: Sequence[str]) -> dict[tuple, list[Mapping[str, Any]]]:
  """Rows grouped by the values of `keys`, groups in first-seen order."""
  groups: dict[tuple, list] = {}
  for r in rows:
    groups.setdefault(tuple(r[k] for k in keys), []).append(r)
  return groups


def summarize(rows: Iterable[Mapping[str, Any]], keys: Sequence[str], values: Sequence[str]) -> list[dict]:
  """One row per group of `keys`: n, and for every column in `values` its mean, sample SD (n - 1; NaN for
  n = 1), median and a 95 % percentile-bootstrap CI of the mean (`_ci_low`, `_ci_high`; 2000 resamples, seed 0).
  """
  out = []
  for group, members in group_rows(rows, keys).items():
    row = dict(zip(keys, group))
    row["n"] = len(members)
    for v in values:
      a = np.asarray([float(m[v]) for m in members], np.float64)
      row[f"{v}_mean"] = float(np.mean(a))
      row[f"{v}_std"] = float(np.std(a, ddof=1)) if a.size > 1 else float("nan")
      row[f"{v}_median"] = float(np.median(a))
      ci = metrics.bootstrap_ci(a, n_boot=2000)
      row[f"{v}_ci_low"], row[f"{v}_ci_high"] = ci["low"], ci["high"]
    out.append(row)
  return out


def wilcoxon_row(a: Sequence[float], b: Sequence[float], **labels) -> dict:
  """labels + {mean_a, mean_b, mean_diff (a - b) with its 95 % bootstrap CI, median_diff, statistic, p_value, n,
  n_effective (non-zero differences)} of a paired two-sided Wilcoxon signed-rank test."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  res = metrics.wilcoxon(a, b)
  cmp = metrics.paired_comparison(a, b)
  return {**labels, "mean_a": float(np.mean(a)), "mean_b": float(np.mean(b)), "mean_diff": cmp["mean_diff"],
          "ci_low": cmp["ci_low"], "ci_high": cmp["ci_high"], "median_diff": res["median_diff"],
          "statistic": res["statistic"], "p_value": res["p_value"], "n": res["n"], "n_effective": cmp["n_effective"]}


def add_holm(rows: list[dict], family: Sequence[str] = ()) -> list[dict]:
  """Adds "p_holm": Holm-adjusted p over each family of rows (rows sharing the `family` columns)."""
  for members in group_rows(rows, family).values():
    for r, p in zip(members, metrics.holm([m["p_value"] for m in members])):
      r["p_holm"] = float(p)
  return rows


def paired_values(rows: Iterable[Mapping[str, Any]], select: Mapping[str, Any], value: str,
                  pair_key: str = "case") -> dict[Any, float]:
  """{rows[pair_key]: rows[value]} over the rows whose columns equal `select` (e.g. model/attack/eps)."""
  out = {}
  for r in rows:
    if all(_same(r[k], v) for k, v in select.items()):
      out[r[pair_key]] = float(r[value])
  return out


def paired_test(rows, select_a: Mapping[str, Any], select_b: Mapping[str, Any], value: str,
                pair_key: str = "case", **labels) -> dict:
  """Wilcoxon signed-rank of `value` between two selections of rows, paired by `pair_key` (common keys only)."""
  a = paired_values(rows, select_a, value, pair_key)
  b = paired_values(rows, select_b, value, pair_key)
  common = [k for k in a if k in b]
  if not common:
    raise ValueError(f"no paired rows for {dict(select_a)} vs {dict(select_b)} on {pair_key!r}")
  return wilcoxon_row([a[k] for k in common], [b[k] for k in common], **labels)


def _same(x, y) -> bool:
  if isinstance(x, float) or isinstance(y, float):
    try:
      return math.isclose(float(x), float(y), rel_tol=1e-6, abs_tol=1e-12)
    except (TypeError, ValueError):
      return False
  return x == y


def format_value(v, digits: int = 3) -> str:
  if isinstance(v, (bool, np.bool_)):
    return "yes" if v else "no"
  if isinstance(v, (int, np.integer)):
    return str(int(v))
  if isinstance(v, (float, np.floating)):
    v = float(v)
    if math.isnan(v):
      return "nan"
    if math.isinf(v):
      return "inf" if v > 0 else "-inf"
    if v != 0 and abs(v) < 10 ** -digits:
      return f"{v:.1e}"
    return f"{v:.{digits}f}"
  return str(v)


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None,
                   headers: Mapping[str, str] | None = None,
                   formats: Mapping[str, Callable[[Any], str]] | None = None, digits: int = 3) -> str:
  """A GitHub markdown table of `rows` (columns default: the keys of the first row). Ends with a newline."""
  rows = list(rows)
  if columns is None:
    columns = list(dict.fromkeys(k for r in rows for k in r))
  headers, formats = dict(headers or {}), dict(formats or {})
  cell = lambda c, v: formats[c](v) if c in formats else format_value(v, digits)
  lines = ["| " + " | ".join(_escape(headers.get(c, c)) for c in columns) + " |",
           "|" + "|".join("---" for _ in columns) + "|"]
  for r in rows:
    lines.append("| " + " | ".join(_escape(cell(c, r.get(c, ""))) for c in columns) + " |")
  return "\n".join(lines) + "\n"


def _escape(text: str) -> str:
  return str(text).replace("|", "\\|").replace("\n", " ")


def format_p(p: float) -> str:
  """p-values: 3 significant digits, with a star below 0.05."""
  p = float(p)
  text = f"{p:.3g}" if p >= 1e-3 else f"{p:.1e}"
  return text + (" *" if p < 0.05 else "")
