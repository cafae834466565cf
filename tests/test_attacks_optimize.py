"""The general loop `optimize` and the `sign_step` update: optima, direction, per-example stopping, pytrees,
and FGSM / i-FGSM / PGD as its sign-step instance."""
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mri_poison.attacks import gradient
from mri_poison.attacks import loop
from mri_poison.attacks import losses
from mri_poison.attacks.optimize import CPU_UNROLL_LIMIT, UNROLL_ENV, optimize, scan, scan_unroll, sign_step
from mri_poison.models.unet import UNet
from test_attacks_gradient import make_problem, tiny_apply  # pylint: disable=g-bad-import-order

B = 3
CENTRES = jnp.array([1.0, -2.0, 0.5])
SCALES = jnp.array([1.0, 4.0, 0.25])


def quadratic(v, step=None):
  """Per-example a_b * ||v_b - c_b||^2 on v (B, 2, 2): optimum v_b = c_b, value 0."""
  del step
  d = v - CENTRES[:, None, None]
  return SCALES * jnp.sum(d * d, axis=(1, 2))


@functools.partial(jax.jit, static_argnames=("steps", "with_done"))
def adam_run(v0, thresholds, steps, with_done):
  done = (lambda value: value < thresholds) if with_done else None
  return optimize(quadratic, v0, update=optax.adam(0.05), steps=steps, done=done, final_objective=True)


def test_adam_reaches_each_examples_optimum():
  v0 = jnp.zeros((B, 2, 2))
  v, hist = adam_run(v0, None, 400, False)
  np.testing.assert_allclose(v, jnp.broadcast_to(CENTRES[:, None, None], v.shape), atol=2e-3)
  obj = np.asarray(hist["objective"])
  assert obj.shape == (400, B)
  np.testing.assert_allclose(obj[0], quadratic(v0), rtol=1e-6)  # the objective at v_0
  np.testing.assert_allclose(hist["final_objective"], quadratic(v), rtol=1e-6)  # at the returned v
  assert np.all(obj[-1] < 1e-4 * obj[0]) and "done" not in hist


def test_maximize_flips_the_step():
  v0 = jnp.full((B, 2, 2), 0.3)
  g = jax.grad(lambda v: jnp.sum(quadratic(v)))(v0)
  down, _ = optimize(quadratic, v0, update=optax.sgd(0.1), steps=1)
  up, _ = optimize(quadratic, v0, update=optax.sgd(0.1), steps=1, maximize=True)
  np.testing.assert_allclose(down, v0 - 0.1 * g, rtol=1e-6)
  np.testing.assert_allclose(up, v0 + 0.1 * g, rtol=1e-6)
  # maximising the negated quadratic finds the same optimum as minimising the quadratic
  v, hist = optimize(lambda v, t: -quadratic(v), v0, update=optax.adam(0.05), steps=400, maximize=True)
  np.testing.assert_allclose(v, jnp.broadcast_to(CENTRES[:, None, None], v.shape), atol=2e-3)
  assert np.all(np.asarray(hist["objective"][-1]) > np.asarray(hist["objective"][0]))


def test_done_freezes_each_example_at_its_step():
  v0 = jnp.zeros((B, 2, 2))
  # example 0 reaches 0.5 early, example 1 (4x steeper, further away) later, example 2 never reaches 0
  thresholds = jnp.array([0.5, 1.0, 0.0])
  steps = 60
  v, hist = adam_run(v0, thresholds, steps, True)
  done = np.asarray(hist["done"])
  assert done.shape == (steps, B) and hist["objective"].shape == (steps, B)
  assert np.all(done[1:] >= done[:-1])  # once done, always done
  first = [int(np.argmax(done[:, b])) if done[:, b].any() else None for b in range(B)]
  assert first[0] is not None and first[1] is not None and first[0] != first[1] and first[2] is None
  free, _ = adam_run(v0, None, steps, False)
  for b in (0, 1):
    t = first[b]
    # frozen at v_t, the first variables that satisfied done: the same as running the free loop for t steps
    v_t, _ = adam_run(v0, None, t, False)
    np.testing.assert_array_equal(v[b], v_t[b])
    assert float(quadratic(v)[b]) < float(thresholds[b]) <= float(hist["objective"][t - 1, b])
    assert np.all(np.asarray(hist["objective"][t:, b]) == float(hist["objective"][t, b]))
  np.testing.assert_array_equal(v[2], free[2])  # the example never done moved on, untouched by the others
  np.testing.assert_array_equal(hist["final_done"], [True, True, False])


