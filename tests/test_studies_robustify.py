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

from experiments.configs import reproduce as reproduce_config
from experiments.configs import robustify as robustify_config
from mri_poison import cellstore
from mri_poison import metrics
from mri_poison.defenses import adversarial
from mri_poison.studies import robustify
from mri_poison.studies.robustify import evaluation
from mri_poison.studies.robustify import study as study_lib
from mri_poison.train import workdir as workdir_lib
import rerender  # tests/rerender.py, beside this file


def _splits(config):
  from mri_poison.data.datasets import load_splits
  return load_splits(config.data)


def _tiny_config():
  """The main job's `test` size of this study (two levels, 40 steps, every runlocal attack at 2 eps)."""
  return reproduce_config.get_config("test").robustify


def splits_label(splits, case_id):
  return next(c.label for c in splits["val"] if c.case_id == case_id)


def _read(path):
  with open(path) as f:
    return list(csv.DictReader(f))


@pytest.fixture
def finished_study(main_job_at_test_size):
  """This study as the main job's `test` run finished it (tests/conftest.py): (config, splits, workdir, headline)."""
  config = _tiny_config()
  main_workdir, records, _ = main_job_at_test_size
  return config, _splits(config), os.path.join(main_workdir, "robustify"), records["robustify"]["headline"]


def test_config_variants():
  for v in robustify_config.VARIANTS:
    c = robustify_config.get_config(v)
    assert set(c.attack.attacks) <= set(robustify.ATTACKS)
    assert {"margin", "pgd_temp", "transfer", "targeted_margin"} <= set(c.attack.attacks)  # the adaptive set
    assert c.distill.temperature == 20.0 and adversarial.mix_ratio(c.adversarial) == 0.5
    assert c.adversarial.attack == "pgd"
    assert c.model.input_dtype == "float32"
  # The GPU config runs every attack that needs no other model (transfer_model needs a trained model's folder).
  assert set(robustify_config.get_config("brats").attack.attacks) == set(robustify.ATTACKS) - {"transfer_model"}
  assert robustify_config.get_config("brats").eval.sliding_window
  default = robustify_config.get_config(None)
  assert default.data.n_val >= 20 and max(default.attack.eps) >= 2.0  # n for tests; a grid up to collapse
  assert default.adversarial.eps == default.eval.reference_eps
  assert robustify_config.get_config(None).variant == "phantom"
  with pytest.raises(ValueError, match="variant"):
    robustify_config.get_config("nope")


def test_bad_config_key_is_named(tmp_path):
  config = _tiny_config()
  config.attack.attacks = ("fgsm", "carlini")
  with pytest.raises(ValueError, match="attack.attacks"):
    robustify.run(config, str(tmp_path), splits={"train": [], "val": []})


