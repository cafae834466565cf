"""The learnt-region gate: presence, Dice, the intensity-only baseline and the verdicts, with numbers."""
import numpy as np
import pytest

from mri_poison import metrics
from mri_poison.data.case import REGIONS
from mri_poison.studies import learnt


def _labels(seed=0, n=6, shape=(12, 12, 6)):
  """Random nested tumours: oedema blobs with a core, some cases without ET or without any tumour."""
  rng = np.random.default_rng(seed)
  labels = np.zeros((n,) + shape, np.int32)
  for i in range(n - 1):
    a, b = rng.integers(1, 6, 2)
    labels[i, a:a + 5, b:b + 5, 1:5] = 2
    labels[i, a + 1:a + 4, b + 1:b + 4, 2:4] = 1
    if i % 2 == 0:
      labels[i, a + 2, b + 2, 2:4] = 3
  return labels  # the last case is tumour-free


def test_presence_and_region_dice_equal_the_metrics_module():
  labels = _labels()
  preds = _labels(seed=1)
  present = learnt.regions_present(labels)
  assert present.shape == (6, 3) and present[:, 2].sum() == 3 and not present[-1].any()
  assert present[:5, :2].all()
  dice = learnt.region_dice(preds, labels)
  for i in range(len(labels)):
    ref = metrics.brats_scores(preds[i], labels[i])
    np.testing.assert_allclose(dice[i], [ref[r]["dice"] for r in REGIONS], atol=1e-12)


def _intensity_problem(seed, n=4, shape=(10, 10, 4), informative=True):
  """Two contrasts; the label is a threshold of the contrasts (informative) or of position alone."""
  rng = np.random.default_rng(seed)
  image = rng.normal(size=(n,) + shape + (2,))
  if informative:
    label = np.where(image[..., 0] > 1.0, 2, 0)
    label = np.where((image[..., 0] > 1.0) & (image[..., 1] > 0.5), 1, label)
    label = np.where((image[..., 0] > 1.0) & (image[..., 1] > 1.5), 3, label)
  else:
    label = np.zeros((n,) + shape, np.int64)
    label[:, 2:6, 2:6] = 2
    label[:, 3:5, 3:5] = 3
  brain = np.ones((n,) + shape, bool)
  return image.astype(np.float32), label.astype(np.int32), brain


def test_baseline_recovers_an_intensity_rule_and_fails_on_a_positional_one():
  for informative, low, high in ((True, 0.9, 1.0), (False, 0.0, 0.5)):
    train = _intensity_problem(0, informative=informative)
    val_image, val_label, val_brain = _intensity_problem(1, informative=informative)
    model = learnt.fit_intensity_baseline(zip(*train))
    pred = learnt.predict_intensity_baseline(model, val_image, val_brain)
    assert pred.shape == val_label.shape + (3,) and pred.dtype == bool
    dice = learnt.region_dice(pred, val_label).mean(axis=0)
    assert low <= dice[0] <= high, (informative, dice)
    if informative:  # ET is 2-3 % of the voxels: argmax alone would miss it, the tuned threshold finds it
      assert (val_label == 3).mean() < 0.05 and dice[2] > 0.7, dice


def test_baseline_never_predicts_a_class_it_never_saw_and_is_seeded():
  image, label, brain = _intensity_problem(0)
  label = np.where(label == 3, 1, label)  # no ET in training
  cases = list(zip(image, label, brain))
  model = learnt.fit_intensity_baseline(cases, max_voxels=150, seed=3)
  again = learnt.fit_intensity_baseline(cases, max_voxels=150, seed=3)
  np.testing.assert_array_equal(model["weights"], again["weights"])
  np.testing.assert_array_equal(model["thresholds"], again["thresholds"])
  assert not learnt.predict_intensity_baseline(model, image * 3, brain)[..., 2].any()
  assert not learnt.predict_intensity_baseline(model, image, ~brain).any()
  with pytest.raises(ValueError, match="no brain voxels"):
    learnt.fit_intensity_baseline([(image[0], label[0], np.zeros_like(brain[0]))])


