"""The robustness study end to end at (smaller than) runlocal size: every output file, sane numbers, resume,
extension by evaluation cells, and one compilation per architecture across victims."""
import csv
import json
import os
import shutil

import jax
import nibabel as nib
import numpy as np
import pytest

from experiments.configs import robustify as robustify_config
from mri_poison.studies import common
from mri_poison.studies import robustify
from mri_poison.studies.robustify import evaluation
from mri_poison.studies.robustify import study as study_lib
from mri_poison.train import workdir as workdir_lib


def _splits(config):
  from mri_poison.data.datasets import load_splits
  return load_splits(config.data)


def _tiny_config():
  config = robustify_config.get_config("runlocal")
  config.data.update(dict(n_cases=7, n_val=3))
  config.train.update(dict(steps=16, ckpt_every=16, log_every=8))
  config.attack.update(dict(eps=(0.1, 0.5), steps=2, batch=3))
  config.eval.update(dict(reference_eps=0.5, example_eps=0.5))
  return config


def _read(path):
  with open(path) as f:
    return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def finished_study(tmp_path_factory):
  """A tiny study run once for the module: (config, splits, workdir, headline)."""
  config = _tiny_config()
  splits = _splits(config)
  workdir = str(tmp_path_factory.mktemp("robustify") / "study")
  headline = robustify.run(config, workdir, splits=splits)
  return config, splits, workdir, headline


def test_config_variants():
  for v in robustify_config.VARIANTS:
    c = robustify_config.get_config(v)
    assert set(c.attack.attacks) == set(robustify.ATTACKS)
    assert c.distill.temperature == 20.0 and c.adversarial.ratio == 0.5
  assert robustify_config.get_config(None).variant == "phantom"
  with pytest.raises(ValueError, match="variant"):
    robustify_config.get_config("nope")


def test_bad_config_key_is_named(tmp_path):
  config = _tiny_config()
  config.attack.attacks = ("fgsm", "carlini")
  with pytest.raises(ValueError, match="attack.attacks"):
    robustify.run(config, str(tmp_path), splits={"train": [], "val": []})


