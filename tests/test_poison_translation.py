"""The GAN's train step (both networks, one jitted step run by `fit`) and synthesis under the data contract."""
import json
import os

import grain
import jax
import ml_collections
import numpy as np
import pytest

from experiments.configs.gan import gan_section
from mri_poison.data.case import Case
from mri_poison.poison import translation
from mri_poison.train import trainer


def tiny_gan():
  """The tests' GAN (also test_studies_poison's): one architecture and step, compiled once for the suite."""
  g = gan_section("runlocal")
  g.model.update(dict(features=4, n_down=1, n_res=1, disc_features=4, disc_layers=2))
  g.train.update(dict(lr=2e-3, batch_size=2, steps=3, log_every=1, ckpt_every=3))
  return g


@pytest.fixture(scope="module")
def gan_state():
  return jax.device_get(translation.init_gan_state(tiny_gan(), jax.random.PRNGKey(0), (16, 16, 1)))


def test_gan_step_lowers_the_generator_loss_on_a_fixed_batch(tmp_path, gan_state):
  g = tiny_gan()
  g.train.update(dict(steps=8, ckpt_every=8))
  rng = np.random.default_rng(0)
  base = rng.normal(size=(2, 16, 16, 1)).astype(np.float32)
  batch = {"a": {"image": np.concatenate([base, 0.5 * base], -1)},
           "b": {"image": np.concatenate([base, 0.5 * base + 0.3], -1)}}
  data = lambda: iter(grain.MapDataset.source([batch]).repeat(None).to_iter_dataset())
  config = ml_collections.ConfigDict({"train": g.train.to_dict()})
  state = trainer.fit(config, str(tmp_path), init_state=gan_state, step_fn=translation.cached_step_fn(g, 0, 1),
                      data=data)
  rows = [json.loads(line) for line in open(os.path.join(tmp_path, "metrics.jsonl"))]
  g_loss, rec = [r["g_loss"] for r in rows], [r["g_rec"] for r in rows]
  assert int(state["step"]) == 8 and len(g_loss) == 8
  assert g_loss[-1] < 0.8 * g_loss[0], g_loss
  assert rec[-1] < rec[0] and rows[0]["g_path"] > 0 and rows[0]["d_loss"] > 0
  for part in ("gen", "disc"):  # both networks moved, each with its own optimiser
    moved = jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - b))), state[part]["params"],
                         gan_state[part]["params"])
    assert max(jax.tree.leaves(moved)) > 1e-4


def test_synthetic_volumes_obey_the_contract_and_channels_are_checked(gan_state):
  g = tiny_gan()
  rng = np.random.default_rng(1)
  image = rng.normal(size=(16, 16, 4, 2)).astype(np.float32)
  image[:3] = 0.0  # background
  case = Case(image=image, modalities=("ct", "t1ce"), label=np.zeros((16, 16, 4), np.int32), affine=np.eye(4),
              spacing=(1.0, 1.0, 1.0), case_id="c")
  (synth,) = translation.synthesize_volumes(g, gan_state["gen"]["params"], [case], source=0)
  head = (image != 0).any(-1)
  assert synth.shape == (16, 16, 4) and np.all(synth[~head] == 0)
  np.testing.assert_allclose([synth[head].mean(), synth[head].std()], [0.0, 1.0], atol=1e-4)
  assert translation.channels(g, ("ct", "t1ce")) == (0, 1)
  with pytest.raises(ValueError, match="gan.source"):
    translation.channels(ml_collections.ConfigDict({"source": "t2", "target": "t1ce"}), ("ct", "t1ce"))
