"""The evaluation-cell store: content-addressed, resumable, shardable results of every study.

Evaluation cells: every (victim, threat, budget, split) result of a study is a cell keyed by what it depends
on (`make_cell`): the victim's params digest (`tree_digest`, a hash of the params' bytes), the threat's part of
the config (the attack's name and the settings that change its output), the budget, the split's case ids and a
code version the study bumps when its evaluation changes numbers. A `CellTable` stores all cells of a study
as long-form rows (victim, threat, budget, case, metric, value, cell) in ONE csv, rewritten atomically after
each addition and readable with csv or pandas elsewhere. `missing(cells)` says which cells still need to be
computed, so adding one eps, one attack or one victim to a finished study computes only the new cells. Cells
whose settings are no longer in the config stay in the table (a later run with those settings reuses them);
select the current ones by key (`rows(cells=...)`).

Shares for array jobs: `parse_cells(config.eval.cells)` reads "all" (the whole study), "none" (train its models,
evaluate nothing) or "i/K" (the i-th of K shares of the cells: cell c is in share int(c.key, 16) mod K). A
`CellTable(path, share=(i, K))` computes only the missing cells of its share (`missing`) and saves them to
shards/<i>-of-<K>/<name> beside `path`; every table loads those shard files too, and a full table's `save` folds
them into the one csv. So K array tasks fill in a study's cells side by side, and a last "all" run computes
nothing new and writes the report.

Processes: in a multi-process job (`jax.distributed`) a study's cells are computed by all processes together:
`map_case_batches` hands batch i of the held-out cases to process i mod P and gathers the per-case values on
every process (exactly: they cross as JSON text), so a cell does not depend on the process count as long as
its random streams are keyed by batch or case (the studies' are), and only process 0 writes the table.
"""
from __future__ import annotations

import csv
import hashlib
import itertools
import json
import math
import os
from typing import Any, Callable, Iterable, Mapping, NamedTuple, Sequence

import jax
import numpy as np

from mri_poison import io_utils
from mri_poison.train import workdir as workdir_lib

CELL_COLUMNS = ("victim", "threat", "budget", "case", "metric", "value", "cell")


# ------------------------------------------------------------------------------------------------ digests


def digest(obj: Any) -> str:
  """16 hex digits of the SHA-256 of `obj` as canonical JSON (sorted keys; 1 and 1.0 differ)."""
  text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=_to_json)
  return hashlib.sha256(text.encode()).hexdigest()[:16]


_to_json = io_utils._json_default  # pylint: disable=protected-access  (numpy scalars and arrays -> JSON)


def _host_array(leaf) -> np.ndarray:
  if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
    if not leaf.is_fully_replicated:
      raise ValueError("tree_digest needs replicated or process-local arrays; got one sharded across processes")
    leaf = leaf.addressable_data(0)  # replicated: every process holds the same bytes
  return np.ascontiguousarray(np.asarray(leaf))


def tree_digest(tree) -> str:
  """16 hex digits of the SHA-256 of a pytree's arrays: each leaf's path, dtype, shape and bytes.

  The identity of a trained model (its params) or of a split's voxels; equal trees give equal digests
  whatever device they live on.
  """
  h = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    a = _host_array(leaf)
    h.update(f"{jax.tree_util.keystr(path)}|{a.dtype.str}|{a.shape}|".encode())
    h.update(a.tobytes())
  return h.hexdigest()[:16]


# ------------------------------------------------------------------------------------------------ processes


def case_batches(n: int, size: int) -> list[slice]:
  """Consecutive slices of `size` cases (the last may be shorter) covering n cases."""
  return [slice(start, min(start + size, n)) for start in range(0, n, max(int(size), 1))]


def own_batches(n_batches: int) -> list[int]:
  """The batch indices this process computes in `map_case_batches`: i with i mod P == process index."""
  return list(range(jax.process_index(), n_batches, jax.process_count()))


