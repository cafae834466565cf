"""The general trainer `fit`: any state of named parts, resume, the finite guard, checkpoint fallback, workdir rules."""
import json
import os

import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from mri_poison.train import checkpoint as ckpt
from mri_poison.train import parts
from mri_poison.train import trainer
from mri_poison.train import lock as lock_lib
from mri_poison.train import workdir as workdir_lib

G_TX, D_TX = optax.adam(1e-2), optax.adam(2e-2)
GEN, DISC = nn.Dense(16), nn.Dense(1)


def gan_config(steps=10, ckpt_every=2, **train):
  return ml_collections.ConfigDict({"train": dict(steps=steps, ckpt_every=ckpt_every, log_every=1, eval_every=1,
                                                  seed=0, **train)})


def gan_state(seed=0):
  kg, kd, kr = jax.random.split(jax.random.PRNGKey(seed), 3)
  g = GEN.init(kg, jnp.zeros((1, 8)))["params"]
  d = DISC.init(kd, jnp.zeros((1, 16)))["params"]
  return parts.init_state({"gen": parts.make_part(g, G_TX), "disc": parts.make_part(d, D_TX)}, kr)


def gan_step(state, batch):
  """LSGAN on vectors: discriminator then generator, each with its own optimiser, in one step."""
  z = jax.random.normal(jax.random.fold_in(state["rng"], state["step"]), (batch["x"].shape[0], 8))

  def d_loss(d, g):
    fake = GEN.apply({"params": g}, z)
    return (jnp.mean((DISC.apply({"params": d}, batch["x"]) - 1) ** 2)
            + jnp.mean(DISC.apply({"params": d}, jax.lax.stop_gradient(fake)) ** 2))

  def g_loss(g, d):
    return jnp.mean((DISC.apply({"params": d}, GEN.apply({"params": g}, z)) - 1) ** 2)

  dl, d_grads = jax.value_and_grad(d_loss)(state["disc"]["params"], state["gen"]["params"])
  disc = parts.apply_gradients(state["disc"], d_grads, D_TX)
  gl, g_grads = jax.value_and_grad(g_loss)(state["gen"]["params"], disc["params"])
  gen = parts.apply_gradients(state["gen"], g_grads, G_TX)
  return {**state, "gen": gen, "disc": disc, "step": state["step"] + 1}, {"d_loss": dl, "g_loss": gl}


def vectors(seed=0):
  real = np.random.default_rng(seed).normal(2.0, 0.5, (64, 16)).astype(np.float32)
  ds = grain.MapDataset.source(real).seed(seed).shuffle().repeat(None).map(lambda v: {"x": v}).batch(8)
  return iter(ds.to_iter_dataset())


def read_rows(workdir):
  return [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]


def test_two_part_state_resumes_bit_identically_and_logs_each_step_once(tmp_path):
  config = gan_config()
  straight = jax.device_get(trainer.fit(config, str(tmp_path / "a"), init_state=gan_state(), step_fn=gan_step,
                                        data=vectors))

  def interrupt(state, step):
    if step == 5:
      raise KeyboardInterrupt  # after the checkpoint at step 4
    return {}

  with pytest.raises(KeyboardInterrupt):
    trainer.fit(config, str(tmp_path / "b"), init_state=gan_state(), step_fn=gan_step, data=vectors,
                eval_fn=interrupt)
  resumed = jax.device_get(trainer.fit(config, str(tmp_path / "b"), init_state=gan_state(), step_fn=gan_step,
                                       data=vectors))
  jax.tree.map(np.testing.assert_array_equal, resumed, straight)
  assert int(resumed["step"]) == 10
  # Both parts moved.
  start = gan_state()
  for name in ("gen", "disc"):
    assert not np.allclose(resumed[name]["params"]["kernel"], start[name]["params"]["kernel"])
  a, b = read_rows(tmp_path / "a"), read_rows(tmp_path / "b")
  assert [r["step"] for r in b] == list(range(1, 11))  # the rows logged after step 4 by the killed run are gone
  np.testing.assert_array_equal([r["g_loss"] for r in b], [r["g_loss"] for r in a])
  manifest = json.load(open(tmp_path / "b" / "manifest.json"))
  assert [r["status"] for r in manifest["runs"]] == ["interrupted", "finished"]


def blow_up_at(step_number, model=None):
  """A step whose loss stays finite but whose update makes the params infinite at `step_number`."""
  def step(state, batch):
    del batch
    bad = state["step"] + 1 == step_number
    if model is not None:
      bad = bad & (state["model_id"] == model)
    params = jax.tree.map(lambda p: jnp.where(bad, jnp.inf, p - 0.1), state["params"])
    return {**state, "params": params, "step": state["step"] + 1}, {"loss": jnp.sum(state["params"]["w"])}
  return step


def test_non_finite_params_are_rejected_and_never_saved(tmp_path):
  init = {"params": {"w": jnp.ones(3)}, "opt_state": (), "step": jnp.zeros((), jnp.int32),
          "rng": jnp.zeros(2, jnp.uint32)}
  with pytest.raises(FloatingPointError, match="non-finite step 5"):
    trainer.fit(gan_config(8), str(tmp_path), init_state=init, step_fn=blow_up_at(5))
  manager = ckpt.make_manager(str(tmp_path / "checkpoints"), ckpt_every=2)
  assert manager.latest_step() == 4
  restored = ckpt.restore_state(manager, 4, jax.device_get(init))
  manager.close()
  np.testing.assert_allclose(restored["params"]["w"], 1.0 - 0.4, rtol=1e-6)
  assert json.load(open(tmp_path / "manifest.json"))["runs"][-1]["status"] == "non-finite"