def test_study_end_to_end(finished_study):
  config, splits, workdir, headline = finished_study

  for name in ("report.md", "config.json", "manifest.json", "results/per_case.csv", "results/summary.csv",
               "results/wilcoxon.csv", "results/robust_fraction.csv", "results/sanity.csv", "results/cells.csv",
               "figures/dice_vs_eps.png", "figures/example_slice.png"):
    assert os.path.getsize(os.path.join(workdir, name)) > 0, name
  for name in ("base", "undefended", "teacher", "distilled", "adversarial"):
    assert os.path.isdir(os.path.join(workdir, "models", name, "checkpoints"))
  leftovers = [f for _, _, fs in os.walk(workdir) for f in fs if ".tmp" in f]
  assert not leftovers

  rows = _read(os.path.join(workdir, "results", "per_case.csv"))
  attacks = robustify.ATTACKS + (robustify.NOISE,)
  # 3 models x 3 cases x (clean + 7 attacks x 2 eps)
  assert len(rows) == 3 * 3 * (1 + len(attacks) * 2)
  for r in rows:
    for col in robustify.DICE_COLUMNS:
      assert 0.0 <= float(r[col]) <= 1.0
  mean = lambda model, attack, eps=None: np.mean([float(r["dice_mean"]) for r in rows if r["model"] == model
                                                  and r["attack"] == attack and (eps is None or float(r["eps"]) == eps)])
  for model in robustify.MODELS:
    clean = mean(model, "clean")
    assert clean > 0.2  # the models learnt something
    for attack in ("fgsm", "ifgsm", "pgd"):
      assert mean(model, attack, 0.5) <= clean + 0.02  # attacks do not help
  # The undefended model under a real attack at the largest eps is hurt more than by the same-eps noise.
  assert mean("undefended", "ifgsm", 0.5) < mean("undefended", "random_sign", 0.5)

  wil = _read(os.path.join(workdir, "results", "wilcoxon.csv"))
  assert {w["comparison"] for w in wil} == {"clean vs attack", "distilled vs undefended", "adversarial vs undefended",
                                            "distilled vs adversarial"}
  assert all(0.0 <= float(w["p_value"]) <= 1.0 and int(w["n"]) == 3 for w in wil)
  robust = _read(os.path.join(workdir, "results", "robust_fraction.csv"))
  for r in robust:  # sequential robustness never exceeds robustness to one attack alone
    assert float(r["robust_sequential"]) <= float(r["robust_alone"]) + 1e-9
  sanity_rows = _read(os.path.join(workdir, "results", "sanity.csv"))
  ifgsm = [s for s in sanity_rows if s["attack"] == "ifgsm" and s["model"] == "undefended"]
  assert all(float(s["loss_adv"]) > float(s["loss_noise"]) for s in ifgsm)
  assert all(float(s["loss_increased_fraction"]) == 1.0 for s in ifgsm)

  # per_case.csv is a view of the cell table: the same numbers, one cell per (model, threat, eps).
  cells = _read(os.path.join(workdir, "results", "cells.csv"))
  assert len({c["cell"] for c in cells}) == 3 * (1 + len(attacks) * 2) == headline["cells_computed"]
  value = {(c["victim"], c["threat"], float(c["budget"]), c["case"], c["metric"]): c["value"] for c in cells}
  for r in rows:
    for col in robustify.DICE_COLUMNS + ("ce", "ce_target"):
      assert r[col] == value[(r["model"], r["attack"], float(r["eps"]), r["case"], col)]

  volumes = sorted(os.listdir(os.path.join(workdir, "volumes")))
  assert len(volumes) == 4  # clean, adversarial, and both predictions
  case = splits["val"][0]
  clean = nib.load(os.path.join(workdir, "volumes", f"{case.case_id}_clean.nii.gz"))
  np.testing.assert_array_equal(np.asarray(clean.dataobj), case.image)
  assert clean.header["descrip"].tobytes().startswith(b"channels t1,t1ce,t2,flair")
  img = nib.load(os.path.join(workdir, "volumes", f"{case.case_id}_ifgsm_eps0.5.nii.gz"))
  np.testing.assert_allclose(img.affine, case.affine, atol=1e-5)
  delta = np.asarray(img.dataobj) - case.image
  assert np.abs(delta).max() <= 0.5 + 1e-5 and np.all(delta[case.image.sum(-1) == 0] == 0)

  report = open(os.path.join(workdir, "report.md")).read()
  for text in ("default chosen here", "Wilcoxon", "Findings and caveats", "Holm", "sample standard deviation", "figures/dice_vs_eps.png", "figures/example_slice.png",
               "Dice 1"):
    assert text in report
  assert json.load(open(os.path.join(workdir, "results", "headline.json")))["n_val"] == 3
  assert set(headline["clean_dice"]) == set(robustify.MODELS)

  # A rerun reuses the models and the evaluations and gives the same numbers.
  again = robustify.run(config, workdir, splits=splits)
  assert again["clean_dice"] == headline["clean_dice"]
  assert again["cells_computed"] == 0


def test_extending_by_one_eps_computes_only_the_new_cells(finished_study, tmp_path, monkeypatch):
  config, splits, finished, _ = finished_study
  workdir = str(tmp_path / "study")
  shutil.copytree(finished, workdir)
  cells_path = os.path.join(workdir, "results", "cells.csv")
  old_lines = open(cells_path).read().splitlines()
  old_rows = _read(os.path.join(workdir, "results", "per_case.csv"))

  calls = []
  attack_volumes = evaluation.attack_volumes

  def counting(name, *args, **kwargs):
    calls.append((name, [float(e) for e in args[5]]))  # args: apply_fn, params, x, labels, brain, eps, ...
    return attack_volumes(name, *args, **kwargs)

  monkeypatch.setattr(evaluation, "attack_volumes", counting)
  # The clean cells (scores and input-gradient sanity) must not be recomputed: calling this would fail.
  monkeypatch.setattr(evaluation.sanity, "gradient_sanity", None)
  config = _tiny_config()
  # One more eps; two of the six attacks (fewer new compilations, and dropping attacks must keep the rest).
  config.attack.update(dict(eps=(0.1, 0.3, 0.5), attacks=("fgsm", "pgd")))
  headline = robustify.run(config, workdir, splits=splits)

  threats = ("fgsm", "pgd", robustify.NOISE)
  assert headline["cells_computed"] == len(robustify.MODELS) * len(threats)
  # One compiled sweep per (model, threat) over the missing eps only (3 cases = one volume batch).
  assert sorted(calls) == sorted((t, [float(np.float32(0.3))]) for t in threats for _ in robustify.MODELS)
  # The old cells' rows are byte-identical and first; only rows of eps 0.3 were added.
  new_lines = open(cells_path).read().splitlines()
  assert new_lines[:len(old_lines)] == old_lines
  assert {line.split(",")[2] for line in new_lines[len(old_lines):]} == {"0.3"}
  # per_case.csv keeps every old number of these threats and gains the new eps.
  rows = _read(os.path.join(workdir, "results", "per_case.csv"))
  kept = [r for r in old_rows if r["attack"] in ("clean",) + threats]
  assert [r for r in rows if float(r["eps"]) != 0.3] == kept
  assert len(rows) == len(kept) + len(robustify.MODELS) * len(threats) * 3