def test_study_end_to_end(finished_study, tmp_path):
  config, splits, workdir, headline = finished_study

  for name in ("report.md", "config.json", "manifest.json", "results/per_case.csv", "results/summary.csv",
               "results/wilcoxon.csv", "results/robust_fraction.csv", "results/sanity.csv", "results/cells.csv",
               "figures/dice_vs_eps.png", "figures/example_slice.png"):
    assert os.path.getsize(os.path.join(workdir, name)) > 0, name
  for name in ("base", "undefended", "teacher", "distilled", "adversarial"):
    assert os.path.isdir(os.path.join(workdir, "models", name, "checkpoints"))
  with open(os.path.join(workdir, "data.json")) as f:  # which cases each split held
    assert json.load(f)["data"]["case_ids"] == {k: [c.case_id for c in v] for k, v in splits.items()}
  leftovers = [f for _, _, fs in os.walk(workdir) for f in fs if ".tmp" in f]
  assert not leftovers

  rows = _read(os.path.join(workdir, "results", "per_case.csv"))
  # Threats per model: fgsm, pgd, margin, targeted_margin, noise; + transfer (not on the undefended model itself)
  # + pgd_temp (the distilled model only, the one with T != 1). 3 cases, 2 eps, + 2 eps of adaptive rows.
  threats = {"undefended": 5, "distilled": 7, "adversarial": 6}
  assert len(rows) == sum(3 * (1 + 2 * t) + 3 * 2 for t in threats.values())
  for r in rows:
    for col in robustify.DICE_COLUMNS:
      assert 0.0 <= float(r[col]) <= 1.0
  mean = lambda model, attack, eps=None: np.mean([float(r["dice_mean"]) for r in rows if r["model"] == model
                                                  and r["attack"] == attack and (eps is None or float(r["eps"]) == eps)])
  for model in robustify.MODELS:
    clean = mean(model, "clean")
    assert clean > 0.2  # the models learnt something
    for attack in ("fgsm", "pgd", "margin", "adaptive"):
      assert mean(model, attack, 0.5) <= clean + 0.02  # attacks do not help
  # The undefended model under a real attack at the largest eps is hurt more than by the same-eps noise.
  assert mean("undefended", "pgd", 0.5) < mean("undefended", "random_sign", 0.5)

  wil = _read(os.path.join(workdir, "results", "wilcoxon.csv"))
  assert {w["comparison"] for w in wil} == {"clean vs attack", "distilled vs undefended", "adversarial vs undefended",
                                            "distilled vs adversarial"}
  assert all(0.0 <= float(w["p_value"]) <= 1.0 and int(w["n"]) == 3 for w in wil)
  _check_primary_family(wil)
  robust = _read(os.path.join(workdir, "results", "robust_fraction.csv"))
  for r in robust:  # sequential robustness never exceeds robustness to one attack alone
    assert float(r["robust_sequential"]) <= float(r["robust_alone"]) + 1e-9
  sanity_rows = _read(os.path.join(workdir, "results", "sanity.csv"))
  pgd = [s for s in sanity_rows if s["attack"] == "pgd" and s["model"] == "undefended"]
  assert all(float(s["loss_adv"]) > float(s["loss_noise"]) for s in pgd)
  assert all(float(s["ce_increased_fraction"]) == 1.0 for s in pgd)  # plain CE rose from the clean input
  distilled = next(s for s in sanity_rows if s["model"] == "distilled")
  assert 0.0 <= float(distilled["saturated_fraction"]) <= 1.0

  # per_case.csv is a view of the cell table: the same numbers, one cell per (model, threat, eps).
  cells = _read(os.path.join(workdir, "results", "cells.csv"))
  assert len({c["cell"] for c in cells}) == sum(1 + 2 * t for t in threats.values()) == headline["cells_computed"]
  value = {(c["victim"], c["threat"], float(c["budget"]), c["case"], c["metric"]): c["value"] for c in cells}
  # dice_mean averages the regions the gate kept (the clean undefended model learnt them); dice_mean_all is the
  # cell's mean over all three.
  gate = _read(os.path.join(workdir, "results", "gate.csv"))
  assert [g["region"] for g in gate] == ["WT", "TC", "ET"]
  kept = [g["region"] for g in gate if g["learnt"] == "True"]
  assert kept == headline["learnt_regions"]
  clean_und = [r for r in rows if r["model"] == "undefended" and r["attack"] == "clean"]
  for g in gate:
    labels = {"WT": (1, 2, 3), "TC": (1, 3), "ET": (3,)}[g["region"]]
    has = [r for r in clean_und if np.isin(splits_label(splits, r["case"]), labels).any()]
    assert int(g["n_cases"]) == len(has)
    if has:
      np.testing.assert_allclose(float(g["dice"]), np.mean([float(r[f"dice_{g['region']}"]) for r in has]))
  for r in rows:  # an adaptive row is the row of the attack it names
    attack = r["worst_attack"] if r["attack"] == "adaptive" else r["attack"]
    for col in robustify.DICE_COLUMNS[:3] + ("ce", "ce_target"):
      assert r[col] == value[(r["model"], attack, float(r["eps"]), r["case"], col)]
    assert r["dice_mean_all"] == value[(r["model"], attack, float(r["eps"]), r["case"], "dice_mean")]
    np.testing.assert_allclose(float(r["dice_mean"]), np.mean([float(r[f"dice_{k}"]) for k in kept or ("WT", "TC", "ET")]),
                               atol=1e-12)
  # Perceptibility shrinks as eps grows; targeted success was scored.
  psnr = {float(c["budget"]): float(c["value"]) for c in cells
          if c["victim"] == "undefended" and c["threat"] == "pgd" and c["metric"] == "psnr" and c["case"] == rows[0]["case"]}
  assert psnr[0.1] > psnr[0.5] > 0
  targeted = _read(os.path.join(workdir, "results", "targeted.csv"))
  assert {t["attack"] for t in targeted} == {"targeted_margin"}
  assert all(0.0 <= float(t["reached"]) <= 1.0 for t in targeted)

  volumes = sorted(os.listdir(os.path.join(workdir, "volumes")))
  assert len(volumes) == 4  # clean, adversarial, and both predictions
  case = splits["val"][0]
  clean = nib.load(os.path.join(workdir, "volumes", f"{case.case_id}_clean.nii.gz"))
  np.testing.assert_array_equal(np.asarray(clean.dataobj), case.image)
  assert clean.header["descrip"].tobytes().startswith(b"channels t1,t1ce,t2,flair")
  img = nib.load(os.path.join(workdir, "volumes", f"{case.case_id}_pgd_eps0.5.nii.gz"))
  np.testing.assert_allclose(img.affine, case.affine, atol=1e-5)
  delta = np.asarray(img.dataobj) - case.image
  assert np.abs(delta).max() <= 0.5 + 1e-5 and np.all(delta[case.image.sum(-1) == 0] == 0)

  report = open(os.path.join(workdir, "report.md")).read()
  for text in ("default chosen here", "Wilcoxon", "Findings and caveats", "Holm", "sample standard deviation", "figures/dice_vs_eps.png", "figures/example_slice.png",
               "Dice 1", "figures/adaptive_dice_vs_eps.png", "figures/ce_trajectory.png", "Primary comparisons",
               "Masking diagnostics", "eps_1/2", "Targeted attacks", "The paper's numbers", "Relative drop",
               "models/`", "`distilled`: ", "Warm start"):
    assert text in report, text
  # The findings carry the primary comparisons' numbers: every defence's corrected p and CI.
  for w in (w for w in wil if w["family"] == "primary" and w["comparison"].endswith("vs undefended")):
    assert f"{float(w['mean_diff']):+.3f} [95 % CI {float(w['ci_low']):+.3f}, {float(w['ci_high']):+.3f}]" in report
  halving = json.load(open(os.path.join(workdir, "results", "headline.json")))["halving_budget"]
  assert set(halving) == set(robustify.MODELS)
  assert json.load(open(os.path.join(workdir, "results", "headline.json")))["n_val"] == 3
  assert set(headline["clean_dice"]) == set(robustify.MODELS)

  # A rerun reuses the models and the evaluations and gives the same numbers (on a copy: the run is shared).
  copy = str(tmp_path / "study")
  shutil.copytree(workdir, copy)
  again = robustify.run(config, copy, splits=splits)
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
  # One more eps; one of the six attacks (fewer new compilations, and dropping attacks must keep the rest).
  config.attack.update(dict(eps=(0.1, 0.3, 0.5), attacks=("fgsm",)))
  headline = robustify.run(config, workdir, splits=splits)

  threats = ("fgsm", robustify.NOISE)
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
  assert [r for r in rows if float(r["eps"]) != 0.3 and r["attack"] != "adaptive"] == kept
  adaptive = len(robustify.MODELS) * 3 * 3  # now over fgsm alone, at 3 eps
  assert len(rows) == len(kept) + len(robustify.MODELS) * len(threats) * 3 + adaptive