_BARRIER_TIMEOUT_MS = 60 * 60 * 1000
_barrier_ids = itertools.count()


def _wait_for_every_process() -> None:
  """Blocks until every process reaches this point, however long that takes (up to an hour).

  Processes reach a gather minutes apart when one has more cases or compiles one more shape (the last, smaller
  batch); the CPU collectives (gloo) give up after 30 s, the coordination service's barrier waits as long as
  it is told. Every process calls the gathers in the same order, so the n-th barrier names the same point.
  """
  from jax._src import distributed  # pylint: disable=import-outside-toplevel
  client = distributed.global_state.client
  if client is not None:
    client.wait_at_barrier(f"mri_poison_allgather_{next(_barrier_ids)}", _BARRIER_TIMEOUT_MS)


def allgather_json(obj) -> list:
  """[obj of process 0, obj of process 1, ...] on every process, for a JSON-able obj (numpy allowed).

  A collective (every process must call it). Floats survive exactly (JSON writes the shortest repr that reads
  back to the same double); NaN and inf too. No pickle crosses processes.
  """
  text = json.dumps(obj, default=_to_json)
  if jax.process_count() == 1:
    return [json.loads(text)]
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  _wait_for_every_process()
  data = np.frombuffer(text.encode(), np.uint8)
  sizes = np.asarray(multihost_utils.process_allgather(np.asarray([data.size], np.int32))).reshape(-1)
  padded = np.zeros(int(sizes.max()), np.uint8)
  padded[:data.size] = data
  gathered = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(sizes), -1)
  return [json.loads(gathered[i, :sizes[i]].tobytes().decode()) for i in range(len(sizes))]


def map_case_batches(n: int, size: int, compute: Callable[[slice], Mapping[str, Any]]) -> dict[str, Any]:
  """Per-case values of n cases, computed `size` cases at a time and shared out over the processes.

  compute(batch slice) -> {name: one value per case of the batch} (or nested dicts of such lists, e.g. one per
  eps); every batch returns the same names. Batch i runs on process i mod P (`own_batches`); every process gets
  the lists concatenated in case order. Values come back as JSON types (floats, lists), however many
  processes: 1 or 64 give equal results.
  """
  batches = case_batches(n, size)
  if not batches:
    return {}
  local = {str(i): compute(batches[i]) for i in own_batches(len(batches))}
  merged = {}
  for part in allgather_json(local):
    merged.update(part)
  return _concat([merged[str(i)] for i in range(len(batches))])


def _concat(parts: list):
  if isinstance(parts[0], dict):
    return {k: _concat([p[k] for p in parts]) for k in parts[0]}
  return [v for p in parts for v in p]


# ------------------------------------------------------------------------------------------------ shares


def parse_cells(spec: str, key: str = "eval.cells") -> str | tuple[int, int]:
  """"all", "none" or (i, K) from "i/K" (0 <= i < K); one error naming config `key` otherwise."""
  spec = str(spec).strip()
  if spec in ("all", "none"):
    return spec
  try:
    i, k = (int(v) for v in spec.split("/"))
  except ValueError:
    i, k = -1, 0
  if not 0 <= i < k:
    raise ValueError(f"config {key}={spec!r}: expected 'all', 'none' or 'i/K' with 0 <= i < K (e.g. 3/8: the "
                     "4th of 8 shares of the evaluation cells)")
  return i, k


def in_share(cell: "Cell", share: tuple[int, int]) -> bool:
  i, k = share
  return int(cell.key, 16) % k == i


def share_dir(path: str, share: tuple[int, int]) -> str:
  """The folder of one share's cells (and its lock), beside the table's csv."""
  return os.path.join(os.path.dirname(os.path.abspath(path)), "shards", f"{share[0]}-of-{share[1]}")


# ------------------------------------------------------------------------------------------------ cells


class Cell(NamedTuple):
  """One evaluation result's address: who (victim), under what (threat, budget), and its key."""
  victim: str
  threat: str
  budget: float
  key: str


