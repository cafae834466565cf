r"""Study 2 (robustness of a 3D U-Net to gradient attacks; distillation and adversarial training).

Run (from the repository root; re-running the same command on the same workdir reuses the trained models):
  python -m experiments.robustify --config experiments/configs/robustify.py:runlocal --workdir /tmp/robustify_runlocal
  python -m experiments.robustify --config experiments/configs/robustify.py --workdir runs/robustify_phantom
  python -m experiments.robustify --config experiments/configs/robustify.py:brats --workdir runs/robustify_brats \
      --config.data.root=/data/BraTS2021
Any field can be overridden, e.g. --config.attack.steps=20 --config.distill.temperature=50.
Outputs: workdir/report.md (start there), results/*.csv, figures/*.png, volumes/*.nii.gz, models/*.

Variants:
  runlocal  CPU, ~2 min on 2 cores: 16^3 phantom volumes, tiny 3D U-Net, a few dozen steps, 3 eps, 3-step attacks.
  phantom   (default) CPU, several minutes on 2 cores: 24^3 phantom volumes, 6 validation cases (the fewest for
            which a two-sided Wilcoxon test can reach p < 0.05), 3 eps, 4-step attacks.
  brats     GPU: BraTS folder at --config.data.root, 128^3 grid, bfloat16 U-Net, N = 10 attack steps, 5 eps.
Every setting below that the paper (arXiv 1908.00656) leaves open is a default chosen here.
"""
import ml_collections

from mri_poison.data.datasets import default_data_config
from mri_poison.defenses import adversarial

VARIANTS = ("runlocal", "phantom", "brats")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant = arg or "phantom"
  if variant not in VARIANTS:
    raise ValueError(f"unknown config variant {arg!r}: expected one of {VARIANTS}")
  config = ml_collections.ConfigDict()
  config.variant = variant
  config.seed = 0

  config.data = default_data_config()
  config.data.update(dict(mode="3d", fg_fraction=0.5))
  config.model = ml_collections.ConfigDict(dict(
      features=(8, 16, 32), out_channels=4, norm="instance", activation="leaky_relu", dropout=0.0,
      dtype="float32", deep_supervision=False))
  # Shared by the undefended model, the distillation teacher and the student.
  config.train = ml_collections.ConfigDict(dict(
      seed=0, steps=150, lr=3e-3, warmup_steps=10, min_lr_ratio=0.0, weight_decay=1e-5, grad_clip=1.0,
      log_every=25, ckpt_every=100, keep_checkpoints=1, eval_every=0, loss="ce_dice",
      schedule_steps=0))  # lr horizon; 0 = steps. To train a finished run longer, set it to the old steps
  config.distill = ml_collections.ConfigDict(dict(
      temperature=20.0,  # [paper: distillation at a temperature; T=20 default chosen here]
      teacher_loss="ce_dice",  # the teacher's loss on logits / T
      hard_weight=0.0,  # 0: soft labels only (Papernot et al.)
      init="scaled_base",  # teacher and student start from the base model with logits x T (its softmax at
                            # T); "scratch": random init (needs long runs to grow the logits T-fold)
      steps=0))  # 0 -> train.steps // 2 from "scaled_base", train.steps from scratch
  config.adversarial = adversarial.default_config()  # FGSM at eps 0.1 on half of every batch
  config.adversarial.update(dict(
      init="base",  # "base": fine-tune the base model (as the undefended one is); "scratch": from random init
      train_steps=0,  # 0 -> train.steps // 2 when fine-tuning, train.steps from scratch
      lr=0.0))  # 0 -> train.lr
  config.attack = ml_collections.ConfigDict(dict(
      attacks=("fgsm", "ifgsm", "ifgsm_targeted", "pgd", "segpgd", "cospgd"),
      eps=(0.02, 0.05, 0.1, 0.2),  # L-inf, z-score units, brain voxels only
      steps=5,  # iterations N of the iterative attacks
      step_frac=0.25,  # step size alpha = step_frac * eps
      restarts=1,  # PGD / SegPGD / CosPGD random restarts
      target="erase_tumour",  # targeted i-FGSM target: "erase_tumour" | "et_to_oedema" | "least_likely"
      batch=8,  # validation volumes attacked together
      eps_chunk=0,  # 0: all eps in one vmap; k: k eps at a time (bounded memory at full size)
      seed=0))
  config.eval = ml_collections.ConfigDict(dict(
      max_cases=0,  # 0: every validation case
      robust_factor=0.5,  # 3D AutoAttack: broken when Dice < factor x clean mean Dice
      reference_eps=0.1,  # eps of the headline tables (nearest grid value)
      example_attack="ifgsm", example_eps=0.1, n_volumes=2))  # figure + NIfTI volumes (undefended model)

  d, m, t, a = config.data, config.model, config.train, config.attack
  if variant == "runlocal":
    d.update(dict(n_cases=10, n_val=4, phantom_shape=(24, 24, 24), shape=(16, 16, 16), patch_shape=(16, 16, 16),
                  batch_size=2, read_threads=1, prefetch=2))
    t.update(dict(steps=60, warmup_steps=5, log_every=20, ckpt_every=60))
    a.update(dict(eps=(0.05, 0.2, 0.5), steps=3, step_frac=0.5, batch=4))
    config.eval.update(dict(reference_eps=0.2, example_eps=0.2, n_volumes=1))
  elif variant == "phantom":
    d.update(dict(n_cases=24, n_val=6, phantom_shape=(32, 32, 32), shape=(24, 24, 24), patch_shape=(24, 24, 24),
                  batch_size=2, read_threads=2))
    t.update(dict(steps=120, ckpt_every=60))
    a.update(dict(eps=(0.05, 0.1, 0.2), steps=4, step_frac=0.5))
  elif variant == "brats":
    d.update(dict(source="brats", root="", n_cases=0, n_val=50, phantom_shape=(128, 128, 128),
                  shape=(128, 128, 128), patch_shape=(128, 128, 128), batch_size=2, read_threads=8, prefetch=8))
    m.update(dict(features=(32, 64, 128, 256, 320), dtype="bfloat16"))
    t.update(dict(steps=30000, lr=1e-3, warmup_steps=500, log_every=100, ckpt_every=1000))
    a.update(dict(eps=(0.01, 0.02, 0.05, 0.1, 0.2), steps=10, batch=1, eps_chunk=1))
    config.eval.update(dict(n_volumes=3))
  return config