def test_an_attack_from_the_zoo_joins_the_adaptive_threat_by_config_alone(finished_study, tmp_path):
  """APGD with SEA's JS loss, named in the config only: its cells are the only new ones, the adaptive threat takes
  it into account and results/adaptive_members.csv says what it adds."""
  config, splits, finished, _ = finished_study
  workdir = str(tmp_path / "study")
  shutil.copytree(finished, workdir)
  config = _tiny_config()
  config.attack.update(dict(attacks=tuple(config.attack.attacks) + ("apgd_js",), apgd_steps=4))
  headline = robustify.run(config, workdir, splits=splits)
  assert headline["cells_computed"] == len(robustify.MODELS) * len(config.attack.eps)
  rows = _read(os.path.join(workdir, "results", "per_case.csv"))
  dice = {(r["model"], r["attack"], float(r["eps"]), r["case"]): float(r["dice_mean"]) for r in rows}
  adaptive = [r for r in rows if r["attack"] == "adaptive"]
  assert adaptive and all(float(r["dice_mean"]) <= dice[(r["model"], "apgd_js", float(r["eps"]), r["case"])]
                          for r in adaptive)
  members = _read(os.path.join(workdir, "results", "adaptive_members.csv"))
  for model in robustify.MODELS:
    own = [m for m in members if m["model"] == model]
    assert "apgd_js" in {m["attack"] for m in own}
    assert abs(sum(float(m["worst_fraction"]) for m in own) - 1.0) < 1e-9  # each case has one worst attack
    assert all(float(m["mean_diff"]) >= 0 and float(m["mean_b"]) <= float(m["dice_alone"]) + 1e-12 for m in own)
  report = open(os.path.join(workdir, "report.md")).read()
  assert "`apgd_js`: APGD" in report and "What each attack adds to the adaptive threat" in report