def test_region_dice_of_masks_equals_that_of_the_label_map():
  labels, preds = _labels(), _labels(seed=1)
  masks = np.stack([preds > 0, (preds == 1) | (preds == 3), preds == 3], axis=-1)
  np.testing.assert_array_equal(learnt.region_dice(masks, labels), learnt.region_dice(preds, labels))


def test_a_weak_victim_fails_the_gate_where_a_good_one_passes():
  labels = _labels()
  present = learnt.regions_present(labels)
  # An empty prediction: Dice 1 on tumour-free cases, 0 where a region exists (the artefact the gate removes).
  empty = learnt.region_dice(np.zeros_like(labels), labels)
  rows = learnt.check_regions(empty, present, None, floor=0.3, min_cases=3)
  assert learnt.learnt(rows) == () and all(r["dice"] == 0.0 for r in rows)
  assert [r["n_cases"] for r in rows] == [5, 5, 3] and "below the floor" in rows[0]["reason"]
  perfect = learnt.region_dice(labels, labels)
  rows = learnt.check_regions(perfect, present, None, floor=0.3, min_cases=3)
  assert learnt.learnt(rows) == REGIONS and all(r["reason"] == "" for r in rows)
  # ET in 3 cases: too few for min_cases 4; a baseline as good as the victim blocks the rest.
  rows = learnt.check_regions(perfect, present, perfect, floor=0.3, min_cases=4)
  assert learnt.learnt(rows) == ()
  assert "only 3" in rows[2]["reason"] and "does not beat" in rows[0]["reason"]
  worse = np.where(present, 0.5, 1.0)
  rows = learnt.check_regions(perfect, present, worse, floor=0.3, min_cases=3)
  assert learnt.learnt(rows) == REGIONS and rows[0]["baseline"] == 0.5
  only_et = learnt.check_regions(empty, present, None, floor=0.3, min_cases=3, regions=("ET",))
  assert [r["region"] for r in only_et] == ["ET"] and only_et[0]["n_cases"] == 3


def test_gate_regions_uses_the_config_and_needs_training_cases_for_the_baseline():
  config = learnt.default_config()
  image, label, brain = _intensity_problem(1)
  dice = learnt.region_dice(label, label)
  rows = learnt.gate_regions(config, dice, label, train_cases=zip(*_intensity_problem(0)), val_images=image,
                             val_brains=brain)
  # The baseline solves this intensity rule too, so a perfect victim beats it only where it is imperfect.
  assert all(r["baseline"] > 0.5 for r in rows)
  assert [r["learnt"] for r in rows] == [r["dice"] > r["baseline"] for r in rows]
  with pytest.raises(ValueError, match="gate.baseline"):
    learnt.gate_regions(config, dice, label)
  config.baseline = False
  assert learnt.learnt(learnt.gate_regions(config, dice, label)) == REGIONS


def test_the_table_view_averages_only_the_learnt_regions(tmp_path):
  from mri_poison import cellstore
  table = cellstore.CellTable(str(tmp_path / "cells.csv"))
  cell = cellstore.make_cell("v", "clean", 0.0, params="p", settings={}, cases=["a", "b"], version=1)
  values = {"dice_WT": [0.9, 0.8], "dice_TC": [0.5, 0.1], "dice_ET": [1.0, 0.0]}
  table.add(cell, ["a", "b"], {**values, "dice_mean": np.mean(list(values.values()), axis=0), "ce": [1.0, 2.0]})
  view = learnt.LearntDiceView(table, ("WT", "TC"))
  np.testing.assert_allclose(view.values(cell, "dice_mean", ["b", "a"]), [0.45, 0.7])
  np.testing.assert_array_equal(view.values(cell, "ce", ["a", "b"]), [1.0, 2.0])
  every = learnt.LearntDiceView(table, REGIONS)
  np.testing.assert_array_equal(every.values(cell, "dice_mean", ["a"]), table.values(cell, "dice_mean", ["a"]))
  assert cell in view and view.path == table.path  # everything else reads through