def test_pytree_variables_record_and_bad_done():
  targets = {"disp": jnp.arange(B * 8.0).reshape(B, 2, 2, 2) / 10, "bias": jnp.array([0.2, -0.1, 0.4])[:, None]}
  v0 = jax.tree.map(jnp.zeros_like, targets)

  def objective(v, step):
    del step
    err = jax.tree.map(lambda a, t: jnp.sum(jnp.square(a - t).reshape(B, -1), -1), v, targets)
    return err["disp"] + err["bias"], {"bias_err": err["bias"]}

  v, hist = jax.jit(lambda v: optimize(objective, v, update=optax.adam(0.05), steps=300,
                                       record=lambda aux: aux["bias_err"]))(v0)
  chex.assert_trees_all_close(v, targets, atol=2e-3)
  assert hist["record"].shape == (300, B) and float(hist["record"][-1].max()) < 1e-5
  with pytest.raises(ValueError, match="one flag per example"):
    optimize(objective, v0, update=optax.sgd(0.1), steps=2, done=lambda aux: aux["bias_err"][:2] < 0)
  with pytest.raises(ValueError, match="leading example axis"):
    optimize(objective, {"a": jnp.zeros((B, 2)), "b": jnp.zeros((2,))}, update=optax.sgd(0.1), steps=1,
             done=lambda aux: aux["bias_err"] < 0)


def test_sign_step_updates():
  g = {"a": jax.random.normal(jax.random.key(0), (2, 3, 3)), "b": jax.random.normal(jax.random.key(1), (2, 4))}
  mask = {"a": jnp.ones((1, 3, 3)).at[:, 0].set(0.0), "b": jnp.ones((1, 4))}
  step = jnp.array([0.1, 0.2])[:, None, None]
  lin, _ = sign_step({"a": step, "b": step[..., 0]}, "linf", mask).update(g, optax.EmptyState())
  np.testing.assert_array_equal(lin["a"], -(step * jnp.sign(g["a"] * mask["a"])))
  assert np.all(np.asarray(lin["a"][:, 0]) == 0)
  l2, _ = sign_step(0.5, "l2").update(g, optax.EmptyState())
  # one joint per-example norm over all leaves: -0.5 * g / ||(g_a, g_b)||_2, update norm 0.5 per example
  joint = np.sqrt(sum(np.sum(np.square(np.asarray(u)).reshape(2, -1), -1) for u in g.values()))
  np.testing.assert_allclose(l2["a"], -0.5 * g["a"] / joint[:, None, None], rtol=1e-6)
  np.testing.assert_allclose(l2["b"], -0.5 * g["b"] / joint[:, None], rtol=1e-6)
  norms = np.sqrt(sum(np.sum(np.square(np.asarray(u)).reshape(2, -1), -1) for u in l2.values()))
  np.testing.assert_allclose(norms, 0.5, rtol=1e-6)
  with pytest.raises(ValueError, match="norm"):
    sign_step(0.1, "l1")


@pytest.fixture(scope="module")
def problem():
  return make_problem(2)


def test_sign_step_with_ball_projection_is_ifgsm_and_pgd(problem):
  x, labels, params, mask = problem
  lf = losses.cross_entropy(tiny_apply, params, labels)
  m = loop.broadcast_mask(mask, x)
  eps = jnp.array([0.2, 0.05, 0.3])

  @functools.partial(jax.jit, static_argnames=("norm", "maximize", "steps"))
  def generic(lf, x, m, key, eps, step_size, norm, maximize, steps):  # arrays as arguments, as the attacks have
    e = loop.broadcast_param(eps, x, "eps")
    x0 = x if key is None else loop.random_start(jax.random.split(key, 1)[0], x, eps=e, norm=norm, lower=-2.0,
                                                  upper=1.9, mask=m)  # pgd's start (restarts=1)
    project = loop.ball_projection(x, eps=e, norm=norm, lower=-2.0, upper=1.9, mask=m)
    return optimize(lambda z, t: lf(z), x0, update=sign_step(step_size, norm, m), steps=steps, project=project,
                    maximize=maximize)[0]

  want = gradient.ifgsm(lf, x, eps=eps, step_size=0.05, steps=4, lower=-2.0, upper=1.9, mask=mask)
  np.testing.assert_array_equal(generic(lf, x, m, None, eps, 0.05, "linf", True, 4), want)
  want_t = gradient.ifgsm(lf, x, eps=eps, step_size=0.05, steps=4, lower=-2.0, upper=1.9, mask=mask, targeted=True)
  np.testing.assert_array_equal(generic(lf, x, m, None, eps, 0.05, "linf", False, 4), want_t)
  key = jax.random.key(3)
  eps2 = jnp.array([2.0, 0.5, 3.0])
  want_p = gradient.pgd(lf, x, eps=eps2, step_size=0.5, steps=3, key=key, norm="l2", lower=-2.0, upper=1.9,
                        mask=mask)
  np.testing.assert_array_equal(generic(lf, x, m, key, eps2, 0.5, "l2", True, 3), want_p)


