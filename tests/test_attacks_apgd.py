"""APGD's schedule and SEA's segmentation losses: closed forms, the paper's checkpoints, and what the step-size
halving buys on a problem whose optimum is known."""
import jax
import jax.numpy as jnp
import numpy as np

from mri_poison import losses as seg_losses
from mri_poison.attacks import apgd
from mri_poison.attacks import gradient
from mri_poison.attacks.zoo import sea


def test_checkpoints_are_the_papers():
  # Croce & Hein 2020: p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06); w_j = ceil(p_j N).
  assert apgd.checkpoints(100) == (22, 41, 57, 70, 80, 87, 93, 99)
  assert apgd.checkpoints(10) == (3, 5, 6, 7, 8, 9)
  assert apgd.checkpoints(1) == ()


def test_halving_step_size_converges_where_a_fixed_step_oscillates():
  # Maximise -||x - c||^2 in the eps-ball around 0: the optimum is clip(c, -eps, eps), inside the ball for
  # most coordinates. Sign steps of a fixed size keep jumping over it; APGD halves its step and lands on it.
  c = jnp.asarray(np.random.default_rng(0).uniform(-1.5, 1.5, size=(2, 64)), jnp.float32)
  x, eps = jnp.zeros_like(c), 1.0
  loss = lambda v: -jnp.sum((v - c) ** 2, axis=-1)
  optimum = jnp.clip(c, -eps, eps)
  x_apgd, hist = apgd.apgd(loss, x, eps=eps, steps=100, key=jax.random.PRNGKey(0))
  x_pgd = gradient.pgd(loss, x, eps=eps, step_size=2 * eps / 10, steps=100, key=jax.random.PRNGKey(0))
  err_apgd = float(jnp.max(jnp.abs(x_apgd - optimum)))
  err_pgd = float(jnp.max(jnp.abs(x_pgd - optimum)))
  assert err_apgd < 0.02 and err_pgd > 0.05, (err_apgd, err_pgd)
  assert float(jnp.max(jnp.abs(x_apgd))) <= eps
  # The point returned is the best seen: no iterate had a higher loss.
  assert np.all(np.asarray(loss(x_apgd)) >= np.asarray(hist["loss"]).max(axis=(0, 1)) - 1e-6)


def test_the_point_returned_is_the_best_score_not_the_best_loss():
  # The score prefers points near +eps on coordinate 0 while the loss pulls to -eps: the returned point
  # follows the score. (A masked CE falls as voxels flip, so its best-loss point would be the least flipped.)
  x = jnp.zeros((1, 4), jnp.float32)
  loss_fn = lambda v, step: (-v[:, 0], v[:, 0])  # ascend -v0; aux = v0
  x_adv, _ = apgd.apgd(loss_fn, x, eps=0.5, steps=10, key=jax.random.PRNGKey(3), score=lambda aux: aux)
  x_loss, _ = apgd.apgd(loss_fn, x, eps=0.5, steps=10, key=jax.random.PRNGKey(3))
  assert float(x_loss[0, 0]) == -0.5
  assert float(x_adv[0, 0]) > float(x_loss[0, 0])


def _js_from_definition(logits, labels):
  p = np.asarray(jax.nn.softmax(logits, axis=-1), np.float64)
  q = np.eye(p.shape[-1])[np.asarray(labels)]
  m = (p + q) / 2
  kl = lambda a, b: np.sum(np.where(a > 0, a * np.log(np.where(a > 0, a, 1) / b), 0.0), axis=-1)
  return (kl(p, m) + kl(q, m)) / 2


def test_js_closed_form_matches_the_definition_and_is_bounded():
  rng = np.random.default_rng(1)
  logits = jnp.asarray(rng.normal(scale=4.0, size=(2, 5, 5, 4)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, 4, size=(2, 5, 5)))
  js = np.asarray(sea.voxel_js(logits, labels))
  np.testing.assert_allclose(js, _js_from_definition(logits, labels), atol=1e-6)
  assert js.min() >= -1e-7 and js.max() <= np.log(2) + 1e-7
  huge = jnp.asarray([[[-100.0, 100.0, -100.0, -100.0]]])  # confidently wrong: JS saturates at log 2, CE at 200
  np.testing.assert_allclose(np.asarray(sea.voxel_js(huge, jnp.asarray([[0]]))), np.log(2), rtol=1e-6)


def test_masked_losses_ignore_wrong_voxels_and_balance_the_classes():
  logits = jnp.asarray([[[3.0, 0.0], [0.0, 3.0], [3.0, 0.0], [0.0, 3.0]]])  # (1, 4 voxels, 2 classes)
  labels = jnp.asarray([[0, 0, 0, 1]])  # voxel 1 is wrong
  grad = jax.grad(lambda z: sea._masked_ce(z, labels, None, 0, 1).sum())(logits)  # pylint: disable=protected-access
  assert np.all(np.asarray(grad)[0, 1] == 0) and np.all(np.asarray(grad)[0, 0] != 0)
  # Class shares 3/4 and 1/4: each voxel weighted by 1 - its class's share.
  np.testing.assert_allclose(np.asarray(sea.class_balance(labels, None, 2)), [[0.25, 0.25, 0.25, 0.75]])
  ce = np.asarray(seg_losses.voxel_cross_entropy(logits, labels))[0]
  expected = (0.25 * ce[0] + 0.25 * ce[2] + 0.75 * ce[3]) / 4
  got = sea._balanced_masked_ce(logits, labels, None, 0, 1)  # pylint: disable=protected-access
  np.testing.assert_allclose(float(got[0]), expected, rtol=1e-6)
