"""Trainable parts and stacked models: a vmapped stack of U-Nets trains exactly like the models one by one."""
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mri_poison.data.pipeline import stack_datasets, train_dataset
from mri_poison.train import loop
from mri_poison.train import mesh as mesh_lib
from mri_poison.train import parts
from mri_poison.train import state as state_lib
from mri_poison.train import trainer
from mri_poison.train import metrics_log

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_train import phantom_cases, tiny_config  # pylint: disable=g-import-not-at-top,wrong-import-position


def test_make_part_and_apply_gradients_match_optax():
  params = {"w": jnp.arange(3.0)}
  tx = optax.adam(0.1)
  part = parts.make_part(params, tx)
  grads = {"w": jnp.array([1.0, -2.0, 0.5])}
  new = parts.apply_gradients(part, grads, tx)
  updates, _ = tx.update(grads, tx.init(params), params)
  np.testing.assert_array_equal(new["params"]["w"], optax.apply_updates(params, updates)["w"])
  stacked = parts.stack(parts.init_state({"m": part}, jax.random.PRNGKey(0)), 4)
  assert stacked["m"]["params"]["w"].shape == (4, 3) and stacked["step"].shape == ()
  assert parts.n_models(stacked) == 4
  np.testing.assert_array_equal(parts.unstack(stacked, 2)["m"]["params"]["w"], params["w"])


def test_vmapped_stack_equals_models_trained_one_by_one(tmp_path):
  """Three U-Nets, same init and seed, each on its own cases: one vmapped program == three runs."""
  config = tiny_config(steps=4, ckpt_every=4)
  config.train.eval_every = 0
  case_sets = [phantom_cases(3, offset=10 * m) for m in range(3)]
  one_by_one = [jax.device_get(loop.train_model(config, str(tmp_path / f"seq{m}"), cases=cases))
                for m, cases in enumerate(case_sets)]

  model = state_lib.make_model(config.model)
  tx = state_lib.make_optimizer(config.train)
  init = loop._initial_state(model, tx, config, mesh_lib.make_mesh(), None)
  step = parts.stacked_step(loop.train_step_fn(model, tx, loop.make_loss_fn(config)), batch_axis=1)
  data = lambda: iter(stack_datasets([train_dataset(c, config.data, seed=int(config.train.seed)) for c in case_sets]))
  stacked = jax.device_get(trainer.fit(config, str(tmp_path / "stack"), init_state=parts.stack(init, 3),
                                       step_fn=step, data=data))
  assert int(stacked["step"]) == 4
  read = lambda d: metrics_log.metrics_table(str(tmp_path / d))
  apply_fn = state_lib.make_apply_fn(model)
  x = jnp.asarray(np.stack([c.image[:, :, 16] for c in case_sets[0]]))
  for m in range(3):
    # Same data, same losses at every step (float32; vmapped convolutions sum in another order).
    np.testing.assert_allclose(read("stack")[f"loss/{m}"], read(f"seq{m}")["loss"], rtol=1e-4)
    # Same function. (Raw params are compared only where they matter: a conv bias right before an instance norm
    # has a gradient that is zero up to rounding, and Adam turns that rounding into +-lr steps.)
    mine = parts.unstack(stacked, m)["params"]
    np.testing.assert_allclose(apply_fn(mine, x), apply_fn(one_by_one[m], x), rtol=1e-3, atol=1e-4)
  # The models did diverge (different data), so the comparison above is not vacuous.
  diff = np.max(np.abs(apply_fn(one_by_one[0], x) - apply_fn(one_by_one[1], x)))
  assert diff > 1e-2, diff
