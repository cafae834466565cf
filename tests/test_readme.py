"""Every Python snippet of README.md runs as written (paths mapped onto small fixtures), so the README cannot rot."""
import os
import re

import pytest

from experiments.configs import robustify as robustify_config
from mri_poison.data import phantom
from mri_poison.studies.robustify import training
from mri_poison.train import loop

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def snippets():
  text = open(os.path.join(REPO, "README.md")).read()
  return re.findall(r"```python\n(.*?)```", text, flags=re.S)


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
  """What the snippets' paths stand for: a BraTS folder, a TFDS dir, a study workdir with a trained model."""
  root = tmp_path_factory.mktemp("readme")
  phantom.write_brats_dir(root / "brats", 1, shape=(32, 32, 32))
  config = robustify_config.get_config("runlocal")
  config.data.update(dict(phantom_shape=(24, 24, 24), shape=(16, 16, 16), patch_shape=(16, 16, 16)))  # the tests' 16^3
  config.train.update(dict(steps=2, ckpt_every=2, log_every=1))
  loop.train_model(training._sub_config(config), str(root / "study" / "models" / "undefended"))  # pylint: disable=protected-access
  return {"/data/BraTS2021": str(root / "brats"), "/tmp/tfds": str(root / "tfds"), "runs/reproduce/robustify": str(root / "study")}


def test_readme_has_the_snippets_we_test():
  assert len(snippets()) >= 3
  assert any("train.load_model" in s for s in snippets())


@pytest.mark.parametrize("index", range(3))
def test_snippet_runs_as_written(index, paths):
  code = snippets()[index]
  for old, new in paths.items():
    code = code.replace(f'"{old}', f'"{new}')
  namespace = {}
  exec(compile(code, f"README.md python snippet {index}", "exec"), namespace)  # pylint: disable=exec-used
  if "x_adv" in namespace:  # the attack snippet did attack within its budget
    import numpy as np
    delta = np.abs(np.asarray(namespace["x_adv"]) - np.asarray(namespace["x"]))
    assert 0 < delta.max() <= 0.1 + 1e-6 and namespace["grid"].shape[0] == 3
