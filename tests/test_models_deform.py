"""models.deform: the generator's outputs respect the budgets, and its gate makes their size increase with Delta."""
import jax
import jax.numpy as jnp
import numpy as np

from mri_poison.models.deform import DeformGenerator


def _randomised(params, key):
  """The heads start at zero (the identity transformation): give every weight a random value to see a field."""
  leaves, tree = jax.tree_util.tree_flatten(params)
  keys = jax.random.split(key, len(leaves))
  return jax.tree_util.tree_unflatten(tree, [l if l.ndim == 0 else jax.random.normal(k, l.shape) for l, k in
                                             zip(leaves, keys)])


def test_gated_fields_grow_with_delta_in_one_direction_within_the_budgets():
  x = jax.random.normal(jax.random.PRNGKey(0), (3, 16, 16, 4))
  gen = DeformGenerator(grid=4, bias_grid=3, features=(4, 8), gate=True)
  params = _randomised(gen.init(jax.random.PRNGKey(1), x, jnp.zeros((3,)))["params"], jax.random.PRNGKey(2))
  assert float(params["gate_w"]) == 10.0 and float(params["gate_b"]) == -1.5  # scalars keep their initial values
  deltas = (0.05, 0.1, 0.2, 0.35)
  out = [gen.apply({"params": params}, x, jnp.full((3,), d)) for d in deltas]
  norms = np.stack([np.asarray(jnp.linalg.norm(o["disp"], axis=-1)).mean(axis=(1, 2)) for o in out])
  assert np.all(np.diff(norms, axis=0) > 0), norms  # every case, every step up in Delta
  assert all(float(jnp.max(jnp.linalg.norm(o["disp"], axis=-1))) <= 1.0 for o in out)
  assert all(float(jnp.max(jnp.abs(o["bias"]))) <= 1.0 for o in out)
  # The gate is one scale per case: the same weights without the gate, times sigmoid(softplus(10) Delta - 1.5).
  plain = DeformGenerator(grid=4, bias_grid=3, features=(4, 8))
  rest = {k: v for k, v in params.items() if not k.startswith("gate_")}
  gate = lambda d: 1.0 / (1.0 + np.exp(-(np.log1p(np.exp(10.0)) * d - 1.5)))
  for d, o in zip(deltas, out):
    ungated = plain.apply({"params": rest}, x, jnp.full((3,), d))
    for k in ("disp", "bias"):
      np.testing.assert_allclose(np.asarray(o[k]), np.asarray(ungated[k]) * gate(d), rtol=1e-5, atol=1e-7)

def test_without_the_gate_there_is_no_gate_parameter_and_a_zero_head_is_the_identity():
  x = jnp.ones((2, 8, 8, 8, 1))
  gen = DeformGenerator(grid=2, bias_grid=2, features=(4,))
  params = gen.init(jax.random.PRNGKey(0), x, jnp.zeros((2,)))["params"]
  assert "gate_w" not in params and "gate_b" not in params
  out = gen.apply({"params": params}, x, jnp.full((2,), 0.3))
  assert out["disp"].shape == (2, 2, 2, 2, 3) and out["bias"].shape == (2, 2, 2, 2, 1)
  assert float(jnp.max(jnp.abs(out["disp"]))) == 0.0 and float(jnp.max(jnp.abs(out["bias"]))) == 0.0
