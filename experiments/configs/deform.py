r"""Study 3 (learned deformation-and-appearance attack on a segmenter; Chen et al., SASHIMI 2019, arXiv 1909.11167).

Run (from the repository root; re-running the same command on the same workdir reuses models and cells):
  python -m experiments.deform_attack --config experiments/configs/deform.py:runlocal --workdir /tmp/deform_runlocal
  python -m experiments.deform_attack --config experiments/configs/deform.py --workdir runs/deform_phantom
  python -m experiments.deform_attack --config experiments/configs/deform.py:brats --workdir runs/deform_brats \
      --config.data.root=/data/BraTS2021
Any field can be overridden, e.g. --config.attack.deltas='(0.1,0.2)' --config.deform.max_disp=2.
Outputs: workdir/report.md (start there), results/*.csv, figures/*.png, volumes/*.nii.gz, models/*.

Variants:
  runlocal  CPU, about 4 min on 2 cores: 2D arm only (24^2 phantom slices, 12 held-out cases), short training.
  phantom   (default) CPU, ~14 min on 2 cores: 2D arm (24 held-out phantom cases, one slice each: undefended
            and augmentation-defended U-Nets, per-case attack, generator, random fields, i-FGSM/PGD) and a
            small 3D arm (16^3 volumes, 20 held-out cases, undefended U-Net: per-case attack, generator, random).
  brats     GPU: BraTS folder at --config.data.root; 2D arm on 128^2 slices and 3D arm on 128^3 volumes.
The paper's design is not public: every setting here is a default chosen here (see deform.* comments).
"""
import ml_collections

from experiments.configs import base_config
from mri_poison.attacks import deform
from mri_poison.data.datasets import FOLDER_DEFAULTS, default_data_config
from mri_poison.defenses import deform_augment
from mri_poison.studies import learnt

VARIANTS = ("runlocal", "phantom", "brats")


