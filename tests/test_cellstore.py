"""cellstore: digests, evaluation cells and their table, shares for array jobs, multi-process case batches."""
import os

import jax.numpy as jnp
import numpy as np
import pytest

from mri_poison import cellstore


def _cell(**changes):
  parts = dict(victim="undefended", threat="pgd", budget=0.1, params="p0", settings={"steps": 5, "seed": 0},
               cases=["c0", "c1"], version=1)
  parts.update(changes)
  victim, threat, budget = parts.pop("victim"), parts.pop("threat"), parts.pop("budget")
  return cellstore.make_cell(victim, threat, budget, **parts)


def test_digest_is_canonical():
  assert cellstore.digest({"a": 1, "b": [1, 2]}) == cellstore.digest({"b": [1, 2], "a": 1})
  assert cellstore.digest({"a": 1}) != cellstore.digest({"a": 1.0})  # an int setting is not a float one
  assert cellstore.digest({"a": np.float32(0.5)}) == cellstore.digest({"a": 0.5})
  assert len(cellstore.digest("x")) == 16


def test_tree_digest_sees_every_byte_dtype_and_shape():
  params = {"conv": {"kernel": np.arange(12, dtype=np.float32).reshape(3, 4), "bias": np.zeros(4, np.float32)}}
  d = cellstore.tree_digest(params)
  assert d == cellstore.tree_digest({"conv": {"bias": jnp.zeros(4), "kernel": jnp.arange(12.0).reshape(3, 4)}})
  changed = {"conv": dict(params["conv"], kernel=params["conv"]["kernel"].copy())}
  changed["conv"]["kernel"][2, 3] = np.nextafter(np.float32(11), np.float32(12))  # one ulp
  assert cellstore.tree_digest(changed) != d
  assert cellstore.tree_digest({"conv": dict(params["conv"], kernel=params["conv"]["kernel"].reshape(4, 3))}) != d
  assert cellstore.tree_digest({"conv": dict(params["conv"], bias=np.zeros(4, np.float64))}) != d
  assert cellstore.tree_digest({"conv2": params["conv"]}) != d  # a renamed layer is another model


def test_cell_key_depends_on_each_part_only():
  base = _cell()
  assert _cell() == base
  for change in (dict(victim="distilled"), dict(threat="segpgd"), dict(budget=0.2), dict(params="p1"),
                 dict(settings={"steps": 6, "seed": 0}), dict(cases=["c0", "c2"]), dict(version=2),
                 dict(data="d1")):
    assert _cell(**change).key != base.key, change
  assert (base.victim, base.threat, base.budget) == ("undefended", "pgd", 0.1)


def test_cell_table_round_trip_is_exact(tmp_path):
  path = str(tmp_path / "results" / "cells.csv")
  table = cellstore.CellTable(path)
  a, b = _cell(), _cell(budget=0.2)
  assert table.missing([a, b, a]) == [a, b]
  ce = np.asarray([0.1, 1 / 3], np.float32)  # float32 results must come back bit for bit
  tiny = [1e-300, float("nan")]
  table.add(a, ["c0", "c1"], {"ce": ce, "odd": tiny})
  assert table.missing([a, b]) == [b] and a in table and len(table) == 1
  with pytest.raises(ValueError, match="already"):
    table.add(a, ["c0", "c1"], {"ce": ce})
  with pytest.raises(ValueError, match="2 cases"):
    table.add(b, ["c0", "c1"], {"ce": [0.5]})
  table.add(b, ["c0", "c1"], {"ce": [0.25, 0.75]})
  table.save()

  again = cellstore.CellTable(path)
  assert len(again) == 2 and again.missing([a, b]) == []
  np.testing.assert_array_equal(again.values(a, "ce", ["c0", "c1"]).astype(np.float32), ce)
  np.testing.assert_array_equal(again.values(a, "ce", ["c1", "c0"]), ce[::-1].astype(np.float64))
  odd = again.values(a, "odd", ["c0", "c1"])
  assert odd[0] == 1e-300 and np.isnan(odd[1])
  assert again.metrics(a) == ["ce", "odd"]
  rows = again.rows(cells=[b], case="c1")
  assert rows == [{"victim": "undefended", "threat": "pgd", "budget": 0.2, "case": "c1", "metric": "ce",
                   "value": 0.75, "cell": b.key}]
  assert len(again.rows(metric="ce")) == 4 and len(again.rows(budget=0.1)) == 4
  with pytest.raises(KeyError, match="c9"):
    again.values(a, "ce", ["c9"])

  # Re-saving what was loaded gives the same bytes: old cells never drift.
  before = open(path, "rb").read()
  again.save()
  assert open(path, "rb").read() == before
  assert before.decode().splitlines()[0] == ",".join(cellstore.CELL_COLUMNS)
  assert not [f for f in os.listdir(os.path.dirname(path)) if ".tmp" in f]


