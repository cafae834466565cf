"""Defences: the adversarial-training and distillation hooks, and that they change robustness after training."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from mri_poison import losses
from mri_poison.attacks import gradient
from mri_poison.attacks import losses as attack_losses
from mri_poison.data.case import Case
from mri_poison.data.datasets import default_data_config
from mri_poison.defenses import adversarial
from mri_poison.defenses import distillation
from mri_poison.train import loop
from mri_poison.train import state as state_lib

MODEL = dict(features=(4, 8), out_channels=4, norm="instance")


def _apply_and_params(ndim=2):
  model = state_lib.make_model(ml_collections.ConfigDict(MODEL))
  params = state_lib.init_params(model, jax.random.key(0), (1,) + (8,) * ndim + (4,))
  return state_lib.make_apply_fn(model), params


def _batch(b=4, ndim=2, seed=0):
  rng = np.random.default_rng(seed)
  image = rng.normal(size=(b,) + (8,) * ndim + (4,)).astype(np.float32)
  image[:, :2] = 0.0  # background rows: outside the brain
  label = rng.integers(0, 4, size=(b,) + (8,) * ndim).astype(np.int32)
  return {"image": jnp.asarray(image), "label": jnp.asarray(label)}


@pytest.mark.parametrize("attack", ["fgsm", "pgd"])
def test_adversarial_transform_replaces_the_ratio_inside_the_brain(attack):
  apply_fn, params = _apply_and_params()
  batch = _batch()
  cfg = adversarial.default_config()
  cfg.update(dict(attack=attack, eps=0.3, ratio=0.5, steps=2))
  out = jax.jit(adversarial.adversarial_batch_transform(apply_fn, cfg))(params, batch, jax.random.key(1))
  delta = np.asarray(out["image"] - batch["image"])
  assert np.all(np.abs(delta) <= 0.3 + 1e-5)
  assert np.all(delta[:, :2] == 0)  # background untouched
  changed = np.any(delta != 0, axis=(1, 2, 3))
  np.testing.assert_array_equal(changed, [True, True, False, False])  # exactly half, the first two
  if attack == "fgsm":  # FGSM sits on the eps-ball's corners wherever the gradient is nonzero
    assert np.mean(np.isclose(np.abs(delta[:2, 2:]), 0.3, atol=1e-5)) > 0.9
  ce = lambda x: losses.cross_entropy(apply_fn(params, x), batch["label"])
  assert np.all(np.asarray(ce(out["image"]))[:2] > np.asarray(ce(batch["image"]))[:2])  # the attack hurt
  np.testing.assert_array_equal(out["label"], batch["label"])


def test_adversarial_transform_ratio_edges():
  apply_fn, params = _apply_and_params()
  batch = _batch(b=2)
  none = adversarial.adversarial_batch_transform(apply_fn, dict(ratio=0.0))(params, batch, jax.random.key(0))
  np.testing.assert_array_equal(none["image"], batch["image"])
  every = adversarial.adversarial_batch_transform(apply_fn, dict(ratio=1.0, eps=0.1))(params, batch,
                                                                                      jax.random.key(0))
  assert np.all(np.any(np.asarray(every["image"] != batch["image"]), axis=(1, 2, 3)))
  # ratio * B = 0.5: one example is attacked with probability 0.5, so over many keys about half the time.
  half = jax.jit(adversarial.adversarial_batch_transform(apply_fn, dict(ratio=0.25, eps=0.1)))
  hits = [bool(np.any(np.asarray(half(params, batch, jax.random.key(k))["image"] != batch["image"])))
          for k in range(24)]
  assert 4 <= sum(hits) <= 20
  with pytest.raises(ValueError, match="ratio"):
    adversarial.adversarial_batch_transform(apply_fn, dict(ratio=1.5))
  with pytest.raises(ValueError, match="attack"):
    adversarial.adversarial_batch_transform(apply_fn, dict(attack="cw"))


def test_distillation_hooks():
  apply_fn, params = _apply_and_params()
  batch = _batch()
  t = 20.0
  out = distillation.distillation_batch_transform(apply_fn, t)(None, dict(batch), jax.random.key(0), params)
  soft = np.asarray(out["soft_target"])
  np.testing.assert_allclose(soft.sum(-1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(soft, jax.nn.softmax(apply_fn(params, batch["image"]) / t), rtol=1e-5)
  sharp = np.asarray(jax.nn.softmax(apply_fn(params, batch["image"])))
  assert soft.max(-1).mean() < sharp.max(-1).mean()  # at T the targets are softer
  # The student's loss is minimal (zero gradient) where its softmax at T equals the targets.
  loss_fn = distillation.distillation_loss(t)
  logits = apply_fn(params, batch["image"])
  g = jax.grad(lambda z: jnp.sum(loss_fn(z, out)))(logits)
  np.testing.assert_allclose(g, 0.0, atol=1e-5)
  g_other = jax.grad(lambda z: jnp.sum(loss_fn(z, out)))(logits * 0.5)
  assert float(jnp.max(jnp.abs(g_other))) > 1e-4
  # The teacher's loss is the base loss on logits / T.
  np.testing.assert_allclose(distillation.teacher_loss(t)(logits, batch),
                             losses.ce_dice(logits / t, batch["label"]), rtol=1e-6)
  with pytest.raises(ValueError, match="temperature"):
    distillation.distillation_loss(0.0)


def _cases(n, seed=0):
  """Blob phantoms (X, Y, Z, 4) whose tumour is brighter on every contrast; 2D slices are drawn from them."""
  rng = np.random.default_rng(seed)
  grid = np.stack(np.meshgrid(*[np.arange(16)] * 2, np.arange(4), indexing="ij"), -1)
  out = []
  for i in range(n):
    centre = np.r_[rng.uniform(5, 11, 2), 1.5]
    r = np.linalg.norm((grid - centre) * [1, 1, 0], axis=-1)
    label = np.where(r < 2, 3, np.where(r < 3.5, 1, np.where(r < 5, 2, 0))).astype(np.int32)
    image = (rng.normal(0, 0.5, (16, 16, 4, 4)) + label[..., None] * np.array([0.6, 1.2, 0.9, 1.0])).astype(np.float32)
    out.append(Case(image=image, modalities=("t1", "t1ce", "t2", "flair"), label=label, affine=np.eye(4),
                    spacing=(1.0, 1.0, 1.0), case_id=f"blob-{i}"))
  return out


def _config(steps):
  c = ml_collections.ConfigDict()
  c.data = default_data_config()
  c.data.update(dict(mode="2d", shape=(16, 16, 4), patch_shape=(16, 16), batch_size=4, fg_fraction=1.0,
                     tumour_fraction=1.0, read_threads=1, prefetch=1, augment=dict(flip=False, scale=0.0, shift=0.0)))
  c.model = ml_collections.ConfigDict(MODEL)
  c.train = ml_collections.ConfigDict(dict(seed=0, steps=steps, lr=1e-2, warmup_steps=0, weight_decay=0.0,
                                           grad_clip=1.0, log_every=100, ckpt_every=1000, loss="ce_dice"))
  return c


def test_training_with_defences_changes_robustness(tmp_path):
  cases = _cases(6)
  apply_fn = state_lib.make_apply_fn(state_lib.make_model(_config(1).model))
  base = loop.train_model(_config(30), str(tmp_path / "base"), cases=cases)
  # Same extra steps with and without adversarial examples: only the defence differs.
  plain = loop.train_model(_config(20), str(tmp_path / "plain"), cases=cases, init_params=base)
  adv_cfg = dict(attack="fgsm", eps=0.5, ratio=0.5, brain_only=False)
  robust = loop.train_model(_config(20), str(tmp_path / "adv"), cases=cases, init_params=base,
                            batch_transform=adversarial.adversarial_batch_transform(apply_fn, adv_cfg))
  t = 10.0
  # Teacher and student start from the base model with logits x T (the same softmax at T), trained at T.
  warm = distillation.scale_output_layer(base, t)
  np.testing.assert_allclose(apply_fn(warm, jnp.ones((1, 16, 16, 4)), temperature=t),
                             apply_fn(base, jnp.ones((1, 16, 16, 4))), rtol=1e-4, atol=1e-4)
  teacher = loop.train_model(_config(15), str(tmp_path / "teacher"), cases=cases, init_params=warm,
                             loss_fn=distillation.teacher_loss(t))
  student = loop.train_model(_config(15), str(tmp_path / "student"), cases=cases, init_params=warm,
                             loss_fn=distillation.distillation_loss(t),
                             batch_transform=distillation.distillation_batch_transform(apply_fn, t),
                             hook_params=teacher)

  val = _cases(4, seed=1)
  x = jnp.asarray(np.stack([c.image[:, :, 1] for c in val]))
  y = jnp.asarray(np.stack([c.label[:, :, 1] for c in val]))

  def fgsm_ce(params, eps=0.5):
    x_adv = gradient.fgsm(attack_losses.cross_entropy(apply_fn, params, y), x, eps=eps)
    return float(jnp.mean(losses.cross_entropy(apply_fn(params, x_adv), y)))

  # Adversarial training lowers the loss under the attack it was trained against.
  assert fgsm_ce(robust) < fgsm_ce(plain)
  # The distilled student, deployed at T = 1, is far more confident than a normally trained model: its softmax
  # saturates on many more voxels, where input gradients vanish (distillation's gradient-masking effect).
  probs = lambda p: jnp.max(jax.nn.softmax(apply_fn(p, x)), -1)
  assert float(jnp.mean(probs(student))) > float(jnp.mean(probs(base)))
  assert float(jnp.mean(probs(student) > 0.99)) > float(jnp.mean(probs(base) > 0.99)) + 0.1


def test_adversarial_transform_with_as_many_attacked_examples_as_channels():
  """4 attacked examples and 4 channels: per-example eps must not be mistaken for per-channel eps."""
  import ml_collections
  from mri_poison.defenses import adversarial as adv_lib
  apply_fn = lambda params, x: jnp.concatenate([x * params, -x * params], axis=-1)  # a 2-class linear "model"
  cfg = ml_collections.ConfigDict(dict(adv_lib.default_config(), ratio=0.5, eps=0.1, attack="fgsm"))
  transform = adv_lib.adversarial_batch_transform(apply_fn, cfg)
  image = jnp.ones((8, 6, 6, 4))
  batch = {"image": image, "label": jnp.zeros((8, 6, 6), jnp.int32)}
  out = transform(jnp.ones(()), batch, jax.random.PRNGKey(0))
  delta = np.abs(np.asarray(out["image"] - image))
  np.testing.assert_allclose(delta[:4].max(axis=(1, 2, 3)), 0.1, rtol=1e-5)
  assert delta[4:].max() == 0


def test_pgd_starts_uniformly_in_the_eps_ball_and_mix_ratio_is_the_share():
  apply_fn, params = _apply_and_params()
  batch = _batch(b=4)
  # step_frac = 0: the PGD steps do not move, so what comes out is the random start itself.
  cfg = dict(attack="pgd", eps=0.3, steps=2, step_frac=0.0, mix_ratio=0.5)
  transform = jax.jit(adversarial.adversarial_batch_transform(apply_fn, cfg))
  delta = np.asarray(transform(params, batch, jax.random.key(1))["image"] - batch["image"])
  brain = delta[:2, 2:]
  assert np.all(np.abs(brain) <= 0.3 + 1e-6) and np.all(delta[:, :2] == 0) and np.all(delta[2:] == 0)
  # U(-eps, eps): mean |delta| = eps / 2, sd eps / sqrt(12); about 5 % of the voxels beyond 0.95 eps on each side.
  assert abs(np.mean(np.abs(brain)) - 0.15) < 0.01 and abs(np.mean(brain)) < 0.01
  assert abs(np.mean(np.abs(brain) > 0.95 * 0.3) - 0.05) < 0.02
  other = np.asarray(transform(params, batch, jax.random.key(2))["image"] - batch["image"])
  assert np.mean(other[:2, 2:] != brain) > 0.99  # a fresh start for every step's key
  # mix_ratio is the documented name; the old `ratio` gives the same transform and wins when both are given.
  old = jax.jit(adversarial.adversarial_batch_transform(apply_fn, dict(cfg, ratio=0.5, mix_ratio=0.0)))
  np.testing.assert_array_equal(old(params, batch, jax.random.key(1))["image"],
                                transform(params, batch, jax.random.key(1))["image"])
  assert adversarial.mix_ratio(dict(ratio=0.75, mix_ratio=0.5)) == 0.75 and adversarial.mix_ratio({}) == 0.5
  with pytest.raises(ValueError, match="mix_ratio"):
    adversarial.adversarial_batch_transform(apply_fn, dict(mix_ratio=1.5))
  rec = adversarial.recommended_config(0.2)
  assert rec.attack == "pgd" and rec.eps == 0.2 and rec.steps * rec.step_frac >= 2.0 and rec.mix_ratio == 0.5