def _arm(mode, shape, patch, batch, features, steps, lr):
  return ml_collections.ConfigDict(dict(
      data=dict(mode=mode, shape=shape, patch_shape=patch, batch_size=batch),
      model=dict(features=features),
      train=dict(steps=steps, lr=lr),
      generator_steps=steps))  # generator training steps (train.fit), same batches as the segmenter


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = base_config(arg, VARIANTS)
  variant = config.variant

  config.data = default_data_config()  # shared by the arms; each arm overrides mode/shape/patch/batch
  config.data.update(dict(n_cases=48, n_val=24, phantom_shape=(32, 32, 32), tumour_fraction=0.8, read_threads=1,
                          prefetch=2))
  config.model = ml_collections.ConfigDict(dict(
      features=(8, 16, 32), out_channels=4, norm="instance", activation="leaky_relu", dropout=0.0,
      dtype="float32", deep_supervision=False, conv_impl="auto"))
  config.train = ml_collections.ConfigDict(dict(
      seed=0, steps=300, lr=3e-3, warmup_steps=10, min_lr_ratio=0.0, weight_decay=1e-5, grad_clip=1.0,
      log_every=50, ckpt_every=100, keep_checkpoints=1, eval_every=0, loss="ce_dice", schedule_steps=0))
  config.arms = ("2d", "3d")  # "2d": one axial slice per held-out case (most tumour); "3d": whole volumes
  config.arm2d = _arm("2d", (24, 24, 24), (24, 24), 8, (8, 16, 32), 300, 3e-3)
  config.arm3d = _arm("3d", (16, 16, 16), (16, 16, 16), 2, (8, 16, 32), 200, 3e-3)
  config.arm3d.update(dict(n_cases=40, n_val=20))  # arm-specific split sizes (0/absent: config.data's)
  config.arm2d.generator_steps = 900  # 150-600 left the generator weaker than random fields (RESULTS.md 2026-12-08)
  config.arm2d.update(dict(n_cases=0, n_val=0))

  config.deform = deform.default_config()  # the transformation, budgets and objective (defaults chosen here)
  config.deform.update(dict(
      max_disp=4.0,  # voxels (Euclidean), exact budget
      bias_range=0.5,  # b in [1/1.5, 1.5]
      steps=100, lr=0.1))
  config.attack = ml_collections.ConfigDict(dict(
      deltas=(0.1, 0.2, 0.3),  # target Dice drops Delta (mean Dice of WT, TC, ET)
      max_threat=True,  # also "deform_max": hinge to Dice 0, every step (the budget-limited worst case)
      gradient_attacks=("ifgsm", "pgd"),  # study 2's attacks (CE, L-inf, brain voxels) on every victim
      eps=(0.1, 0.3),  # their budgets (z-score units)
      gradient_steps=5, step_frac=0.5,
      batch=32,  # cases attacked together
      seed=0))
  config.generator = ml_collections.ConfigDict(dict(
      enabled=True,  # train G(x, Delta) -> control points against the frozen undefended model
      features=(16, 32), lr=1e-2,
      gate=True,  # outputs scaled by a learnt strength increasing in Delta (without it, Delta was ignored)
      delta_range=(0.05, 0.35),  # training Deltas ~ U(low, high); () = the range of attack.deltas
      extra_cases=48,  # the attacker's own phantom cases, besides the training split (used when data.source=phantom)
      extra_seed=1000,  # they are built from seeds data.seed + extra_seed + i, disjoint from the study's cases
      arms=("2d", "3d")))
  config.defence = deform_augment.default_config()  # adversarial deformation augmentation (batch_transform)
  config.defence.update(dict(
      arms=("2d",)))  # arms whose "augmented" victim is trained (same steps, seed and data as the undefended)
  config.eval = ml_collections.ConfigDict(dict(
      example_delta=0.2,  # Delta of the example figures and NIfTI volumes
      n_volumes=2,  # held-out cases per arm written as NIfTI (adversarial image, warped label, predictions)
      reference_eps=0.3))  # eps of the headline defence comparison under PGD
  # Learnt-region gate (mri_poison/studies/learnt.py) on the clean undefended victim (*defaults chosen here*).
  config.gate = learnt.default_config()

  if variant == "runlocal":
    config.data.update(dict(n_cases=24, n_val=12))
    config.arms = ("2d",)
    # 600 segmenter steps: at 150 the 2D victim learnt the whole tumour but no core (main job TC 0.006); a 2D
    # U-Net on the same 24 x 24 slices learns TC and ET within 400 (study 4's victim).
    config.arm2d.train.steps = 600
    config.deform.steps = 60
    config.attack.deltas = (0.1, 0.2)
    config.attack.eps = (0.3,)
    config.eval.update(dict(example_delta=0.1, n_volumes=1))
  elif variant == "brats":
    config.data.update(dict(FOLDER_DEFAULTS, source="brats", root="", n_cases=0, n_val=50,
                            phantom_shape=(128, 128, 128), read_threads=8, prefetch=8,
                            spacing=(1.5, 1.5, 1.5)))  # [ours] the brain's box fits 128^3 at 1.5 mm
    config.model.update(dict(features=(32, 64, 128, 256, 320), dtype="bfloat16"))
    config.arm2d = _arm("2d", (128, 128, 128), (128, 128), 16, (32, 64, 128, 256), 20000, 1e-3)
    config.arm3d = _arm("3d", (128, 128, 128), (128, 128, 128), 2, (32, 64, 128, 256, 320), 30000, 1e-3)
    for arm in (config.arm2d, config.arm3d):
      arm.update(dict(n_cases=0, n_val=0))
    config.deform.update(dict(grid=6, max_disp=8.0, steps=200))
    config.attack.update(dict(batch=4, eps=(0.05, 0.1, 0.2), gradient_steps=10))
    config.defence.arms = ("2d", "3d")
  return config
