"""Min-min lowers its surrogate's loss on the protected data; UMed stays in eps and in ROI + band; PSNR as documented."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from mri_poison import metrics
from mri_poison.data import phantom
from mri_poison.data.preprocess import preprocess_case
from mri_poison.ops import morphology
from mri_poison.poison import protected_io
from mri_poison.poison import unlearnable as ul
from mri_poison.train import state as state_lib
from mri_poison.train import trainer

EPS = 8 / 255


@pytest.fixture(scope="module")
def cases():
  return [preprocess_case(phantom.make_case(s, shape=(24, 24, 24)), shape=(16, 16, 8)) for s in range(3)]


@pytest.fixture(scope="module")
def data(cases):
  return ul.slice_set(cases, width=3)


@pytest.fixture(scope="module")
def surrogate():
  model = state_lib.make_model(ml_collections.ConfigDict(dict(features=(4, 8), out_channels=4, norm="instance")))
  return state_lib.make_apply_fn(model), (lambda key: state_lib.init_params(model, key, (1, 16, 16, 4)))


def _config(steps):
  return ml_collections.ConfigDict({"train": dict(steps=steps, log_every=steps, ckpt_every=steps, keep_checkpoints=1,
                                                  seed=0)})


def test_slice_set_round_trip_and_masks(cases, data):
  n = sum(int((c.image != 0).any(axis=(0, 1, 3)).sum()) for c in cases)
  assert data["image"].shape == (n, 16, 16, 4) and data["lbp"].shape == data["image"].shape
  back = ul.to_volumes(cases, data, data["image"])
  for c, b in zip(cases, back):
    np.testing.assert_array_equal(c.image, b.image)
  tumour = data["label"] > 0
  np.testing.assert_array_equal(data["interior"] | (data["band"] & tumour), tumour)


def test_scaled_psnr_is_documented_formula():
  x = np.random.default_rng(0).normal(size=(6, 6, 4, 2))
  r = ul.case_range(x)
  xp = x + 0.01 * r  # every voxel moved by 1 % of its channel's range
  assert ul.scaled_psnr(x, xp, r) == pytest.approx(40.0, abs=1e-5)
  # one channel: the same as metrics.psnr with the clean channel's range
  assert ul.scaled_psnr(x[..., :1], xp[..., :1], r[:1]) == pytest.approx(metrics.psnr(x[..., 0], xp[..., 0],
                                                                                       data_range=r[0]))
  assert ul.scaled_psnr(x, x, r) == float("inf")


def test_random_noise_budget(data):
  xp = np.asarray(ul.random_noise(jax.random.PRNGKey(0), data, EPS))
  d = np.abs(xp - data["image"]) / data["range"][:, None, None, :]
  assert d.max() <= EPS + 1e-6 and d[data["brain"]].mean() > 0.9 * EPS
  np.testing.assert_array_equal(xp[~data["brain"]], 0.0)


def test_classwise_noise_is_one_pattern_per_class(data):
  xp = np.asarray(ul.classwise_noise(jax.random.PRNGKey(0), data, EPS))
  u = (xp - data["image"]) / data["range"][:, None, None, :]  # scaled units
  assert np.abs(u).max() <= EPS + 1e-6
  np.testing.assert_array_equal(xp[~data["brain"]], 0.0)
  # unclipped voxels of one class at one (x, y) carry the same noise in every slice; classes differ
  free = (xp > data["lo"][:, None, None]) & (xp < data["hi"][:, None, None])
  for k in range(4):
    sel = (data["label"] == k) & data["brain"] & free.all(axis=-1)
    n, x, y = np.nonzero(sel)
    ref = {}
    for i, a, b in zip(n, x, y):
      ref.setdefault((a, b), u[i, a, b])
      np.testing.assert_allclose(u[i, a, b], ref[(a, b)], atol=1e-5)
    assert np.abs(np.asarray(list(ref.values()))).mean() > 0.99 * EPS


def test_classpattern_is_position_independent(data):
  xp = np.asarray(ul.classpattern_noise(jax.random.PRNGKey(0), data, EPS, tile=2))
  u = (xp - data["image"]) / data["range"][:, None, None, :]
  assert np.abs(u).max() <= EPS + 1e-6
  np.testing.assert_array_equal(xp[~data["brain"]], 0.0)
  free = ((xp > data["lo"][:, None, None]) & (xp < data["hi"][:, None, None])).all(-1) & data["brain"]
  # Every unclipped voxel of class k at (x, y) carries tile_k[x % 2, y % 2]: the same anywhere in the slice.
  for k in range(3):
    n, x, y = np.nonzero(free & (data["label"] == k))
    if not len(n):
      continue
    ref = {}
    for i, a, b in zip(n, x, y):
      ref.setdefault((a % 2, b % 2), u[i, a, b])
      np.testing.assert_allclose(u[i, a, b], ref[(a % 2, b % 2)], atol=1e-5)
    assert np.abs(np.asarray(list(ref.values()))).min() > 0.99 * EPS


def _noise_only_problem(n=24, size=12, seed=0):
  """Slices of pure noise with random square 'tumours': no image evidence of the label at all, so only a
  label-aligned perturbation can be learnt (the problem where min-min must win)."""
  rng = np.random.default_rng(seed)
  image = rng.normal(size=(n, size, size, 1)).astype(np.float32)
  label = np.zeros((n, size, size), np.int32)
  for i in range(n):
    a, b = rng.integers(0, size - 5, 2)
    label[i, a:a + 5, b:b + 5] = 1
  return {"image": image, "label": label, "brain": np.ones((n, size, size), bool),
          "range": np.ones((n, 1), np.float32), "lo": np.full((n, 1), -50.0, np.float32),
          "hi": np.full((n, 1), 50.0, np.float32)}


def test_minmin_hallmark_on_a_problem_it_must_win(tmp_path):
  data = _noise_only_problem()
  model = state_lib.make_model(ml_collections.ConfigDict(dict(features=(8, 16), out_channels=2, norm="instance")))
  apply_fn = state_lib.make_apply_fn(model)
  init = lambda key: state_lib.init_params(model, key, (1, 12, 12, 1))
  tx = optax.adam(3e-3)
  eps = 1.0  # one noise SD: larger than the (absent) real signal
  state0 = ul.minmin_init(init, jax.random.PRNGKey(0), data, tx, n_classes=2)
  # Stop at accuracy 1 - 1e-4: at 0.999 the rounds can end with the hallmark just above 0.3 (0.31 measured with
  # the classic threefry stream); at 0.9999 it reaches 0.13.
  step = ul.minmin_step_fn(apply_fn, tx, batch=8, eps=eps, train_steps=10, pgd_steps=10, step_frac=0.1,
                           stop_accuracy=0.9999, n_classes=2)
  dev = {k: jnp.asarray(v) for k, v in data.items()}
  state = trainer.fit(_config(12), str(tmp_path / "mm"), init_state=state0, step_fn=step, step_args=(dev,))
  last = {k: float(v) for k, v in state["noise"]["last"].items()}
  assert last["hallmark"] < 0.3, last  # the surrogate fits the noise, not the (absent) tumour evidence
  assert last["accuracy"] > 0.9, last
  protected = np.asarray(ul.minmin_protect(state, data))
  assert np.abs(protected - data["image"]).max() <= eps + 1e-5
  # The hallmark as the study computes it, from the images: the same ratio.
  ratio = ul.surrogate_ce(apply_fn, state["surrogate"]["params"], protected, data["label"]) / ul.surrogate_ce(
      apply_fn, state["surrogate"]["params"], data["image"], data["label"])
  assert ratio == pytest.approx(last["hallmark"], rel=0.05) or bool(state["noise"]["done"])
  # A victim trained from scratch on the protected set learns nothing that transfers to clean slices.
  victim0 = ul.minmin_init(init, jax.random.PRNGKey(5), data, tx, n_classes=2)
  fit_only = ul.minmin_step_fn(apply_fn, tx, batch=8, eps=0.0, train_steps=10, pgd_steps=1, step_frac=0.1,
                               stop_accuracy=2.0, n_classes=2)
  prot = {**dev, "image": jnp.asarray(protected)}
  victim = trainer.fit(_config(6), str(tmp_path / "victim"), init_state=victim0, step_fn=fit_only, step_args=(prot,))
  v = victim["surrogate"]["params"]
  ce = lambda x: ul.surrogate_ce(apply_fn, v, x, data["label"])
  assert ce(protected) < 0.5 * ce(data["image"])  # the victim's own hallmark


def test_minmin_rounds_stay_in_the_ball(data, surrogate, tmp_path):
  apply_fn, init = surrogate
  tx = optax.adam(3e-3)
  state0 = ul.minmin_init(init, jax.random.PRNGKey(0), data, tx)
  step = ul.minmin_step_fn(apply_fn, tx, batch=8, eps=EPS, train_steps=3, pgd_steps=3, step_frac=0.5,
                           stop_accuracy=2.0)
  dev = {k: jnp.asarray(v) for k, v in data.items()}
  state = trainer.fit(_config(2), str(tmp_path / "mm"), init_state=state0, step_fn=step, step_args=(dev,))
  protected = np.asarray(ul.minmin_protect(state, data))
  delta = (protected - data["image"]) / data["range"][:, None, None, :]
  assert np.abs(delta).max() <= EPS + 1e-6 and np.abs(delta).max() > 0.5 * EPS
  # every record's noise moved in the pass (not only the sampled batches)
  moved = np.abs(np.asarray(state["noise"]["delta"])).reshape(len(delta), -1).max(1)
  assert (moved > 0).all()
  np.testing.assert_array_equal(protected[~data["brain"]], 0.0)
  state_r = ul.minmin_init(init, jax.random.PRNGKey(0), data, tx, mode="region")
  assert state_r["noise"]["delta"].shape == (4, 16, 16, 4)


def test_umed_respects_eps_and_roi(data, surrogate, tmp_path, cases, capfd):
  apply_fn, init = surrogate
  cfg = ml_collections.ConfigDict(dict(features=(4, 8), theta=0.5))
  g_c, g_t = ul.perturbators(cfg, 4)
  txs = (optax.adam(3e-2), optax.adam(3e-2), optax.adam(3e-3))
  state0 = ul.umed_init(g_c, g_t, init, jax.random.PRNGKey(1), data, dict(zip(("contour", "texture", "surrogate"), txs)))
  step = ul.umed_step_fn(g_c, g_t, apply_fn, txs, batch=8, eps=EPS, k=2)
  dev = {k: jnp.asarray(v) for k, v in data.items()}
  # Step 0 is the surrogate's turn (generators frozen), step 1 the generators' (surrogate frozen).
  one, _ = jax.jit(step)(state0, None, dev)
  same = lambda a, b: all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
  assert same(one["contour"]["params"], state0["contour"]["params"]) and same(one["texture"], state0["texture"])
  assert not same(one["surrogate"]["params"], state0["surrogate"]["params"])
  two, _ = jax.jit(step)(one, None, dev)
  assert same(two["surrogate"], one["surrogate"]) and not same(two["contour"]["params"], one["contour"]["params"])
  state = trainer.fit(_config(6), str(tmp_path / "umed"), init_state=state0, step_fn=step, step_args=(dev,))
  protected = ul.umed_protect(g_c, g_t, state, data, EPS)
  delta = (protected - data["image"]) / data["range"][:, None, None, :]
  support = np.asarray(morphology.dilate(data["label"] > 0, 3, 2))  # ROI + contour band
  assert np.abs(delta).max() <= EPS + 1e-6 and np.abs(delta).max() > 0.1 * EPS
  assert np.abs(delta[~support]).max() == 0.0
  # the texture part is bounded by eps * LBP inside the interior
  inner = data["interior"]
  assert np.all(np.abs(delta[inner]) <= EPS * data["lbp"][inner] + 1e-6)
  # written as a BraTS folder that the loader reads back
  from mri_poison.data.loaders import load_case
  prot_cases = ul.to_volumes(cases, data, protected)
  dirs = protected_io.write_brats_folder(str(tmp_path / "nifti"), prot_cases[:1])
  back = load_case(dirs[0])
  np.testing.assert_allclose(back.image, prot_cases[0].image, atol=1e-6)
  np.testing.assert_array_equal(back.label, prot_cases[0].label)
  # and as TFDS (array_record) that load_splits reads back voxel for voxel through the tfds source
  from mri_poison.data import datasets
  data_dir = str(tmp_path / "tfds")
  import tensorflow_datasets as tfds
  from tensorflow_datasets.core.utils import tqdm_utils
  tfds.display_progress_bar(True)
  capfd.readouterr()
  name = protected_io.write_tfds(data_dir, "umed", prot_cases)
  assert "examples/s" not in capfd.readouterr().err and tqdm_utils._active  # no progress bars; setting restored
  cfg = datasets.default_data_config()
  cfg.update(dict(source="tfds", tfds_name=name, data_dir=data_dir, n_cases=0, n_val=0, shape=(16, 16, 8)))
  loaded = datasets.load_splits(cfg)["train"]
  assert name == "brats_protected/umed" and sorted(c.case_id for c in loaded) == sorted(c.case_id for c in cases)
  by_id = {c.case_id: c for c in prot_cases}
  for c in loaded:
    np.testing.assert_array_equal(c.image, by_id[c.case_id].image)
    np.testing.assert_array_equal(c.label, by_id[c.case_id].label)
    np.testing.assert_allclose(c.affine, by_id[c.case_id].affine)
  assert not np.array_equal(loaded[0].image, {c.case_id: c for c in cases}[loaded[0].case_id].image)  # protected
  with pytest.raises(ValueError, match="config name"):
    protected_io.write_tfds(data_dir, "UMed!", prot_cases)


def test_noise_moves_with_its_voxels_through_the_victims_augmentation(cases, data):
  """Protected slices are baked into the volumes before the victim's pipeline, so every flip and intensity change
  acts on image + noise together: augment(x + d) - augment(x) is the noise flipped and scaled like the image."""
  from mri_poison.data import pipeline
  images = np.asarray(ul.classpattern_noise(jax.random.PRNGKey(0), data, EPS))
  protected = ul.to_volumes(cases, data, images)
  clean, prot = cases[0].image, protected[0].image
  noise = prot - clean
  assert np.abs(noise).max() > 0
  for seed in range(4):
    aug = lambda x: pipeline.augment(x, cases[0].label, np.random.default_rng(seed), flip=True, scale=0.2,
                                     shift=0.2)
    (xp, yp), (xc, yc), (x2, _) = aug(prot), aug(clean), aug(clean + 2 * noise)
    np.testing.assert_array_equal(yp, yc)
    moved = xp - xc
    np.testing.assert_allclose(x2 - xp, moved, atol=1e-4)  # linear in the noise: gain x flip(noise)
    # the noise's support moved exactly as the image and the label did
    support = np.abs(moved).max(-1) > 1e-6
    assert any(np.array_equal(support, np.flip(np.abs(noise).max(-1) > 1e-6, axes))
               for axes in [(), (0,), (1,), (2,), (0, 1), (0, 2), (1, 2), (0, 1, 2)]
               if np.array_equal(yc, np.flip(cases[0].label, axes) if axes else cases[0].label))
