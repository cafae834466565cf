"""The train step and loop: loss goes down, hooks, resume is bit-identical, non-finite stops, 4 devices == 1."""
import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.configs.unet import get_config
from mri_poison import losses
from mri_poison.data.phantom import make_case
from mri_poison.train import checkpoint as ckpt
from mri_poison.train import loop
from mri_poison.train import mesh as mesh_lib
from mri_poison.train import state as state_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def zscore(case):
  """Per-modality z-score inside the brain (a local stand-in for data.preprocess in these tests)."""
  img = case.image.copy()
  brain = (img != 0).any(-1)
  for k in range(img.shape[-1]):
    v = img[..., k][brain]
    img[..., k][brain] = (v - v.mean()) / (v.std() + 1e-6)
  return case.replace(image=img.astype(np.float32))


def phantom_cases(n, offset=0, shape=(32, 32, 32)):
  return [zscore(make_case(offset + i, shape=shape)) for i in range(n)]


def tiny_config(steps=8, ckpt_every=2):
  # The loop tests share this train config, so the loop's step cache compiles their step once.
  config = get_config("runlocal")
  config.model.features = (8, 16)  # two levels: what these tests check needs no third, and compiles faster
  config.data.update(dict(batch_size=4, read_threads=1, prefetch=1))
  config.train.update(dict(steps=steps, ckpt_every=ckpt_every, log_every=1, warmup_steps=2, eval_every=5))
  return config


def _fixed_batch(n=4, seed=0):
  case = phantom_cases(1, seed)[0]
  zs = np.linspace(10, 22, n).astype(int)
  return {"image": np.stack([case.image[:, :, z] for z in zs]), "label": np.stack([case.label[:, :, z] for z in zs])}


@pytest.fixture(scope="module")
def step_parts():
  """(model, tx, jitted step) shared by the step tests: one compile."""
  config = tiny_config(steps=25)
  model = state_lib.make_model(config.model)
  tx = state_lib.make_optimizer(config.train)
  return model, tx, loop.make_train_step(model, tx, loop.make_loss_fn(config))


def test_train_step_decreases_loss_and_keeps_shapes(step_parts):
  model, tx, step = step_parts
  params = state_lib.init_params(model, jax.random.PRNGKey(0), (1, 32, 32, 4))
  state = state_lib.init_state(params, tx, jax.random.PRNGKey(1))
  shapes = jax.tree.map(jnp.shape, state)
  batch = jax.tree.map(jnp.asarray, _fixed_batch())
  losses_seen = []
  for _ in range(25):
    state, metrics = step(state, batch)
    losses_seen.append(float(metrics["loss"]))
  assert jax.tree.map(jnp.shape, state) == shapes and int(state["step"]) == 25
  assert losses_seen[-1] < 0.85 * losses_seen[0], losses_seen


def test_non_finite_step_leaves_state_unchanged(step_parts):
  model, tx, step = step_parts
  state = state_lib.init_state(state_lib.init_params(model, jax.random.PRNGKey(0), (1, 32, 32, 4)), tx,
                               jax.random.PRNGKey(1))
  before = jax.device_get(state)
  batch = _fixed_batch()
  batch["image"][0, 0, 0, 0] = np.nan
  state, metrics = step(state, jax.tree.map(jnp.asarray, batch))
  assert not bool(metrics["finite"])
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state), before)


def test_batch_transform_hook_runs_in_step_with_params_and_key():
  # Self-distillation: the hook adds the model's own softmax as soft targets, so the first loss is the
  # mean voxel entropy of the initial predictions (T = 1).
  config = tiny_config()
  model = state_lib.make_model(config.model)
  apply_fn = state_lib.make_apply_fn(model)
  tx = state_lib.make_optimizer(config.train)
  params = state_lib.init_params(model, jax.random.PRNGKey(0), (1, 32, 32, 4))
  teacher, params2 = jax.tree.map(jnp.copy, params), jax.tree.map(jnp.copy, params)  # the step donates params
  keys = []

  def transform(p, batch, key):
    keys.append(key.shape)
    return {**batch, "soft_target": jax.nn.softmax(apply_fn(p, batch["image"]), axis=-1)}

  step = loop.make_train_step(model, tx, lambda logits, b: losses.distillation(logits, b["soft_target"], 1.0),
                              batch_transform=transform)
  batch = jax.tree.map(jnp.asarray, _fixed_batch())
  probs = jax.nn.softmax(apply_fn(params, batch["image"]), axis=-1)
  entropy = float(jnp.mean(-jnp.sum(probs * jnp.log(probs), axis=-1)))
  _, metrics = step(state_lib.init_state(params, tx, jax.random.PRNGKey(1)), batch)  # donates params
  np.testing.assert_allclose(float(metrics["loss"]), entropy, rtol=1e-5)
  assert keys == [(2,)]  # traced once, with a per-step key

  # The same soft targets from frozen "teacher" weights passed as hook_params (a jit argument).
  def from_teacher(p, batch, key, teacher):
    return {**batch, "soft_target": jax.nn.softmax(apply_fn(teacher, batch["image"]), axis=-1)}

  step = loop.make_train_step(model, tx, lambda logits, b: losses.distillation(logits, b["soft_target"], 1.0),
                              batch_transform=from_teacher)
  _, metrics = step(state_lib.init_state(params2, tx, jax.random.PRNGKey(1)), batch, teacher)
  np.testing.assert_allclose(float(metrics["loss"]), entropy, rtol=1e-5)