def test_stacked_guard_names_the_failing_model(tmp_path):
  init = {"params": {"w": jnp.ones(3)}, "opt_state": (), "model_id": jnp.zeros((), jnp.int32),
          "step": jnp.zeros((), jnp.int32), "rng": jnp.zeros(2, jnp.uint32)}
  stacked = parts.stack(init, 3)
  stacked["model_id"] = jnp.arange(3)
  with pytest.raises(FloatingPointError, match=r"model\(s\) \[1\]"):
    trainer.fit(gan_config(4), str(tmp_path), init_state=stacked, step_fn=parts.stacked_step(blow_up_at(3, 1)))


def test_corrupt_latest_checkpoint_falls_back_and_is_kept_aside(tmp_path):
  config = gan_config(6)
  straight = jax.device_get(trainer.fit(config, str(tmp_path / "a"), init_state=gan_state(), step_fn=gan_step,
                                        data=vectors))
  with pytest.raises(KeyboardInterrupt):
    trainer.fit(config, str(tmp_path / "b"), init_state=gan_state(), step_fn=gan_step, data=vectors,
                eval_fn=lambda s, step: (_ for _ in ()).throw(KeyboardInterrupt) if step == 5 else {})
  ckpt_dir = tmp_path / "b" / "checkpoints"
  assert sorted(os.listdir(ckpt_dir)) == ["2", "4"]
  for root, _, files in os.walk(ckpt_dir / "4" / "state"):  # truncate every data file of step 4
    for f in files:
      if "metadata" not in f:
        open(os.path.join(root, f), "wb").close()
  resumed = jax.device_get(trainer.fit(config, str(tmp_path / "b"), init_state=gan_state(), step_fn=gan_step,
                                       data=vectors))
  jax.tree.map(np.testing.assert_array_equal, resumed, straight)  # replayed 3..6 from step 2
  assert os.path.isdir(tmp_path / "b" / "checkpoints_skipped" / "4")


def test_workdir_rules_before_anything_is_written(tmp_path):
  config = gan_config(4)
  # A second run on a locked workdir stops at once and writes nothing.
  with lock_lib.lock(str(tmp_path / "w")):
    with pytest.raises(workdir_lib.WorkdirBusy):
      trainer.fit(config, str(tmp_path / "w"), init_state=gan_state(), step_fn=gan_step, data=vectors)
  assert not os.path.exists(tmp_path / "w" / "config.json")
  # A checkpoints path that cannot be a folder fails at once, naming it.
  (tmp_path / "f").mkdir()
  (tmp_path / "f" / "checkpoints").write_text("")
  with pytest.raises(workdir_lib.WorkdirError, match="checkpoints"):
    trainer.fit(config, str(tmp_path / "f"), init_state=gan_state(), step_fn=gan_step, data=vectors)
  # Checkpoints without config.json: refused instead of resuming under an unknown config.
  trainer.fit(config, str(tmp_path / "r"), init_state=gan_state(), step_fn=gan_step, data=vectors)
  os.remove(tmp_path / "r" / "config.json")
  with pytest.raises(workdir_lib.WorkdirError, match="config.json"):
    trainer.fit(config, str(tmp_path / "r"), init_state=gan_state(), step_fn=gan_step, data=vectors)


def lr_step(schedule):
  def step(state, batch):
    del batch
    lr = schedule(state["step"])
    return {**state, "params": {"w": state["params"]["w"] - lr}, "step": state["step"] + 1}, {"lr": lr}
  return step


def test_more_steps_only_through_a_continuous_schedule(tmp_path):
  from mri_poison.train import state as state_lib
  config = gan_config(6, warmup_steps=2, lr=1e-2, min_lr_ratio=0.1)
  init = {"params": {"w": jnp.zeros(())}, "opt_state": (), "step": jnp.zeros((), jnp.int32),
          "rng": jnp.zeros(2, jnp.uint32)}
  trainer.fit(config, str(tmp_path), init_state=init, step_fn=lr_step(state_lib.lr_schedule(config.train)))
  longer = gan_config(9, warmup_steps=2, lr=1e-2, min_lr_ratio=0.1)
  with pytest.raises(workdir_lib.WorkdirError, match="schedule_steps"):
    trainer.fit(longer, str(tmp_path), init_state=init, step_fn=lr_step(state_lib.lr_schedule(longer.train)))
  longer.train.schedule_steps = 6
  trainer.fit(longer, str(tmp_path), init_state=init, step_fn=lr_step(state_lib.lr_schedule(longer.train)))
  lrs = [r["lr"] for r in read_rows(tmp_path)]
  assert len(lrs) == 9
  np.testing.assert_allclose(lrs[6:], 1e-3, rtol=1e-5)  # the final value, continued: no jump at step 7
  assert all(a >= b - 1e-9 for a, b in zip(lrs[2:], lrs[3:]))


def test_a_failed_save_fails_the_run_at_that_save(tmp_path):
  import shutil

  def break_checkpoints(state, step):
    if step == 3:  # the folder vanishes under the run (a full or unmounted disk)
      shutil.rmtree(tmp_path / "checkpoints")
      (tmp_path / "checkpoints").write_text("not a folder")
    return {}

  with pytest.raises(Exception) as info:
    trainer.fit(gan_config(8), str(tmp_path), init_state=gan_state(), step_fn=gan_step, data=vectors,
                eval_fn=break_checkpoints)
  assert "checkpoints" in str(info.value)
  steps = [r["step"] for r in read_rows(tmp_path)]
  assert max(steps) == 4  # stopped at the save of step 4, not later
  assert json.load(open(tmp_path / "manifest.json"))["runs"][-1]["status"] == "failed"