def test_transfer_from_another_trained_model(finished_study, tmp_path):
  """attack.transfer_model replays another model's PGD examples on every victim (here the study's own `base`
  model; any architecture works the same way); a missing model is one error before anything is written."""
  config, splits, finished, _ = finished_study
  workdir = str(tmp_path / "study")
  shutil.copytree(finished, workdir)
  config = _tiny_config()
  config.attack.attacks = ("pgd", "transfer_model")
  config.attack.transfer_model = str(tmp_path / "nowhere")
  before = sorted(os.listdir(workdir))
  with pytest.raises(ValueError, match=r"attack.transfer_model=.*nowhere.*\['transfer_model'\]"):
    robustify.run(config, workdir, splits=splits)
  assert sorted(os.listdir(workdir)) == before
  config.attack.transfer_model = os.path.join(workdir, "models", "base")
  headline = robustify.run(config, workdir, splits=splits)
  assert headline["cells_computed"] == len(robustify.MODELS) * len(config.attack.eps)  # transfer_model's only
  rows = _read(os.path.join(workdir, "results", "per_case.csv"))
  got = {(r["model"], float(r["eps"]), r["case"]): float(r["dice_mean"]) for r in rows
         if r["attack"] == "transfer_model"}
  pgd = {(r["model"], float(r["eps"]), r["case"]): float(r["dice_mean"]) for r in rows if r["attack"] == "pgd"}
  assert set(got) == set(pgd)
  assert got != pgd  # other examples than each model's own PGD
  assert "`transfer_model`'s source: `" + config.attack.transfer_model in open(os.path.join(workdir, "report.md")).read()


def test_report_renders_again_from_the_result_files_alone(finished_study, tmp_path):
  """experiments.render rebuilds report.md from results/, headline.json and config.json: the same text, with no
  model, cell table or compiler in reach (they are deleted first)."""
  import subprocess
  import sys
  _, _, finished, _ = finished_study
  def command_line(workdir):
    out = subprocess.run([sys.executable, "-m", "experiments.render", "--workdir", workdir], capture_output=True,
                         text=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), check=True)
    assert "report.md" in out.stdout

  rerender.check(robustify.render, finished, str(tmp_path / "study"), rerender=command_line,
                 leave_out=shutil.ignore_patterns("models", "cells.csv"), missing="summary.csv")