def test_cell_table_names_a_bad_file(tmp_path):
  path = tmp_path / "cells.csv"
  path.write_text("victim,threat\nx,y\n")
  with pytest.raises(ValueError, match="cells.csv"):
    cellstore.CellTable(str(path))
  path.write_text(",".join(cellstore.CELL_COLUMNS) + "\nv,t,not-a-number,c,m,1.0,k\n")
  with pytest.raises(ValueError, match="delete it"):
    cellstore.CellTable(str(path))


def test_map_case_batches_concatenates_in_case_order_exactly():
  seen = []
  x = np.random.default_rng(0).normal(size=7).astype(np.float32)

  def compute(sl):
    seen.append((sl.start, sl.stop))
    return {"value": x[sl], "by_eps": {"0": (x[sl] * 2).tolist(), "1": [float("nan")] * (sl.stop - sl.start)}}

  out = cellstore.map_case_batches(7, 3, compute)
  assert seen == [(0, 3), (3, 6), (6, 7)]  # one process: every batch, in order
  assert out["value"] == [float(v) for v in x]  # float32 -> float, exactly, through JSON
  assert out["by_eps"]["0"] == [float(v) * 2 for v in x] and all(np.isnan(out["by_eps"]["1"]))
  assert cellstore.map_case_batches(0, 3, compute) == {}
  assert cellstore.case_batches(5, 2) == [slice(0, 2), slice(2, 4), slice(4, 5)]
  assert cellstore.own_batches(3) == [0, 1, 2]


def test_cell_shares_partition_the_cells_and_fold_into_one_table(tmp_path):
  assert cellstore.parse_cells("all") == "all" and cellstore.parse_cells(" none") == "none"
  assert cellstore.parse_cells("3/8") == (3, 8)
  for bad in ("8/8", "-1/2", "a/b", "1", ""):
    with pytest.raises(ValueError, match=f"config eval.cells='{bad.strip()}'"):
      cellstore.parse_cells(bad)
  cells = [cellstore.make_cell("v", "pgd", e, params="p", settings={}, cases=["a", "b"], version=1)
           for e in np.linspace(0.1, 2.0, 40)]
  path = str(tmp_path / "results" / "cells.csv")
  shares = [cellstore.CellTable(path, share=(i, 3)) for i in range(3)]
  todo = [t.missing(cells) for t in shares]
  assert sorted(c.key for c in sum(todo, [])) == sorted(c.key for c in cells)  # each cell in exactly one share
  assert all(todo)
  for t, mine in zip(shares, todo):
    for c in mine:
      t.add(c, ["a", "b"], {"dice": [c.budget, -c.budget]})
    t.save()
    assert os.path.exists(t.share_path) and not os.path.exists(path)
  # A share reloads its own cells; every table sees all of them; a full save folds them into the one csv.
  assert cellstore.CellTable(path, share=(1, 3)).missing(cells) == []
  full = cellstore.CellTable(path)
  assert full.missing(cells) == [] and len(full) == 40
  full.save()
  assert not any(os.path.exists(t.share_path) for t in shares)
  reread = cellstore.CellTable(path)
  np.testing.assert_array_equal(reread.values(cells[7], "dice", ["b", "a"]), [-cells[7].budget, cells[7].budget])
