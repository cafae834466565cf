"""The attack zoo: the registry's rules, every entry run on a toy model, and the entries' equivalences with the
attack functions they wrap."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from mri_poison import losses as seg_losses
from mri_poison.attacks import gradient
from mri_poison.attacks import losses as attack_losses
from mri_poison.attacks import zoo
from mri_poison.attacks.eps_sweep import sweep

# The random streams of the attacks that existed before the zoo: a cell's key holds its stream, so changing one
# would silently recompute (or, worse, mix up) every finished workdir's cells.
HISTORICAL_STREAMS = {"fgsm": 0, "ifgsm": 1, "ifgsm_targeted": 2, "pgd": 3, "segpgd": 4, "cospgd": 5,
                      "random_sign": 6, "margin": 7, "pgd_temp": 8, "transfer": 9, "targeted_margin": 10}


def _toy():
  rng = np.random.default_rng(0)
  w = jnp.asarray(rng.normal(size=(4, 4)), jnp.float32)
  apply_fn = lambda p, x: x @ p  # (B, H, W, 4) -> (B, H, W, 4) logits: a 1x1 "segmenter"
  x = jnp.asarray(rng.normal(size=(3, 6, 6, 4)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, 4, size=(3, 6, 6)), jnp.int32)
  brain = jnp.asarray(rng.random((3, 6, 6)) > 0.2)
  cfg = ml_collections.ConfigDict(dict(steps=3, step_frac=0.25, restarts=2, margin_kappa=0.0))
  return apply_fn, w, x, labels, brain, cfg


def test_streams_are_unique_and_never_renumbered():
  streams = {name: zoo.get(name).stream for name in zoo.names()}
  assert len(set(streams.values())) == len(streams)
  assert {k: streams[k] for k in HISTORICAL_STREAMS} == HISTORICAL_STREAMS
  assert list(zoo.names()) == sorted(streams, key=streams.get)


def test_registry_refuses_a_duplicate_and_names_the_choices():
  with pytest.raises(ValueError, match="registered twice"):
    zoo.register(zoo.Threat("pgd", 999, "again", run=lambda a: None))
  with pytest.raises(ValueError, match="stream 3 is already 'pgd'"):
    zoo.register(zoo.Threat("new_attack", 3, "clash", run=lambda a: None))
  with pytest.raises(ValueError, match="exactly one of run and replays"):
    zoo.register(zoo.Threat("new_attack", 999, "neither"))
  assert "new_attack" not in zoo.names()
  with pytest.raises(ValueError, match=r"unknown attack 'pgdd': expected one of \('fgsm'"):
    zoo.get("pgdd")


def test_every_entry_stays_in_the_ball_and_the_mask_at_every_eps():
  apply_fn, w, x, labels, brain, cfg = _toy()
  eps = jnp.asarray([0.1, 0.4])
  for name in zoo.names():
    threat = zoo.get(name)
    if threat.run is None:
      assert zoo.get(threat.replays).run is not None
      continue
    inputs = zoo.Inputs(apply_fn, w, x, labels, brain, eps, cfg, jax.random.PRNGKey(1), jnp.zeros_like(labels), 2.0)
    x_adv, hist = threat.run(inputs)
    assert x_adv.shape == (2,) + x.shape, name
    delta = np.abs(np.asarray(x_adv) - np.asarray(x)[None])
    assert np.all(delta.max(axis=(1, 2, 3, 4)) <= np.asarray(eps) * (1 + 1e-6)), name
    assert np.all(delta[:, ~np.asarray(brain)] == 0), name  # only brain voxels change
    if threat.iterative:
      assert hist["loss"].shape[0] == 2 and hist["loss"].shape[-1] == 3, name
    assert threat.gradient_evaluations(cfg) >= 1


def test_pgd_entry_is_gradient_pgd_with_the_tracked_ce():
  apply_fn, w, x, labels, brain, cfg = _toy()
  eps, key = jnp.asarray([0.3]), jax.random.PRNGKey(4)
  x_adv, hist = zoo.get("pgd").run(zoo.Inputs(apply_fn, w, x, labels, brain, eps, cfg, key))
  ce = attack_losses.cross_entropy(apply_fn, w, labels, brain)
  direct, direct_hist = sweep(gradient.pgd, ce, x, eps=eps, mask=brain, step_size_frac=0.25, steps=3, key=key,
                              restarts=2, return_history=True)
  np.testing.assert_array_equal(np.asarray(x_adv), np.asarray(direct))
  np.testing.assert_allclose(np.asarray(hist["loss"]), np.asarray(direct_hist["loss"]), rtol=1e-6)


def test_applies_and_settings_say_what_a_cell_depends_on():
  cfg = ml_collections.ConfigDict(dict(steps=4, step_frac=0.5, restarts=1, margin_kappa=0.5, apgd_steps=20))
  assert not zoo.get("pgd_temp").applies("distilled", 1.0, "undefended")
  assert zoo.get("pgd_temp").applies("distilled", 20.0, "undefended")
  assert not zoo.get("transfer").applies("undefended", 1.0, "undefended")
  assert zoo.get("pgd_temp").settings(cfg, 20.0) == {"steps": 4, "step_frac": 0.5, "temperature": 20.0}
  assert zoo.get("margin").settings(cfg, 1.0)["kappa"] == 0.5
  assert zoo.get("fgsm").settings(cfg, 1.0) == {}
  assert zoo.get("apgd_js").settings(cfg, 1.0)["steps"] == 20 and zoo.get("apgd_js").gradient_evaluations(cfg) == 20
  assert zoo.get("transfer").gradient_evaluations(cfg) == zoo.get("pgd").gradient_evaluations(cfg) == 4


def test_ce_tracked_loss_has_the_attack_gradient_and_the_ce_value():
  w = jnp.asarray(np.random.default_rng(0).normal(size=(2, 3)), jnp.float32)
  apply_fn = lambda p, x: x @ p  # (B, S, 2) -> (B, S, 3) logits
  x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 5, 2)), jnp.float32)
  labels = jnp.asarray([[0, 1, 2, 0, 1], [2, 2, 1, 0, 0]])
  inner = attack_losses.margin(attack_losses.scaled_apply(apply_fn, 4.0), w, labels)
  tracked = zoo.CETracked(inner, labels, None, 4.0)
  np.testing.assert_allclose(tracked(x), seg_losses.cross_entropy(apply_fn(w, x), labels), rtol=1e-6)
  grad = lambda f: jax.grad(lambda v: f(v).sum())(x)
  np.testing.assert_allclose(grad(tracked), grad(inner), rtol=1e-6)