def test_array_shares_compute_the_cells_and_a_last_run_reports(finished_study, tmp_path):
  config, splits, finished, _ = finished_study
  workdir = tmp_path / "study"
  shutil.copytree(os.path.join(finished, "models"), workdir / "models")  # trained by an eval.cells=none run
  shutil.copy(os.path.join(finished, "config.json"), workdir)
  reference = cellstore.CellTable(os.path.join(finished, "results", "cells.csv"))
  config = _tiny_config()
  # Clean + (fgsm, random sign) at one eps, per model: 9 cells.
  config.attack.update(dict(attacks=("fgsm",), eps=(0.5,)))
  keys = []
  for i in range(2):
    config.eval.cells = f"{i}/2"
    out = robustify.run(config, str(workdir), splits=splits)
    # Shares split the cells by key hash, so one share may hold none of these 9 (the union is checked below).
    assert out["share"] == [i, 2] and out["cells_computed"] == out["cells_in_share"]
    shard = workdir / "results" / "shards" / f"{i}-of-2" / "cells.csv"
    keys.append({r["cell"] for r in _read(shard)} if out["cells_computed"] else set())
    assert len(keys[-1]) == out["cells_computed"]
  assert not keys[0] & keys[1] and len(keys[0] | keys[1]) == 9
  assert not os.path.exists(workdir / "results" / "cells.csv") and not os.path.exists(workdir / "report.md")
  # Each share computed what the full run computed for those cells (same keys: same params, settings, data).
  merged = cellstore.CellTable(str(workdir / "results" / "cells.csv"))
  assert len(merged) == 9
  for key in keys[0] | keys[1]:
    assert merged.metrics(key) == reference.metrics(key)
    for m in merged.metrics(key):
      np.testing.assert_allclose(merged.values(key, m, [c.case_id for c in splits["val"]]),
                                 reference.values(key, m, [c.case_id for c in splits["val"]]), rtol=1e-6, atol=1e-7)
  # The last run computes nothing, folds the shares into cells.csv and writes the report.
  config.eval.cells = "all"
  headline = robustify.run(config, str(workdir), splits=splits)
  assert headline["cells_computed"] == 0 and os.path.exists(workdir / "report.md")
  assert {r["cell"] for r in _read(workdir / "results" / "cells.csv")} == keys[0] | keys[1]
  assert not any(os.path.exists(workdir / "results" / "shards" / f"{i}-of-2" / "cells.csv") for i in range(2))


def test_a_share_needs_trained_models(tmp_path):
  config = _tiny_config()
  config.eval.cells = "1/4"
  with pytest.raises(FileNotFoundError, match="eval.cells='1/4': model undefended is not trained"):
    robustify.run(config, str(tmp_path / "empty"), splits=_splits(config))
  for bad in ("4/4", "x", "1/0"):
    config.eval.cells = bad
    with pytest.raises(ValueError, match="config eval.cells="):
      robustify.run(config, str(tmp_path / "empty"), splits=_splits(config))
  assert os.listdir(tmp_path / "empty") == []


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
  table = cellstore.CellTable(str(tmp_path / "cells.csv"))
  key = jax.random.PRNGKey(0)
  with _TraceCounter() as check:  # the counter sees a trace
    jax.jit(lambda v: v + 1)(np.float32(0))
  assert len(check.names) == 1
  # Two victims of one architecture through the study's evaluation path, which rebuilds its loss hooks and
  # looks up its scorer from the config on every call: after the first victim nothing may be traced again,
  # neither the scorer nor an attack's sweep (a fresh table, so every cell is computed for both).
  # The adversarial victim also gets `transfer`, the undefended model's PGD: the same compiled sweep.
  done = {}
  sources = {"own": {"params": params["undefended"], "key": jax.random.fold_in(key, 0), "digest": "undefended",
                     "apply_fn": evaluation.deployed_apply_fn(config)}}
  with _TraceCounter() as first:
    done["undefended"] = evaluation.evaluate_victim(table, "undefended", params["undefended"], data, config,
                                                    jax.random.fold_in(key, 0), sources=sources)
  with _TraceCounter() as second:
    done["adversarial"] = evaluation.evaluate_victim(table, "adversarial", params["adversarial"], data, config,
                                                     jax.random.fold_in(key, 2), sources=sources)
  assert len(done["undefended"]) == 1 + 5 * 2 and len(done["adversarial"]) == 1 + 6 * 2
  assert second.names == [], f"retraced for a second victim: {second.names} (first victim: {first.names})"
  ce = lambda v, t="pgd": table.values(next(c for c in done[v] if c.threat == t and c.budget == 0.5), "ce",
                                       data["case_id"])
  assert not np.array_equal(ce("undefended"), ce("adversarial"))  # the second params did reach the attack
  assert not np.array_equal(ce("adversarial"), ce("adversarial", "transfer"))
  assert evaluation.evaluate_victim(table, "undefended", params["undefended"], data, config,
                                    jax.random.fold_in(key, 0), sources=sources) == []


