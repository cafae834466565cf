"""Dense attack losses: SegPGD schedule, CosPGD stop-gradient weights, Dice/region losses, target maps, margin
losses on models with known logits."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mri_poison.attacks import gradient
from mri_poison.attacks import losses


def _identity_apply(params, x):
  del params
  return x  # "model" whose logits are the input: loss gradients are easy to reason about


def test_segpgd_weight_schedule():
  steps = 10
  lam = np.asarray([losses.segpgd_weight(s, steps) for s in range(steps)])
  np.testing.assert_allclose(lam[0], 0.0)  # l_1 = 0
  np.testing.assert_allclose(lam[-1], (steps - 1) / (2 * steps))  # l_T = (T-1)/(2T)
  np.testing.assert_allclose(np.diff(lam), 1 / (2 * steps), rtol=1e-6)


def test_segpgd_follows_the_equation():
  logits = jax.random.normal(jax.random.key(0), (2, 6, 6, 4))
  labels = jax.random.randint(jax.random.key(1), (2, 6, 6), 0, 4)
  lf = losses.segpgd(_identity_apply, None, labels, steps=5)
  ce = np.asarray(losses.voxel_cross_entropy(logits, labels))
  correct = np.asarray(jnp.argmax(logits, -1) == labels)
  assert 0 < correct.mean() < 1
  for step in (0, 4):
    lam = step / 10
    want = ((1 - lam) * (ce * correct).sum((1, 2)) + lam * (ce * ~correct).sum((1, 2))) / 36
    np.testing.assert_allclose(lf(logits, step), want, rtol=1e-5)
  # at step 0 only correctly classified voxels carry gradient
  g = np.asarray(jax.grad(lambda z: lf(z, 0).sum())(logits))
  assert np.all(g[~correct] == 0) and np.any(g[correct] != 0)


def test_cospgd_weights_are_stop_gradient():
  logits = jax.random.normal(jax.random.key(2), (2, 5, 5, 4))
  labels = jax.random.randint(jax.random.key(3), (2, 5, 5), 0, 4)
  cos = losses.cosine_to_onehot(logits, labels)
  p = jax.nn.softmax(logits)
  onehot = jax.nn.one_hot(labels, 4)
  np.testing.assert_allclose(cos, jnp.sum(p * onehot, -1) / jnp.linalg.norm(p, axis=-1), rtol=1e-5)
  lf = losses.cospgd(_identity_apply, None, labels)
  ce = losses.voxel_cross_entropy(logits, labels)
  np.testing.assert_allclose(lf(logits), jnp.mean(cos * ce, axis=(1, 2)), rtol=1e-5)
  # gradient = cos (held constant) x grad CE, i.e. no term from differentiating the weight
  g = jax.grad(lambda z: lf(z).sum())(logits)
  g_ce = jax.grad(lambda z: losses.voxel_cross_entropy(z, labels).sum())(logits)
  np.testing.assert_allclose(g, cos[..., None] * g_ce / 25, rtol=1e-4, atol=1e-7)
  lt = losses.targeted_cospgd(_identity_apply, None, labels)
  np.testing.assert_allclose(lt(logits), jnp.mean((1 - cos) * ce, axis=(1, 2)), rtol=1e-5)


def test_mask_dice_and_region_losses():
  labels = jnp.array([[0, 1, 2, 3], [3, 3, 2, 0]])[:, None, :]  # (B, 1, 4)
  perfect = 30.0 * jax.nn.one_hot(labels, 4) - 15.0
  assert np.all(np.asarray(losses.dice(_identity_apply, None, labels)(perfect)) < 1e-4)
  wrong = 30.0 * jax.nn.one_hot((labels + 1) % 4, 4) - 15.0
  assert np.all(np.asarray(losses.dice(_identity_apply, None, labels)(wrong)) > 0.99)
  ce_wrong = losses.cross_entropy(_identity_apply, None, labels)(wrong)
  mask = jnp.zeros_like(labels).at[:, :, 0].set(1)
  ce_masked = losses.cross_entropy(_identity_apply, None, labels, mask=mask)(wrong.at[:, :, 1:].set(perfect[:, :, 1:]))
  np.testing.assert_allclose(ce_masked, ce_wrong, rtol=1e-5)  # only the masked voxel counts
  regions = 30.0 * jnp.stack([labels > 0, (labels == 1) | (labels == 3), labels == 3], -1) - 15.0
  assert np.all(np.asarray(losses.region_bce(_identity_apply, None, labels)(regions)) < 1e-5)
  assert np.all(np.asarray(losses.region_dice(_identity_apply, None, labels)(regions)) < 1e-4)
  assert np.all(np.asarray(losses.region_dice(_identity_apply, None, labels)(-regions)) > 0.6)


def test_target_maps():
  labels = jnp.array([[0, 1, 2, 3, 3]])
  np.testing.assert_array_equal(losses.target_erase_tumour(labels), np.zeros((1, 5)))
  np.testing.assert_array_equal(losses.target_et_to_oedema(labels), [[0, 1, 2, 2, 2]])
  logits = jnp.array([[[0.0, 1, 2, 3], [3, 2, 1, 0], [1, 0, 2, 3], [2, 3, 0, 1], [1, 2, 3, 0]]])
  np.testing.assert_array_equal(losses.target_least_likely(_identity_apply, None, logits), [[0, 3, 1, 2, 3]])


def test_losses_are_pytrees_with_params_as_leaves():
  params = {"w": jnp.ones(3)}
  lf = losses.segpgd(lambda p, x: x * p["w"], params, jnp.zeros((1, 2), jnp.int32), steps=7)
  leaves, treedef = jax.tree.flatten(lf)
  assert len(leaves) == 2  # params["w"] and labels; apply_fn, reducer and T are static
  lf2 = jax.tree.unflatten(treedef, [leaves[0] * 2, leaves[1]])
  assert lf2.steps == 7 and float(lf2.params["w"][0]) == 2.0


# ------------------------------------------------------------------------------------------- margin losses


def test_margin_values_on_fixed_logits():
  # A "model" with fixed logits: the loss is a function of them only, checked against hand values.
  logits = jnp.array([[[3.0, 1.0, 0.0, -1.0], [0.0, 2.0, 5.0, 1.0], [1.0, 1.0, 1.0, 4.0]]])  # (1, 3, 4)
  fixed = lambda params, x: logits
  labels = jnp.array([[0, 2, 1]])
  # per voxel: max_{k!=y} z_k - z_y = 1 - 3 = -2, 2 - 5 = -3, 4 - 1 = 3
  np.testing.assert_allclose(losses.voxel_margin(logits, labels), [[-2.0, -3.0, 3.0]])
  np.testing.assert_allclose(losses.margin(fixed, None, labels)(None), [(-2 - 3 + 3) / 3])
  np.testing.assert_allclose(losses.margin(fixed, None, labels, kappa=1.0)(None), [(-2 - 3 + 1) / 3])
  np.testing.assert_allclose(losses.margin(fixed, None, labels, mask=jnp.array([[1, 0, 1]]))(None), [0.5])
  # Targeted: only voxels whose target differs from the labels count; kappa = 0 zeroes those already reached.
  # voxel 0 must become 3: margin 3 - (-1) = 4; voxel 2 must become 3 and already is: margin 1 - 4 = -3.
  target = jnp.array([[3, 2, 3]])
  tm = losses.targeted_margin(fixed, None, target, labels)
  np.testing.assert_allclose(tm(None), [(4.0 + 0.0) / 2])  # -3 clipped at -kappa = 0
  np.testing.assert_allclose(losses.targeted_margin(fixed, None, target, labels, kappa=2.0)(None), [(4 - 2) / 2])
  np.testing.assert_allclose(losses.targeted_margin(fixed, None, target, labels, kappa=5.0)(None), [(4 - 3) / 2])
  np.testing.assert_allclose(losses.targeted_margin(fixed, None, target, labels, mask=jnp.array([[0, 1, 1]]))(None),
                             [0.0])
  np.testing.assert_allclose(losses.targeted_margin(fixed, None, labels, labels)(None), [0.0])  # nothing to change
  # kappa is static (one compile per value), the label maps are leaves.
  assert len(jax.tree.leaves(tm)) == 2 and tm.reduce == losses.targeted_margin(fixed, None, target, labels).reduce


def _linear_voxel_model(scale):
  """Per-voxel linear logits z = scale * (x @ W + b), 3 classes; class 2 is never near the top."""
  w = jnp.array([[0.0, 1.0, 0.0], [0.0, -2.0, 0.0]])  # (C=2, K=3): z1 - z0 = x0 - 2 x1, ||W1 - W0||_1 = 3
  b = jnp.array([0.0, 0.0, -100.0])
  return lambda params, x: scale * (x @ w + b)


def _voxels_with_known_margins():
  """100 correctly classified voxels, half label 0 and half label 1, with margins -d, d = 0.005 + 0.01 k."""
  d = 0.005 + 0.01 * np.arange(100)
  labels = np.tile([0, 1], 50)
  x0 = np.where(labels == 0, -d, d)  # label 0: z1 - z0 = x0 = -d; label 1: z0 - z1 = -x0 = -d
  x = np.stack([x0, np.zeros(100)], -1)[None, None].astype(np.float32)  # (1, 1, 100, 2)
  return jnp.asarray(x), jnp.asarray(labels[None, None], jnp.int32), d


def test_margin_fgsm_flips_the_predicted_fraction_at_any_temperature():
  """One FGSM step of eps on the margin raises every voxel's margin by eps * ||W_other - W_y||_1 = 3 eps, so
  exactly the voxels with d < 3 eps flip: 30 of 100 at eps = 0.1. Scaling the logits by 1e5 (a saturated
  softmax, as a distilled model at T = 1) changes neither the margin's gradient sign nor the flipped set,
  while cross-entropy's gradient underflows to (rounding noise around) 0."""
  x, labels, d = _voxels_with_known_margins()
  eps = 0.1
  expected = np.mean(d < 3 * eps)
  assert expected == 0.3
  for scale in (1.0, 1e5):
    model = _linear_voxel_model(scale)
    assert np.all(np.asarray(jnp.argmax(model(None, x), -1)) == np.asarray(labels))  # all correct when clean
    x_adv = gradient.fgsm(losses.margin(model, None, labels), x, eps=eps)
    flipped = np.asarray(jnp.argmax(model(None, x_adv), -1)) != np.asarray(labels)
    assert flipped.mean() == expected, (scale, flipped.mean())
    np.testing.assert_array_equal(flipped[0, 0], d < 3 * eps)
  saturated = _linear_voxel_model(1e5)
  grad = lambda loss: np.abs(np.asarray(jax.jit(jax.grad(lambda v: loss(v).sum()))(x)))
  # Gradient masking: on the saturated softmax CE's gradient is 0 up to rounding (eagerly exactly 0; compiled,
  # a few 1e-5 where fused ops round differently, whose sign FGSM would follow as if it meant something).
  assert grad(losses.cross_entropy(saturated, None, labels)).max() < 1e-6 * grad(
      losses.margin(saturated, None, labels)).min()
  # Attacking at the training temperature (logits / T) restores CE's gradient and flips the same voxels.
  x_t = gradient.fgsm(losses.cross_entropy(losses.scaled_apply(saturated, 1e5), None, labels), x, eps=eps)
  np.testing.assert_array_equal(np.asarray(jnp.argmax(saturated(None, x_t), -1)) != np.asarray(labels),
                                d[None, None] < 3 * eps)


