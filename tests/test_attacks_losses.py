"""Dense attack losses: SegPGD schedule, CosPGD stop-gradient weights, Dice/region losses, target maps."""
import jax
import jax.numpy as jnp
import numpy as np

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