def _check_primary_family(wil):
  """The pre-declared primary comparisons are Holm-corrected as ONE family; the rest are uncorrected."""
  primary = [w for w in wil if w["family"] == "primary"]
  # each defence vs undefended under the adaptive attack, each attack on the undefended model vs clean
  assert sorted((w["comparison"], w["attack"]) for w in primary) == sorted(
      [("distilled vs undefended", "adaptive"), ("adversarial vs undefended", "adaptive")]
      + [("clean vs attack", a) for a in ("fgsm", "pgd", "margin", "targeted_margin")])
  assert all(float(w["eps"]) == 0.5 and w["region"] == "mean" for w in primary)
  np.testing.assert_allclose([float(w["p_holm"]) for w in primary],
                             metrics.holm([float(w["p_value"]) for w in primary]))
  assert all(np.isnan(float(w["p_holm"])) for w in wil if w["family"] == "exploratory")


def test_adaptive_is_never_better_than_any_single_attack(finished_study):
  _, _, workdir, _ = finished_study
  rows = _read(os.path.join(workdir, "results", "per_case.csv"))
  singles = {}
  for r in rows:
    if r["attack"] not in ("clean", "adaptive", robustify.NOISE):
      singles.setdefault((r["model"], r["eps"], r["case"]), []).append(float(r["dice_mean"]))
  adaptive = [r for r in rows if r["attack"] == "adaptive"]
  assert len(adaptive) == len(singles) == 3 * 2 * 3
  for r in adaptive:
    single = singles[(r["model"], r["eps"], r["case"])]
    assert float(r["dice_mean"]) <= min(single) and float(r["dice_mean"]) in single
  # The distilled model's adaptive set includes the temperature-scaled and the transferred attacks.
  assert {r["worst_attack"] for r in adaptive} <= set(robustify.ATTACKS)


def test_adaptive_rows_pick_the_worst_attack_per_case():
  rows = [{"model": "m", "attack": a, "eps": 0.1, "case": c, "dice_mean": v}
          for a, vals in (("fgsm", (0.5, 0.2)), ("pgd", (0.3, 0.4)), ("margin", (0.3, 0.9))) for c, v in zip("xy", vals)]
  out = evaluation.adaptive_rows(rows, ("fgsm", "pgd", "margin"), [0.1])
  assert [(r["case"], r["worst_attack"], r["dice_mean"]) for r in out] == [("x", "pgd", 0.3), ("y", "fgsm", 0.2)]


def test_a_defence_is_called_more_robust_only_when_test_and_ci_agree():
  from mri_poison.studies.robustify.report import defence_verdict
  def row(p, lo, hi):
    r = dict(p_holm=p, ci_low=lo, ci_high=hi, mean_diff=(lo + hi) / 2)
    return dict(r, claimed=evaluation.is_claimed(r))
  assert defence_verdict(row(0.01, 0.05, 0.30)) == "significantly MORE robust than"
  assert defence_verdict(row(0.01, -0.30, -0.05)) == "significantly LESS robust than"
  # A signed-rank rejection whose mean-difference CI covers 0 (seen at n = 20: +0.026 [-0.010, +0.060], p 0.04).
  assert defence_verdict(row(0.04, -0.010, 0.060)).startswith("not clearly different from")
  assert defence_verdict(row(0.30, 0.01, 0.20)) == "not significantly different from"


