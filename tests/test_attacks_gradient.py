"""FGSM / i-FGSM / PGD: eps-ball, bounds and mask invariants, closed forms, targeted, determinism."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mri_poison.attacks import gradient
from mri_poison.attacks import loop
from mri_poison.attacks import losses

TOL = 1e-5  # (x + d) - x differs from d by float rounding


def _conv(x, w):
  sp = "DHW"[3 - (x.ndim - 2):]
  return jax.lax.conv_general_dilated(x, w, (1,) * (x.ndim - 2), "SAME",
                                      dimension_numbers=("N" + sp + "C", sp + "IO", "N" + sp + "C"))


def tiny_init(key, ndim, channels=2, classes=4, hidden=8):
  k1, k2 = jax.random.split(key)
  return {"w1": 0.5 * jax.random.normal(k1, (3,) * ndim + (channels, hidden)),
          "w2": 0.5 * jax.random.normal(k2, (1,) * ndim + (hidden, classes))}


def tiny_apply(params, x):
  return _conv(jnp.tanh(_conv(x, params["w1"])), params["w2"])


@jax.jit
def evaluate(loss_fn, x):
  return loss_fn(x)  # losses are pytrees: one compiled call instead of many eager ops


@functools.partial(jax.jit, static_argnums=0)
def make_problem(ndim):
  params = tiny_init(jax.random.key(ndim), ndim)
  shape = (3,) + ((16, 16) if ndim == 2 else (8, 8, 8)) + (2,)
  x = jnp.clip(jax.random.normal(jax.random.key(10), shape), -2.0, 2.0)
  noisy = x + 0.5 * jax.random.normal(jax.random.key(11), shape)
  labels = jnp.argmax(tiny_apply(params, noisy), -1)  # labels the model mostly gets right
  mask = jax.random.bernoulli(jax.random.key(12), 0.6, shape[:-1])  # a voxel mask (B, *S)
  return x, labels, params, mask


@pytest.fixture(scope="module", params=[2, 3], ids=["2d16", "3d8"])
def problem_nd(request):
  return make_problem(request.param)


@pytest.fixture(scope="module")
def problem():
  return make_problem(2)


def _attacks():
  yield "fgsm", lambda lf, x, **kw: gradient.fgsm(lf, x, **kw), "linf"
  yield "ifgsm", lambda lf, x, **kw: gradient.ifgsm(lf, x, step_size=0.1, steps=4, **kw), "linf"
  yield "pgd_linf", lambda lf, x, **kw: gradient.pgd(lf, x, step_size=0.1, steps=4, key=jax.random.key(0),
                                                     restarts=2, **kw), "linf"
  yield "pgd_l2", lambda lf, x, **kw: gradient.pgd(lf, x, step_size=0.5, steps=4, key=jax.random.key(0),
                                                   norm="l2", **kw), "l2"


@pytest.mark.parametrize("name,attack,norm", list(_attacks()), ids=[a[0] for a in _attacks()])
def test_eps_ball_bounds_and_mask(problem_nd, name, attack, norm):
  x, labels, params, mask = problem_nd
  lf = losses.cross_entropy(tiny_apply, params, labels)
  eps = jnp.array([0.2, 0.05, 0.3]) if norm == "linf" else jnp.array([2.0, 0.5, 3.0])  # per example
  lower, upper = -2.0, 1.9  # some voxels of x sit on the bounds, some (x > 1.9) will be clipped
  x = jnp.clip(x, lower, upper)
  x_adv = attack(lf, x, eps=eps, lower=lower, upper=upper, mask=mask)
  d = np.asarray(x_adv - x)
  assert x_adv.shape == x.shape and np.all(np.isfinite(d))
  if norm == "linf":
    assert np.all(np.abs(d) <= np.asarray(eps).reshape(-1, *[1] * (x.ndim - 1)) + TOL)
    # sign steps reach the corners of the ball on most free voxels
    assert np.mean(np.abs(d)[np.broadcast_to(np.asarray(mask)[..., None], d.shape)] > 0) > 0.5
  else:
    norms = np.sqrt(np.sum(d.reshape(d.shape[0], -1) ** 2, -1))
    assert np.all(norms <= np.asarray(eps) * (1 + TOL))
    assert np.all(norms > 0.5 * np.asarray(eps))
  assert np.all(np.asarray(x_adv) >= lower) and np.all(np.asarray(x_adv) <= upper)
  outside = ~np.broadcast_to(np.asarray(mask)[..., None], d.shape)
  assert np.all(d[outside] == 0.0)
  assert np.all(np.asarray(evaluate(lf, x_adv)) > np.asarray(evaluate(lf, x)))


def test_per_channel_eps_and_channel_mask(problem):
  x, labels, params, _ = problem
  lf = losses.cross_entropy(tiny_apply, params, labels)
  x_adv = gradient.ifgsm(lf, x, eps=jnp.array([0.1, 0.3]), step_size=0.1, steps=3)
  d = np.abs(np.asarray(x_adv - x))
  assert d[..., 0].max() <= 0.1 + TOL and d[..., 1].max() <= 0.3 + TOL and d[..., 1].max() > 0.29
  # attack only the second modality
  only_c1 = jnp.array([0.0, 1.0]).reshape((1,) * (x.ndim - 1) + (2,))
  x_adv = gradient.fgsm(lf, x, eps=0.1, mask=only_c1)
  assert np.all(np.asarray(x_adv[..., 0]) == np.asarray(x[..., 0]))
  with pytest.raises(ValueError, match="ambiguous"):
    gradient.fgsm(lf, x[:2], eps=jnp.array([0.1, 0.2]))  # B == C == 2
  with pytest.raises(ValueError, match="l2"):
    gradient.pgd(lf, x, eps=jnp.array([0.1, 0.3]), step_size=0.1, steps=1, key=jax.random.key(0), norm="l2")


def test_fgsm_closed_form_linear_model():
  # loss = sum(w * x) per example -> grad = w, so FGSM is x + eps * sign(w), clipped to the bounds.
  w = jax.random.normal(jax.random.key(1), (1, 6, 6, 3))
  x = jax.random.uniform(jax.random.key(2), (2, 6, 6, 3))
  loss_fn = lambda z: jnp.sum(w * z, axis=(1, 2, 3))
  eps = jnp.array([0.1, 0.25])
  got = gradient.fgsm(loss_fn, x, eps=eps, lower=0.0, upper=1.0)
  want = jnp.clip(x + eps[:, None, None, None] * jnp.sign(w), 0.0, 1.0)
  np.testing.assert_allclose(got, want, atol=1e-6)
  got_t = gradient.fgsm(loss_fn, x, eps=0.1, targeted=True)
  np.testing.assert_allclose(got_t, x - 0.1 * jnp.sign(w), atol=1e-6)
  # a scalar loss (mean over the batch) gives the same sign step
  np.testing.assert_allclose(gradient.fgsm(lambda z: jnp.mean(loss_fn(z)), x, eps=0.1), x + 0.1 * jnp.sign(w),
                             atol=1e-6)


def test_pgd_l2_closed_form_linear_model():
  # L2 PGD on a linear loss converges to x + eps * w / ||w|| whatever the random start.
  w = jax.random.normal(jax.random.key(3), (1, 5, 5, 2))
  x = jax.random.normal(jax.random.key(4), (2, 5, 5, 2))
  x_adv = gradient.pgd(lambda z: jnp.sum(w * z, axis=(1, 2, 3)), x, eps=1.0, step_size=1.0, steps=20,
                       key=jax.random.key(5), norm="l2")
  np.testing.assert_allclose(x_adv, x + w / jnp.linalg.norm(w), atol=1e-3)


def test_ifgsm_beats_fgsm_and_loss_increases(problem):
  x, labels, params, _ = problem
  lf = losses.cross_entropy(tiny_apply, params, labels)
  clean = np.asarray(evaluate(lf, x))
  l_fgsm = np.asarray(evaluate(lf, gradient.fgsm(lf, x, eps=0.3)))
  x_i, hist = gradient.ifgsm(lf, x, eps=0.3, step_size=0.075, steps=10, return_history=True)
  l_i = np.asarray(evaluate(lf, x_i))
  assert np.all(l_fgsm > clean) and np.all(l_i >= l_fgsm - 1e-6) and np.mean(l_i) > np.mean(l_fgsm)
  h = np.asarray(hist["loss"])
  assert h.shape == (10, x.shape[0])
  np.testing.assert_allclose(h[0], clean, rtol=1e-5)
  np.testing.assert_allclose(hist["final_loss"], l_i, rtol=1e-5)
  assert np.all(np.asarray(hist["final_loss"]) > h[0]) and np.all(h[-1] > h[0])


def test_targeted_lowers_target_loss(problem):
  x, labels, params, _ = problem
  target = losses.target_erase_tumour(labels)
  for lf in (losses.targeted_cross_entropy(tiny_apply, params, target),
             losses.targeted_cospgd(tiny_apply, params, target),
             losses.targeted_dice(tiny_apply, params, target)):
    before = np.asarray(evaluate(lf, x))
    after = np.asarray(evaluate(lf, gradient.ifgsm(lf, x, eps=0.5, step_size=0.1, steps=6, targeted=True)))
    assert np.all(after < before)
  after_p = evaluate(lf, gradient.pgd(lf, x, eps=0.5, step_size=0.1, steps=6, key=jax.random.key(1),
                                      targeted=True))
  assert np.all(np.asarray(after_p) < before)
  pred = jax.jit(lambda z: jnp.argmax(tiny_apply(params, z), -1))
  lf = losses.targeted_cross_entropy(tiny_apply, params, target)
  x_adv = gradient.ifgsm(lf, x, eps=0.5, step_size=0.1, steps=6, targeted=True)
  assert np.mean(pred(x_adv) == 0) > np.mean(pred(x) == 0) + 0.1


def test_pgd_determinism_and_restarts(problem):
  x, labels, params, _ = problem
  lf = losses.cross_entropy(tiny_apply, params, labels)
  kw = dict(eps=0.2, step_size=0.05, steps=3, restarts=3)
  a = gradient.pgd(lf, x, key=jax.random.key(7), **kw)
  b = gradient.pgd(lf, x, key=jax.random.key(7), **kw)
  c = gradient.pgd(lf, x, key=jax.random.key(8), **kw)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(np.asarray(a), np.asarray(c))
  x_best, hist = gradient.pgd(lf, x, key=jax.random.key(7), return_history=True, **kw)
  np.testing.assert_array_equal(a, x_best)
  final = np.asarray(hist["final_loss"])  # (restarts, B)
  assert final.shape == (3, x.shape[0])
  np.testing.assert_allclose(evaluate(lf, x_best), final.max(0), rtol=1e-5)  # best restart per example


def test_one_compile_for_new_eps_and_new_batch(problem):
  x, labels, params, _ = problem
  compiled = gradient._iterative.compiled  # pylint: disable=protected-access
  lf = losses.cross_entropy(tiny_apply, params, labels)
  gradient.ifgsm(lf, x, eps=0.1, step_size=0.02, steps=2)
  n = compiled._cache_size()
  lf2 = losses.cross_entropy(tiny_apply, jax.tree.map(lambda p: p * 1.1, params), labels[::-1])
  gradient.ifgsm(lf2, x[::-1], eps=0.3, step_size=0.05, steps=2)
  assert compiled._cache_size() == n


def test_loss_fn_with_step_sees_iteration_index():
  seen = []
  def loss_fn(z, step):
    seen.append(step)
    return jnp.sum(z, axis=(1, 2)) * (step + 1).astype(jnp.float32)
  x = jnp.zeros((2, 3, 3))
  _, hist = gradient.ifgsm(loss_fn, x, eps=1.0, step_size=0.1, steps=3, return_history=True)
  # loss at x_t is (t + 1) * 9 * 0.1 * t
  np.testing.assert_allclose(hist["loss"][:, 0], [0.0, 2 * 0.9, 3 * 1.8], rtol=1e-5)
  assert loop.takes_step(loss_fn) and not loop.takes_step(lambda z: z)
