"""The ceiling bench: the `ceiling` variant reads the main job's data with longer-trained victims; its table."""
import functools
import os

import pytest

from experiments.bench import ceiling
from experiments.configs import reproduce as reproduce_config
from mri_poison import io_utils


def test_ceiling_variant_trains_the_main_jobs_victims_longer_on_the_same_data():
  main, long = reproduce_config.get_config("phantom"), reproduce_config.get_config("ceiling")
  factor = reproduce_config.CEILING_FACTOR
  for stage in reproduce_config.STUDY_CONFIGS:
    assert long[stage].data.to_dict() == main[stage].data.to_dict(), stage  # the same cases and grid
    assert long[stage].get("seed") == main[stage].get("seed")
  for victim_train in ("robustify.train", "poison.train", "unlearnable.train", "deform.arm2d.train"):
    get = lambda c: functools.reduce(getattr, victim_train.split("."), c)
    assert get(long).steps == factor * get(main).steps, victim_train
    assert {k: v for k, v in get(long).items() if "steps" not in k and k != "ckpt_every"} == \
        {k: v for k, v in get(main).items() if "steps" not in k and k != "ckpt_every"}, victim_train
  assert long.deform.arm2d.model.to_dict() == main.deform.arm2d.model.to_dict()
  assert long.robustify.model.to_dict() == main.robustify.model.to_dict()


def _gate(workdir, stage, rows):
  io_utils.write_csv(os.path.join(workdir, stage, "results", "gate.csv"), rows)


def test_compare_sets_each_region_beside_its_ceiling(tmp_path):
  row = lambda region, n, dice, learnt, arm=None: dict(({"arm": arm} if arm else {}), region=region, n_cases=n,
                                                      dice=dice, baseline=0.4, floor=0.3, learnt=learnt, reason="")
  _gate(tmp_path / "main", "robustify", [row("WT", 20, 0.8, True), row("ET", 14, 0.2, False)])
  _gate(tmp_path / "long", "robustify", [row("WT", 20, 0.9, True), row("ET", 14, 0.5, True)])
  _gate(tmp_path / "main", "deform", [row("TC", 19, 0.6, True, "2d")])
  _gate(tmp_path / "long", "deform", [row("TC", 19, 0.75, True, "2d")])
  rows = ceiling.compare(str(tmp_path / "main"), str(tmp_path / "long"), ("robustify", "deform"))
  by_key = {(r["study"], r["arm"], r["region"]): r for r in rows}
  assert set(by_key) == {("robustify", "", "WT"), ("robustify", "", "ET"), ("deform", "2d", "TC")}
  et = by_key[("robustify", "", "ET")]
  assert et["share_of_ceiling"] == pytest.approx(0.4) and not et["main_learnt"] and et["ceiling_learnt"]
  assert by_key[("deform", "2d", "TC")]["share_of_ceiling"] == pytest.approx(0.8)
  _gate(tmp_path / "long", "deform", [row("TC", 18, 0.75, True, "2d")])
  with pytest.raises(ValueError, match="different held-out cases"):
    ceiling.compare(str(tmp_path / "main"), str(tmp_path / "long"), ("deform",))
  with pytest.raises(FileNotFoundError, match="poison.*no victim check"):
    ceiling.compare(str(tmp_path / "main"), str(tmp_path / "long"), ("poison",))