def test_error_minimising_noise_min_step(problem):
  # study 4's inner loop: minimise the surrogate's loss over delta in an L-inf ball (min-min, inner min)
  x, labels, params, _ = problem
  lf = losses.cross_entropy(tiny_apply, params, labels)
  eps = 0.2
  delta, hist = jax.jit(lambda d: optimize(lambda z, t: lf(x + z), d, update=sign_step(eps / 4), steps=8,
                                           project=lambda z: jnp.clip(z, -eps, eps), final_objective=True))(
                                               jnp.zeros_like(x))
  assert float(jnp.abs(delta).max()) <= np.float32(eps)
  obj = np.asarray(hist["objective"])
  assert np.all(np.diff(obj, axis=0) <= 0)  # every step lowers the loss
  assert np.all(np.asarray(hist["final_objective"]) < 0.85 * obj[0])  # ~0.80 of the clean loss at eps 0.2


def test_cpu_unrolled_loop_gives_the_rolled_loops_adversarial_examples_and_stops(monkeypatch):
  """On CPU `optimize` unrolls its loop (the fast form there): PGD on a 3D U-Net and per-example stopping give
  what the rolled `lax.scan` gives."""
  monkeypatch.setenv(UNROLL_ENV, "auto")
  assert scan_unroll(10) is True and scan_unroll(CPU_UNROLL_LIMIT + 1) == 1 and scan_unroll(10, 1) == 1
  monkeypatch.setenv(UNROLL_ENV, "rolled")  # the process-wide override (the test suite's, see conftest.py)
  assert scan_unroll(10) == 1 and scan_unroll(10, True) is True
  monkeypatch.setenv(UNROLL_ENV, "unrolled")
  assert scan_unroll(CPU_UNROLL_LIMIT + 1) is True
  monkeypatch.setenv(UNROLL_ENV, "fast")
  with pytest.raises(ValueError, match="MRI_POISON_UNROLL"):
    scan_unroll(10)
  monkeypatch.setenv(UNROLL_ENV, "auto")
  model = UNet(features=(4, 8), out_channels=3)
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 8, 2))
  variables = model.init(jax.random.key(1), x)
  labels = jax.random.randint(jax.random.key(2), x.shape[:-1], 0, 3)
  loss_fn = losses.cross_entropy(model.apply, variables, labels)

  @functools.partial(jax.jit, static_argnames="unroll")
  def attack(x, unroll):
    return optimize(lambda z, step: loop.per_example_loss(loss_fn, z, step), x, update=sign_step(0.02),
                    steps=6, project=loop.ball_projection(x, eps=0.05, norm="linf"), maximize=True,
                    done=lambda values: values > thresholds, unroll=unroll)

  clean = loop.per_example_loss(loss_fn, x, 0)
  thresholds = clean + jnp.array([1e-3, 1e9])  # example 0 stops early, example 1 runs every step
  (rolled, hist_r), (unrolled, hist_u) = attack(x, 1), attack(x, "auto")
  np.testing.assert_allclose(unrolled, rolled, atol=1e-6)
  np.testing.assert_array_equal(hist_u["done"], hist_r["done"])
  assert bool(hist_r["done"][-1, 0]) and not bool(hist_r["done"][:, 1].any())
  assert float(jnp.abs(rolled - x).max()) == pytest.approx(0.05, abs=1e-6)


@pytest.mark.parametrize("length", [0, 1, 3])
@pytest.mark.parametrize("unroll", [1, 2, True])
def test_scan_equals_lax_scan_whatever_the_unroll(length, unroll):
  """`optimize.scan` emits a complete unroll as straight-line code (a length-1 loop body is slow on XLA:CPU);
  carry and stacked outputs equal lax.scan's."""
  def body(carry, x):
    total, count = carry
    return (total + jnp.sin(x) * count, count + 1), {"seen": x * count, "pair": (x, -x)}

  xs = jnp.arange(length * 2, dtype=jnp.float32).reshape(length, 2)
  init = (jnp.zeros(2), jnp.ones((), jnp.float32))
  expected = jax.lax.scan(body, init, xs)
  got = jax.jit(lambda xs: scan(body, init, xs, unroll=unroll))(xs)
  chex.assert_trees_all_close(got, expected, atol=1e-6)
  chex.assert_trees_all_equal_shapes(got, expected)
  complete = length and (unroll is True or unroll >= length)
  assert ("scan" in str(jax.make_jaxpr(lambda xs: scan(body, init, xs, unroll=unroll))(xs))) != complete
