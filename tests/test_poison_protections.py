"""The protection registry: its order and errors, and that each noise entry is the library function it wraps
with the random stream it always used (so study 4's protected data, and so its numbers, did not move)."""
import jax
import ml_collections
import numpy as np
import pytest

from mri_poison.data import phantom
from mri_poison.data.preprocess import preprocess_case
from mri_poison.poison import protections
from mri_poison.poison import unlearnable as ul


@pytest.fixture(scope="module")
def data():
  cases = [preprocess_case(phantom.make_case(s, shape=(24, 24, 24)), shape=(16, 16, 8)) for s in range(2)]
  return ul.slice_set(cases, width=3)


def _inputs(data, eps=8 / 255, seed=3):
  config = ml_collections.ConfigDict(dict(model=dict(out_channels=4), protect=dict(classpattern=dict(tile=2))))
  return protections.Inputs(config, data, eps, jax.random.PRNGKey(seed), "/nonexistent")


def test_names_start_with_the_clean_reference_and_errors_name_the_choices():
  assert protections.names() == ("none", "random", "classwise", "classpattern", "minmin", "umed")
  assert [protections.get(n).trained for n in protections.names()] == [False] * 4 + [True] * 2
  with pytest.raises(ValueError, match=r"unknown protection 'umd': expected one of \('none', 'random'"):
    protections.get("umd")
  with pytest.raises(ValueError, match="registered twice"):
    protections.register(protections.Protection("none", 0, "again", lambda a: None))


def test_noise_entries_are_the_library_functions_on_their_own_streams(data):
  a = _inputs(data)
  key = jax.random.PRNGKey(3)
  images, info = protections.get("none").run(a)
  np.testing.assert_array_equal(images, data["image"])
  assert info == {}
  expected = {"random": ul.random_noise(jax.random.fold_in(key, 1), data, a.eps),
              "classwise": ul.classwise_noise(jax.random.fold_in(key, 4), data, a.eps, 4),
              "classpattern": ul.classpattern_noise(jax.random.fold_in(key, 5), data, a.eps, 4, 2)}
  for name, want in expected.items():
    images, info = protections.get(name).run(a)
    np.testing.assert_array_equal(images, np.asarray(want))
    assert info == {} and not np.array_equal(images, data["image"]), name
