"""eps sweeps in one compiled call, and the sanity checks / robust-fraction protocol."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mri_poison.attacks import gradient
from mri_poison.attacks import losses
from mri_poison.attacks import sanity
from mri_poison.attacks import eps_sweep
from test_attacks_gradient import make_problem, tiny_apply, evaluate  # pylint: disable=g-bad-import-order


@pytest.fixture(scope="module")
def problem():
  return make_problem(2)


def test_sweep_traces_once_and_matches_separate_calls(problem):
  x, labels, params, _ = problem
  lf = losses.cross_entropy(tiny_apply, params, labels)

  @chex.assert_max_traces(n=1)
  def counted_ifgsm(loss_fn, z, **kw):
    return gradient.ifgsm(loss_fn, z, **kw)

  grid = jnp.array([0.05, 0.1, 0.2, 0.4])
  out = eps_sweep.sweep(counted_ifgsm, lf, x, eps=grid, step_size_frac=0.25, steps=4)
  out2 = eps_sweep.sweep(counted_ifgsm, lf, x, eps=grid * 0.5, step_size_frac=0.25, steps=4)  # no retrace
  assert out.shape == (4,) + x.shape and out2.shape == out.shape
  for i, e in enumerate(np.asarray(grid)):
    np.testing.assert_allclose(out[i], gradient.ifgsm(lf, x, eps=e, step_size=e / 4, steps=4), atol=1e-5)
    assert np.abs(np.asarray(out[i] - x)).max() <= e + 1e-5
  chunked = eps_sweep.sweep(gradient.ifgsm, lf, x, eps=grid, step_size_frac=0.25, steps=4, chunk_size=2)
  np.testing.assert_allclose(chunked, out, atol=1e-6)
  loss = np.asarray(jax.vmap(lambda z: evaluate(lf, z))(out)).mean(-1)
  assert np.all(np.diff(loss) > 0)  # larger eps, larger loss


def test_sweep_pgd_with_key(problem):
  x, labels, params, _ = problem
  lf = losses.segpgd(tiny_apply, params, labels, steps=3)
  grid = jnp.array([0.1, 0.3])
  out = eps_sweep.sweep(gradient.pgd, lf, x, eps=grid, step_size_frac=0.5, steps=3, key=jax.random.key(0))
  again = eps_sweep.sweep(gradient.pgd, lf, x, eps=grid, step_size_frac=0.5, steps=3, key=jax.random.key(0))
  np.testing.assert_array_equal(out, again)
  assert np.abs(np.asarray(out[0] - x)).max() <= 0.1 + 1e-5


def test_sanity_checks(problem):
  x, labels, params, mask = problem
  lf = losses.cross_entropy(tiny_apply, params, labels)
  g = sanity.gradient_sanity(lf, x, mask=mask)
  assert np.all(np.asarray(g["finite"])) and np.all(np.asarray(g["zero_grad_fraction"]) < 0.05)
  g0 = sanity.gradient_sanity(lambda z: jnp.sum(jnp.maximum(z, 10.0), axis=(1, 2, 3)), x)  # saturated
  np.testing.assert_allclose(g0["zero_grad_fraction"], 1.0)
  x_adv, hist = gradient.ifgsm(lf, x, eps=0.3, step_size=0.075, steps=6, return_history=True)
  base = sanity.random_sign_baseline(lf, x, eps=0.3, key=jax.random.key(0), x_adv=x_adv)
  assert np.abs(np.asarray(base["x_noise"] - x)).max() <= 0.3 + 1e-5
  assert np.all(np.asarray(base["beats_noise"]))
  assert np.all(np.asarray(base["adv_loss"]) > np.asarray(base["noise_loss"]))
  inc = sanity.loss_increase(hist)
  assert np.all(np.asarray(inc["increased"])) and np.all(np.asarray(inc["monotone_fraction"]) > 0.8)


def test_robust_fraction_and_sequential_protocol():
  dice_clean = np.array([0.8, 0.9, 0.7, 0.3, 0.8])  # mean 0.7 -> threshold 0.35; volume 3 broken when clean
  np.testing.assert_allclose(sanity.robust_fraction([[0.8, 0.9, 0.7, 0.3, 0.8], [0.1, 0.36, 0.2, 0.3, 0.9]],
                                                    dice_clean.mean()), [0.8, 0.4])
  calls = []

  def weak(idx):
    calls.append(("weak", idx.tolist()))
    return np.where(idx == 0, 0.1, 0.6)

  def strong(idx):
    calls.append(("strong", idx.tolist()))
    return np.where(idx == 1, 0.2, 0.5)

  out = sanity.sequential_robustness([("weak", weak), ("strong", strong)], dice_clean)
  assert calls == [("weak", [0, 1, 2, 4]), ("strong", [1, 2, 4])]  # only still-robust volumes are attacked
  assert out["robust_after"] == {"weak": 0.6, "strong": 0.4}
  np.testing.assert_array_equal(out["robust"], [False, False, True, False, True])
  assert list(out["broken_by"]) == ["weak", "strong", "", "clean", ""]
  np.testing.assert_allclose(out["worst_dice"], [0.1, 0.2, 0.5, 0.3, 0.5])