def test_targeted_margin_moves_only_the_voxels_that_must_change():
  x, labels, d = _voxels_with_known_margins()
  target = jnp.where(jnp.arange(100)[None, None] % 4 < 2, 1 - labels, labels)  # half of the voxels must flip
  must = np.asarray(target != labels)[0, 0]
  model = _linear_voxel_model(1.0)
  loss = losses.targeted_margin(model, None, target, labels)
  g = np.asarray(jax.grad(lambda v: loss(v).sum())(x))[0, 0]
  assert np.all(g[~must] == 0) and np.all(np.abs(g[must]).sum(-1) > 0)
  eps = 0.1
  x_adv = gradient.fgsm(loss, x, eps=eps, targeted=True)
  pred = np.asarray(jnp.argmax(model(None, x_adv), -1))[0, 0]
  np.testing.assert_array_equal(pred == np.asarray(target)[0, 0], ~must | (d < 3 * eps))
  np.testing.assert_array_equal(np.asarray(x_adv)[0, 0, ~must], np.asarray(x)[0, 0, ~must])
  assert float(loss(x_adv)[0]) < float(loss(x)[0])


def test_scaled_apply_divides_and_compares_by_value():
  model = _linear_voxel_model(3.0)
  x = jnp.ones((1, 2, 2, 2))
  np.testing.assert_allclose(losses.scaled_apply(model, 4.0)(None, x), model(None, x) / 4.0, rtol=1e-6)
  assert losses.scaled_apply(model, 4.0) == losses.scaled_apply(model, 4)  # hashable static: one compile
  assert hash(losses.scaled_apply(model, 4.0)) == hash(losses.scaled_apply(model, 4))
  with pytest.raises(ValueError, match="temperature"):
    losses.scaled_apply(model, 0.0)
  with pytest.raises(ValueError, match="kappa"):
    losses.targeted_margin(model, None, jnp.zeros((1, 2), jnp.int32), jnp.zeros((1, 2), jnp.int32), kappa=-1)