def test_halving_budget_on_known_curves():
  clean = np.ones(4)
  # log-linear between grid points: 0.75 at 0.1 and 0.25 at 1 -> 0.5 at sqrt(0.1)
  dice = np.array([[0.75] * 4, [0.25] * 4])
  assert robustify.halving_budget([0.1, 1.0], dice, clean) == pytest.approx(np.sqrt(0.1))
  # linear below the first grid point: 0 at eps 0 (Dice 1) to 0.2 (Dice 0) -> 0.1
  assert robustify.halving_budget([0.2, 2.0], np.zeros((2, 4)), clean) == pytest.approx(0.1)
  assert robustify.halving_budget([0.1, 1.0], np.full((2, 4), 0.6), clean) == np.inf  # never halves
  # Per-case curves of known halving budgets: the bootstrap CI brackets the point estimate.
  rng = np.random.default_rng(0)
  eps = np.geomspace(0.01, 10, 13)
  e_half = rng.uniform(0.2, 0.5, 20)
  per_case = 1.0 / (1.0 + eps[:, None] / e_half[None])  # halves exactly at e_half per case
  res = robustify.halving_budget_ci(eps, per_case, np.ones(20), n_boot=200)
  assert res["ci_low"] <= res["eps_half"] <= res["ci_high"]
  assert 0.2 < res["ci_low"] and res["ci_high"] < 0.5 and res["never_halved_fraction"] == 0.0


def test_eps_scale_per_channel_range():
  x = np.zeros((2, 4, 4, 4, 2), np.float32)
  x[0, 1:3, 1:3, 1:3, 0] = [[[1, 3], [2, 2]], [[2, 2], [2, 2]]]
  x[0, 1:3, 1:3, 1:3, 1] = 5.0
  x[1, 1:3, 1:3, 1:3] = 1.0
  brain = np.any(x != 0, axis=-1)
  scale = evaluation.eps_scale(x, brain, "per_channel_range")
  assert scale.shape == (2, 1, 1, 1, 2)
  np.testing.assert_allclose(scale[0].ravel(), [2.0, 1e-6])  # range over brain voxels only, floored
  np.testing.assert_array_equal(evaluation.eps_scale(x, brain, "absolute"), np.ones((2, 1, 1, 1, 2)))
  with pytest.raises(ValueError, match="attack.eps_mode"):
    evaluation.eps_scale(x, brain, "relative")


def test_deployed_sliding_window_path():
  """eval.sliding_window routes attacks and scoring through windowed inference (its numerics, e.g. one window
  covering the volume == the whole-volume model, are tests/test_attacks_sliding_window.py's), and its cells
  are keyed apart from whole-volume ones."""
  config = _tiny_config()
  config.model.features = (4, 8)
  config.data.update(dict(shape=(8, 8, 8), patch_shape=(8, 8, 8)))
  whole = evaluation.deployed_apply_fn(config)
  config.eval.sliding_window = True
  windowed = evaluation.deployed_apply_fn(config)
  assert windowed.window == (8, 8, 8) and windowed == evaluation.deployed_apply_fn(config)  # one compile
  assert windowed.apply_fn is whole and windowed.overlap == config.eval.overlap
  config.eval.window = (4, 8, 8)
  assert evaluation.deployed_apply_fn(config).window == (4, 8, 8)
  data = {"case_id": ["a"], "digest": "d"}
  keyed = lambda c: {k: v.key for k, v in evaluation.victim_cells("undefended", "p", jax.random.PRNGKey(0), data,
                                                                  c).items()}
  plain = _tiny_config()
  assert set(keyed(plain).values()).isdisjoint(keyed(config).values())