def make_cell(victim: str, threat: str, budget: float, *, params: str, settings: Mapping[str, Any],
              cases: Sequence[str], version: int | str, **also: Any) -> Cell:
  """The cell of `victim` under `threat` at `budget` on the split `cases`, keyed by everything it depends on.

  params: the victim's digest (`tree_digest` of its params, and of its architecture if that can vary);
  settings: the threat's config values that change its output (steps, step size, restarts, target, random
  stream...); version: the study's evaluation-code version; `also`: anything else the result depends on
  (e.g. a digest of the split's voxels). e.g. `make_cell("undefended", "pgd", 0.1, params=tree_digest(p),
  settings={"steps": 5}, cases=["c0", "c1"], version=1)`.
  """
  parts = {"victim": str(victim), "threat": str(threat), "budget": float(budget), "params": str(params),
           "settings": dict(settings), "cases": [str(c) for c in cases], "version": version, **also}
  return Cell(str(victim), str(threat), float(budget), digest(parts))


def _key(cell: Cell | str) -> str:
  return cell.key if isinstance(cell, Cell) else str(cell)


class CellTable:
  """All evaluation cells of a study: long-form rows in one csv (`CELL_COLUMNS`), loaded on construction
  together with the cells of every share (shards/*/<name> beside it, see the module doc).

  e.g.
    table = CellTable(os.path.join(workdir, "results", "cells.csv"))
    for cell in table.missing(cells):
      table.add(cell, case_ids, {"dice": dice, "ce": ce})   # one value per case per metric
    table.save()
    table.values(cell, "dice", case_ids)                    # (N,) float64 in the order of case_ids
  A cell is added whole (all its cases and metrics at once), so a cell in the table is a finished cell.
  With `share=(i, K)` the table computes and saves only its share: `missing` leaves out the other shares'
  cells and `save` writes the share's cells to `share_dir(path, share)`.
  """

  def __init__(self, path: str, *, share: tuple[int, int] | None = None):
    self.path = os.fspath(path)
    self.share = share
    self._rows: dict[str, list[dict]] = {}  # cell key -> its rows, in insertion order
    self._values: dict[str, dict[tuple[str, str], float]] = {}
    self._own: list[str] = []  # with a share: the keys of its cells (loaded from its file or added)
    self._shard_files = []
    shards = os.path.join(os.path.dirname(os.path.abspath(self.path)), "shards")
    if os.path.isdir(shards):
      self._shard_files = sorted(os.path.join(shards, d, os.path.basename(self.path)) for d in os.listdir(shards)
                                 if os.path.exists(os.path.join(shards, d, os.path.basename(self.path))))
    mine = self.share_path if share else None
    for path in [self.path] + self._shard_files:
      if os.path.exists(path):
        self._load(path, own=path == mine)

  @property
  def share_path(self) -> str:
    return os.path.join(share_dir(self.path, self.share), os.path.basename(self.path))

  def _load(self, path: str, *, own: bool) -> None:
    rows: dict[str, list[dict]] = {}
    try:
      with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if tuple(reader.fieldnames or ()) != CELL_COLUMNS:
          raise ValueError(f"columns {reader.fieldnames}, expected {list(CELL_COLUMNS)}")
        for i, r in enumerate(reader, start=2):
          if None in r or any(r[c] is None for c in CELL_COLUMNS):
            raise ValueError(f"line {i} has {len(r)} fields, expected {len(CELL_COLUMNS)}")
          row = {"victim": r["victim"], "threat": r["threat"], "budget": float(r["budget"]), "case": r["case"],
                 "metric": r["metric"], "value": float(r["value"]), "cell": r["cell"]}
          rows.setdefault(row["cell"], []).append(row)
    except (OSError, ValueError, csv.Error) as e:
      raise ValueError(f"evaluation cells {path}: cannot read it ({e}); delete it to recompute its cells")
    for key, cell_rows in rows.items():
      if own:
        self._own.append(key)
      if key not in self._rows:  # a cell in the main csv and a shard file: the same finished cell
        self._rows[key] = cell_rows
        self._values[key] = {(r["case"], r["metric"]): r["value"] for r in cell_rows}

  def __contains__(self, cell: Cell | str) -> bool:
    return _key(cell) in self._rows

  def __len__(self) -> int:
    return len(self._rows)

  def missing(self, cells: Iterable[Cell]) -> list[Cell]:
    """The cells not in the table yet (of its share, if it has one), in the given order (duplicates once)."""
    out, seen = [], set()
    for c in cells:
      if self.share and not in_share(c, self.share):
        continue
      if c.key not in self._rows and c.key not in seen:
        out.append(c)
        seen.add(c.key)
    return out

  def add(self, cell: Cell, cases: Sequence[str], metrics: Mapping[str, Sequence[float]]) -> None:
    """Adds a finished cell: `metrics[name]` holds one value per case of `cases`."""
    if cell.key in self._rows:
      raise ValueError(f"cell {cell} is already in {self.path}")
    cases = [str(c) for c in cases]
    if len(set(cases)) != len(cases):
      raise ValueError(f"cell {cell}: case ids are not unique: {cases}")
    values = {}
    for name, v in metrics.items():
      v = np.asarray(v, np.float64).reshape(-1)
      if v.shape != (len(cases),):
        raise ValueError(f"cell {cell}: metric {name!r} has {v.size} values for {len(cases)} cases")
      values[name] = v
    rows = [{"victim": cell.victim, "threat": cell.threat, "budget": float(cell.budget), "case": case,
             "metric": name, "value": float(v[i]), "cell": cell.key}
            for i, case in enumerate(cases) for name, v in values.items()]
    self._rows[cell.key] = rows
    self._values[cell.key] = {(r["case"], r["metric"]): r["value"] for r in rows}
    self._own.append(cell.key)

  def values(self, cell: Cell | str, metric: str, cases: Sequence[str]) -> np.ndarray:
    """(len(cases),) float64 values of `metric` in the order of `cases`; KeyError naming what is absent."""
    key = _key(cell)
    if key not in self._values:
      raise KeyError(f"cell {cell} is not in {self.path}")
    table = self._values[key]
    try:
      return np.asarray([table[(str(c), metric)] for c in cases], np.float64)
    except KeyError as e:
      raise KeyError(f"cell {cell}: no value of metric {metric!r} for case {e.args[0][0]!r}") from None

  def metrics(self, cell: Cell | str) -> list[str]:
    """The metric names of a cell, in insertion order."""
    return list(dict.fromkeys(r["metric"] for r in self._rows[_key(cell)]))

  def rows(self, cells: Iterable[Cell | str] | None = None, **where: Any) -> list[dict]:
    """Rows of `cells` (every cell when None), in that order, whose columns equal `where` (e.g. metric="ce")."""
    keys = list(self._rows) if cells is None else [_key(c) for c in cells]
    out = []
    for k in keys:
      for r in self._rows.get(k, ()):
        if all(_equal(r[col], v) for col, v in where.items()):
          out.append(dict(r))
    return out

  def save(self) -> None:
    """Rewrites the csv atomically (process 0 only): every cell, after which the shard files it read are
    removed (their cells are in the csv now); with a share, only the share's cells to its own file."""
    if not workdir_lib.is_writer():
      return
    if self.share:
      io_utils.write_csv(self.share_path, (r for k in dict.fromkeys(self._own) for r in self._rows[k]),
                         fieldnames=list(CELL_COLUMNS))
      return
    io_utils.write_csv(self.path, (r for rows in self._rows.values() for r in rows), fieldnames=list(CELL_COLUMNS))
    for path in self._shard_files:
      if os.path.exists(path):
        os.remove(path)
    self._shard_files = []


def _equal(a, b) -> bool:
  if isinstance(a, float) or isinstance(b, float):
    return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=0.0)
  return a == b
