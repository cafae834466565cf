"""The robustness study end to end at (smaller than) runlocal size: every output file, sane numbers, resume."""
import csv
import json
import os

import nibabel as nib
import numpy as np
import pytest

from experiments.configs import robustify as robustify_config
from mri_poison import robustify


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


def test_study_end_to_end(tmp_path):
  config = _tiny_config()
  splits = _splits(config)
  workdir = str(tmp_path / "study")
  headline = robustify.run(config, workdir, splits=splits)

  for name in ("report.md", "config.json", "manifest.json", "results/per_case.csv", "results/summary.csv",
               "results/wilcoxon.csv", "results/robust_fraction.csv", "results/sanity.csv",
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

  volumes = sorted(os.listdir(os.path.join(workdir, "volumes")))
  assert len(volumes) == 3
  case = splits["val"][0]
  img = nib.load(os.path.join(workdir, "volumes", f"{case.case_id}_ifgsm_eps0.5.nii.gz"))
  np.testing.assert_allclose(img.affine, case.affine, atol=1e-5)
  delta = np.asarray(img.dataobj) - case.image
  assert np.abs(delta).max() <= 0.5 + 1e-5 and np.all(delta[case.image.sum(-1) == 0] == 0)

  report = open(os.path.join(workdir, "report.md")).read()
  for text in ("default chosen here", "Wilcoxon", "figures/dice_vs_eps.png", "figures/example_slice.png",
               "Dice 1"):
    assert text in report
  assert json.load(open(os.path.join(workdir, "results", "headline.json")))["n_val"] == 3
  assert set(headline["clean_dice"]) == set(robustify.MODELS)

  # A rerun reuses the models and the evaluations and gives the same numbers.
  again = robustify.run(config, workdir, splits=splits)
  assert again["clean_dice"] == headline["clean_dice"]
