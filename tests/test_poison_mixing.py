"""Mixing real and synthetic cases: exact counts, nested seeded choices, labels kept."""
import numpy as np
import pytest

from mri_poison.data.case import Case
from mri_poison.poison import mixing


def cases(n):
  return [Case(image=np.full((4, 4, 2, 1), i + 1.0, np.float32), modalities=("t1ce",),
               label=np.full((4, 4, 2), i % 4, np.int32), affine=np.eye(4), spacing=(1.0, 1.0, 1.0),
               case_id=f"c{i}") for i in range(n)]


@pytest.mark.parametrize("n", [12, 13])
def test_replace_and_add_give_exactly_the_requested_counts(n):
  real = cases(n)
  synth = [np.full((4, 4, 2), -(i + 1.0), np.float32) for i in range(n)]
  previous = set()
  for k in range(6):
    want = int(np.floor(k * n / 6 + 0.5))
    mixed, rec = mixing.mix_cases(real, synth, k, mode="replace", seed=3)
    assert len(mixed) == n and rec["n_synthetic"] == want and rec["n_real"] == n - want
    is_syn = [m.image.mean() < 0 for m in mixed]
    assert sum(is_syn) == want
    chosen = {m.case_id for m, s in zip(mixed, is_syn) if s}
    assert chosen == set(rec["synthetic_cases"]) and previous <= chosen  # nested across k
    previous = chosen
    for m, r in zip(mixed, real):  # labels and ids kept; a synthetic image is its own case's
      np.testing.assert_array_equal(m.label, r.label)
      assert m.case_id == r.case_id and abs(m.image.mean()) == r.image.mean()
    added, rec_a = mixing.mix_cases(real, synth, k, mode="add", seed=3)
    assert len(added) == n + want and rec_a["n_real"] == n and rec_a["n_synthetic"] == want
    assert sum(a.image.mean() < 0 for a in added) == want and added[:n] == real
    assert rec_a["synthetic_cases"] == rec["synthetic_cases"]
    np.testing.assert_allclose(rec_a["share"], want / (n + want))
  if n == 12:
    assert rec["share"] == 5 / 6


def test_choice_is_seeded_and_inputs_checked():
  assert mixing.choose_synthetic(24, 3, seed=1) == mixing.choose_synthetic(24, 3, seed=1)
  assert mixing.choose_synthetic(24, 3, seed=1) != mixing.choose_synthetic(24, 3, seed=2)
  with pytest.raises(ValueError, match="sweep.mode"):
    mixing.mix_cases(cases(2), [np.zeros((4, 4, 2))] * 2, 1, mode="swap")
  with pytest.raises(ValueError, match="share k"):
    mixing.n_synthetic(6, 7)