def test_resume_after_interruption_is_bit_identical(tmp_path):
  cases = phantom_cases(4)
  config = tiny_config()
  straight = jax.device_get(loop.train_model(config, str(tmp_path / "a"), cases=cases,
                                             eval_fn=lambda p, s: {"ok": 1.0}))

  def interrupt(params, step):
    raise KeyboardInterrupt  # killed at step 5, after the checkpoint at step 4

  with pytest.raises(KeyboardInterrupt):
    loop.train_model(config, str(tmp_path / "b"), cases=cases, eval_fn=interrupt)
  assert sorted(os.listdir(tmp_path / "b" / "checkpoints")) == ["2", "4"]
  resumed = jax.device_get(loop.train_model(config, str(tmp_path / "b"), cases=cases))
  jax.tree.map(np.testing.assert_array_equal, resumed, straight)
  # A finished run returns its final params at once (no data needed).
  again = jax.device_get(loop.train_model(config, str(tmp_path / "b"), cases=None))
  jax.tree.map(np.testing.assert_array_equal, again, straight)
  manifest = json.load(open(tmp_path / "b" / "manifest.json"))
  assert [r["status"] for r in manifest["runs"]] == ["interrupted", "finished"]
  assert manifest["runs"][1]["start_step"] == 4
  config.train.lr = 0.5
  with pytest.raises(ValueError, match="train.lr"):
    loop.train_model(config, str(tmp_path / "b"), cases=cases)


def test_non_finite_loss_raises_and_keeps_last_checkpoint(tmp_path, monkeypatch):
  cases = phantom_cases(4)
  config = tiny_config()
  real = mesh_lib.shard_batch
  calls = []

  def poisoned(batch, mesh):
    calls.append(1)
    if len(calls) == 5:
      batch = {**batch, "image": np.full_like(batch["image"], np.inf)}
    return real(batch, mesh)

  monkeypatch.setattr(mesh_lib, "shard_batch", poisoned)
  with pytest.raises(FloatingPointError, match="step 5"):
    loop.train_model(config, str(tmp_path), cases=cases)
  manager = ckpt.make_manager(str(tmp_path / "checkpoints"), ckpt_every=2)
  assert manager.latest_step() == 4
  like = jax.device_get(loop._initial_state(
      state_lib.make_model(config.model), state_lib.make_optimizer(config.train), config,
      mesh_lib.make_mesh(), None))
  restored = ckpt.restore_state(manager, 4, like)
  manager.close()
  assert int(restored["step"]) == 4
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(restored["params"]))
  monkeypatch.setattr(mesh_lib, "shard_batch", real)
  params = loop.train_model(config, str(tmp_path), cases=cases)  # resumes from step 4 and finishes
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))


_MULTI = textwrap.dedent("""
  import json, sys
  sys.path.insert(0, {tests!r}); sys.path.insert(0, {repo!r})
  import jax
  from test_train import phantom_cases, tiny_config
  from mri_poison.train import loop
  assert jax.device_count() == 4, jax.devices()
  config = tiny_config()
  loop.train_model(config, sys.argv[1], cases=phantom_cases(4))
  config.data.batch_size = 6
  try:
    loop.train_model(config, sys.argv[1] + "_bad", cases=phantom_cases(4))
  except ValueError as e:
    print("BATCH_ERROR", e)
""")


def test_four_devices_match_one_device(tmp_path):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
  script = _MULTI.format(tests=os.path.join(REPO, "tests"), repo=REPO)
  proc = subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "four")], env=env, cwd=REPO,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  loop.train_model(tiny_config(), str(tmp_path / "one"), cases=phantom_cases(4))
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-3000:]
  assert "BATCH_ERROR" in out and "data.batch_size=6" in out
  read = lambda d: [json.loads(l)["loss"] for l in open(tmp_path / d / "metrics.jsonl")]
  one, four = read("one"), read("four")
  assert len(one) == 8
  np.testing.assert_allclose(four, one, rtol=2e-4)