def test_training_keys_cannot_change_in_a_finished_workdir(finished_study, tmp_path):
  config, splits, finished, _ = finished_study
  workdir = str(tmp_path / "study")
  shutil.copytree(finished, workdir)
  before = _snapshot(workdir)
  config = _tiny_config()
  config.train.lr = 1e-2
  with pytest.raises(workdir_lib.WorkdirError, match="train.lr"):
    robustify.run(config, workdir, splits=splits)
  assert _snapshot(workdir) == before  # every file of the finished run byte-identical


def test_a_data_error_writes_nothing(tmp_path):
  from mri_poison.data.case import DataError
  config = _tiny_config()
  config.data.update(dict(source="brats", root=str(tmp_path / "no_such_root")))
  with pytest.raises(DataError, match="no_such_root"):
    robustify.run(config, str(tmp_path / "study"))
  assert _snapshot(tmp_path / "study") == {}


def _snapshot(folder):
  out = {}
  for root, _, files in os.walk(folder):
    for f in files:
      path = os.path.join(root, f)
      out[os.path.relpath(path, folder)] = open(path, "rb").read()
  return out


class _TraceCounter:
  """Names of the functions jax traces (top-level jit traces: a retrace of an attack or the scorer shows here)."""

  def __enter__(self):
    self.names = []
    self._listener = lambda event, _, **kw: (self.names.append(kw.get("fun_name", "?"))
                                             if event == "/jax/core/compile/jaxpr_trace_duration" else None)
    jax.monitoring.register_event_duration_secs_listener(self._listener)
    return self

  def __exit__(self, *exc):
    jax.monitoring.unregister_event_duration_listener(self._listener)


def test_second_victim_reuses_the_compiled_scorer_and_attacks(finished_study, tmp_path):
  config, splits, workdir, _ = finished_study
  params = robustify.train_models(config, workdir, splits["train"])  # restored from the checkpoints
  data = study_lib._stack(splits["val"])  # pylint: disable=protected-access
  table = common.CellTable(str(tmp_path / "cells.csv"))
  key = jax.random.PRNGKey(0)
  with _TraceCounter() as check:  # the counter sees a trace
    jax.jit(lambda v: v + 1)(np.float32(0))
  assert len(check.names) == 1
  # Two victims of one architecture through the study's evaluation path, which rebuilds its loss hooks and
  # looks up its scorer from the config on every call: after the first victim nothing may be traced again,
  # neither the scorer nor an attack's sweep (a fresh table, so every cell is computed for both).
  done = {}
  with _TraceCounter() as first:
    done["undefended"] = evaluation.evaluate_victim(table, "undefended", params["undefended"], data, config,
                                                    jax.random.fold_in(key, 0))
  with _TraceCounter() as second:
    done["distilled"] = evaluation.evaluate_victim(table, "distilled", params["distilled"], data, config,
                                                   jax.random.fold_in(key, 1))
  assert len(done["distilled"]) == len(done["undefended"]) == 1 + 7 * 2
  assert second.names == [], f"retraced for a second victim: {second.names} (first victim: {first.names})"
  ce = lambda v: table.values(next(c for c in done[v] if c.threat == "pgd" and c.budget == 0.5), "ce",
                              data["case_id"])
  assert not np.array_equal(ce("undefended"), ce("distilled"))  # the second params did reach the attack
  assert evaluation.evaluate_victim(table, "undefended", params["undefended"], data, config,
                                    jax.random.fold_in(key, 0)) == []
