"""Losses against numpy hand computations on tiny arrays."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mri_poison import losses
from mri_poison.attacks import losses as attack_losses

B, S, K = 2, (3, 4), 4


def _np_softmax(z, axis=-1):
  e = np.exp(z - z.max(axis, keepdims=True))
  return e / e.sum(axis, keepdims=True)


def _data(seed=0, k=K):
  rng = np.random.default_rng(seed)
  logits = rng.normal(size=(B, *S, k)).astype(np.float32) * 2
  labels = rng.integers(0, 4, size=(B, *S)).astype(np.int32)
  mask = rng.random((B, *S)) > 0.3
  return logits, labels, mask


def test_cross_entropy_matches_numpy_with_and_without_mask():
  logits, labels, mask = _data()
  p = _np_softmax(logits.astype(np.float64))
  nll = -np.log(np.take_along_axis(p, labels[..., None], -1)[..., 0])
  want = nll.reshape(B, -1).mean(1)
  want_masked = np.array([nll[b][mask[b]].mean() for b in range(B)])
  got = losses.cross_entropy(logits, labels)
  assert got.shape == (B,)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  np.testing.assert_allclose(losses.cross_entropy(logits, labels, mask), want_masked, rtol=1e-5)
  # Broadcastable mask (1, 3, 1): keep rows 0 and 2 in every example.
  rows = np.array([1, 0, 1], bool)[None, :, None]
  want_rows = nll[:, [0, 2], :].reshape(B, -1).mean(1)
  np.testing.assert_allclose(losses.cross_entropy(logits, labels, rows), want_rows, rtol=1e-5)
  # bfloat16 logits are computed in float32.
  assert losses.cross_entropy(jnp.asarray(logits, jnp.bfloat16), labels).dtype == jnp.float32


def test_hand_computed_two_voxel_cross_entropy():
  # logits [0, ln 3] -> p = [1/4, 3/4]; labels 1 and 0 -> mean(-ln 3/4, -ln 1/4) = ln(16/3) / 2.
  logits = np.array([[[0.0, np.log(3.0)], [0.0, np.log(3.0)]]], np.float32)
  got = losses.cross_entropy(logits, np.array([[1, 0]]))
  np.testing.assert_allclose(got, [np.log(16 / 3) / 2], rtol=1e-6)


def _np_dice_loss(probs, onehot, mask, smooth):
  m = mask[..., None].astype(np.float64)
  axes = tuple(range(1, probs.ndim - 1))
  inter = (probs * onehot * m).sum(axes)
  den = (probs * m).sum(axes) + (onehot * m).sum(axes)
  return 1 - ((2 * inter + smooth) / (den + smooth)).mean(-1)


@pytest.mark.parametrize("include_background", [False, True])
def test_soft_dice_matches_numpy(include_background):
  logits, labels, mask = _data(1)
  p = _np_softmax(logits.astype(np.float64))
  onehot = np.eye(K)[labels]
  first = 0 if include_background else 1
  for m in (np.ones_like(mask), mask):
    want = _np_dice_loss(p[..., first:], onehot[..., first:], m, 1e-5)
    got = losses.soft_dice(logits, labels, m, include_background=include_background)
    assert got.shape == (B,)
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_soft_dice_hand_cases():
  labels = np.array([[0, 1, 1, 2]])
  perfect = 100.0 * np.eye(3)[labels]
  np.testing.assert_allclose(losses.soft_dice(perfect, labels), [0.0], atol=1e-6)
  # Predict class 1 everywhere: class 1 Dice = 2*2 / (4 + 2) = 2/3, class 2 Dice = 0 -> loss 1 - 1/3.
  all_one = 100.0 * np.eye(3)[np.ones_like(labels)]
  np.testing.assert_allclose(losses.soft_dice(all_one, labels), [2 / 3], atol=1e-5)
  # A class absent from both prediction and labels counts as Dice 1.
  np.testing.assert_allclose(losses.soft_dice(100.0 * np.eye(3)[np.zeros_like(labels)], np.zeros_like(labels)),
                             [0.0], atol=1e-6)


def test_ce_dice_is_the_sum():
  logits, labels, mask = _data(2)
  np.testing.assert_allclose(
      losses.ce_dice(logits, labels, mask),
      losses.cross_entropy(logits, labels, mask) + losses.soft_dice(logits, labels, mask), rtol=1e-6)


def test_region_bce_dice_matches_numpy():
  logits, labels, mask = _data(3, k=3)
  z = logits.astype(np.float64)
  s = 1 / (1 + np.exp(-z))
  t = np.stack([labels > 0, (labels == 1) | (labels == 3), labels == 3], -1).astype(np.float64)
  bce = -(t * np.log(s) + (1 - t) * np.log(1 - s)).mean(-1)
  for m in (np.ones_like(mask), mask):
    want = np.array([bce[b][m[b]].mean() for b in range(B)]) + _np_dice_loss(s, t, m, 1e-5)
    np.testing.assert_allclose(losses.region_bce_dice(logits, labels, m), want, rtol=1e-5)
  with pytest.raises(ValueError, match="3 region logits"):
    losses.region_bce_dice(np.zeros((1, 2, 4)), np.zeros((1, 2), int))


def test_distillation_matches_numpy_and_is_minimised_by_the_teacher():
  logits, _, mask = _data(4)
  rng = np.random.default_rng(5)
  teacher = _np_softmax(rng.normal(size=logits.shape))
  for t in (1.0, 3.0):
    ce = -(teacher * np.log(_np_softmax(logits.astype(np.float64) / t))).sum(-1)
    want = t**2 * np.array([ce[b][mask[b]].mean() for b in range(B)])
    got = losses.distillation(logits, teacher, jnp.float32(t), mask)
    assert got.shape == (B,)
    np.testing.assert_allclose(got, want, rtol=1e-5)
  # Soft targets equal to the student's own tempered softmax: zero gradient (the minimum over logits).
  t = 2.5
  own = _np_softmax(logits / t)
  g = jax.grad(lambda z: jnp.sum(losses.distillation(z, own, t, mask)))(jnp.asarray(logits))
  np.testing.assert_allclose(g, 0.0, atol=1e-6)


def test_masked_voxels_do_not_matter():
  logits, labels, mask = _data(6)
  changed = np.where(mask[..., None], logits, 50.0 * np.random.default_rng(0).normal(size=logits.shape))
  other_labels = np.where(mask, labels, 3 - labels)
  for fn in (losses.cross_entropy, losses.soft_dice, losses.ce_dice):
    np.testing.assert_allclose(fn(changed, other_labels, mask), fn(logits, labels, mask), rtol=1e-6)
  np.testing.assert_allclose(losses.region_bce_dice(changed[..., :3], other_labels, mask),
                             losses.region_bce_dice(logits[..., :3], labels, mask), rtol=1e-6)
  # An example with an empty mask contributes 0 (not NaN).
  empty = mask.copy()
  empty[1] = False
  assert np.all(np.isfinite(losses.ce_dice(logits, labels, empty)))
  assert float(losses.cross_entropy(logits, labels, empty)[1]) == 0.0


def test_deep_supervision_loss_downsamples_and_weights():
  rng = np.random.default_rng(7)
  labels = rng.integers(0, 3, size=(2, 8, 8))
  outs = (rng.normal(size=(2, 8, 8, 3)), rng.normal(size=(2, 4, 4, 3)), rng.normal(size=(2, 2, 2, 3)))
  ce = losses.cross_entropy
  parts = [ce(outs[0], labels), ce(outs[1], labels[:, ::2, ::2]), ce(outs[2], labels[:, ::4, ::4])]
  want = (4 * parts[0] + 2 * parts[1] + parts[2]) / 7
  np.testing.assert_allclose(losses.deep_supervision_loss(ce, outs, labels), want, rtol=1e-6)
  np.testing.assert_allclose(losses.deep_supervision_loss(ce, outs, labels, weights=[1, 0, 0]), parts[0], rtol=1e-6)


def test_masked_mean_conventions():
  rng = np.random.default_rng(8)
  values = rng.normal(size=(B, *S)).astype(np.float32)
  weights = rng.random((B, *S)).astype(np.float32)
  want = (values * weights).reshape(B, -1).sum(1) / weights.reshape(B, -1).sum(1)
  np.testing.assert_allclose(losses.masked_mean(values, weights), want, rtol=1e-5)  # a weighted mean
  # Weights summing to less than 1 still give the weighted mean (floor 1e-12, not 1).
  np.testing.assert_allclose(losses.masked_mean(values, 0.01 * weights), want, rtol=1e-5)
  np.testing.assert_allclose(losses.masked_mean(values), values.reshape(B, -1).mean(1), rtol=1e-5)
  # An empty mask gives 0 and a zero gradient, not NaN.
  empty = np.zeros((B, *S), bool)
  assert np.all(np.asarray(losses.masked_mean(values, empty)) == 0.0)
  g = jax.grad(lambda v: jnp.sum(losses.masked_mean(v, empty)))(jnp.asarray(values))
  assert np.all(np.asarray(g) == 0.0)
  np.testing.assert_allclose(losses.soft_dice_loss(np.ones((B, *S, 2)), np.ones((B, *S, 2)), empty), 0.0)


def test_attack_reducers_are_the_training_losses():
  logits, labels, mask = _data(9)
  identity = lambda params, z: z
  for m in (None, mask, mask.astype(np.float32), 0.01 * mask.astype(np.float32)):
    ce = attack_losses.cross_entropy(identity, None, labels, m)
    np.testing.assert_array_equal(ce(logits), losses.cross_entropy(logits, labels, m))
    np.testing.assert_array_equal(ce.reduce(jnp.asarray(logits), labels, m, 0, 1),
                                  losses.cross_entropy(logits, labels, m))
    np.testing.assert_array_equal(attack_losses.dice(identity, None, labels, m)(logits),
                                  losses.soft_dice(logits, labels, m, include_background=True))
    np.testing.assert_array_equal(attack_losses.targeted_dice(identity, None, labels, m)(logits),
                                  losses.soft_dice(logits, labels, m, include_background=True))
    region_bce = attack_losses.region_bce(identity, None, labels, m)(logits[..., :3])
    region_dice = attack_losses.region_dice(identity, None, labels, m)(logits[..., :3])
    np.testing.assert_array_equal(region_bce, losses.region_bce(logits[..., :3], labels, m))
    np.testing.assert_array_equal(region_dice, losses.region_dice(logits[..., :3], labels, m))
    np.testing.assert_array_equal(region_bce + region_dice, losses.region_bce_dice(logits[..., :3], labels, m))
    # SegPGD at t = T + 1 (lambda = 1/2) weighs right and wrong voxels alike: half the cross-entropy.
    segpgd = attack_losses.segpgd(identity, None, labels, steps=4, mask=m)
    np.testing.assert_allclose(segpgd(logits, 4), 0.5 * losses.cross_entropy(logits, labels, m), rtol=1e-6)
  # Gradients agree too (the attack's input gradient is the training loss's gradient).
  g_attack = jax.grad(lambda z: jnp.sum(attack_losses.cross_entropy(identity, None, labels, mask)(z)))(logits)
  g_train = jax.grad(lambda z: jnp.sum(losses.cross_entropy(z, labels, mask)))(logits)
  np.testing.assert_array_equal(g_attack, g_train)


def test_training_losses_listed_take_logits_labels_mask():
  logits, labels, mask = _data(10)
  for name in losses.TRAINING_LOSSES:
    z = logits[..., :3] if name.startswith("region") else logits  # region models: 3 sigmoid logits
    out = getattr(losses, name)(z, labels, mask)
    assert out.shape == (B,) and out.dtype == jnp.float32 and np.all(np.isfinite(np.asarray(out))), name
  with pytest.raises(ValueError, match="must be labels"):
    losses.voxel_cross_entropy(logits, labels[:, :2])
