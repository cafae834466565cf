r"""Study 2 (robustness of a 3D U-Net to gradient attacks; distillation and adversarial training).

Run (from the repository root; re-running the same command on the same workdir reuses the trained models):
  python -m experiments.robustify --config experiments/configs/robustify.py:runlocal --workdir /tmp/robustify_runlocal
  python -m experiments.robustify --config experiments/configs/robustify.py --workdir runs/robustify_phantom
  python -m experiments.robustify --config experiments/configs/robustify.py:brats --workdir runs/robustify_brats \
      --config.data.root=/data/BraTS2021
Any field can be overridden, e.g. --config.attack.steps=20 --config.distill.temperature=50. Changing
eval.reference_eps does not move adversarial.eps (the training budget): set both.
Outputs: workdir/report.md (start there), results/*.csv, figures/*.png, volumes/*.nii.gz, models/*.
Cells over a SLURM array (launch/cells.sh): --config.eval.cells=none trains, =i/K computes the i-th of K shares
of the evaluation cells (models trained first), and a last run with the default "all" writes the report.

Variants:
  runlocal  CPU, 32^3 phantom volumes (heads at 48^3), 3D U-Net (8, 16, 32), 300 base steps + 100-step
            fine-tunes, 3 eps up to 2, 3-step attacks, 8 validation cases (exploratory statistics only). Learns
            WT and TC, not ET. Not timed alone; the main job's stage (20 validation cases) took 630 s before
            the FGSM fix of 2026-12-07, of which 381 s evaluation.
  phantom   (default) CPU, 32^3 volumes, 600 base steps + 300-step fine-tunes (clean WT / TC / ET 0.86 / 0.71 /
            0.77: every region learnt; 25 min on 2 cores, measured 2026-12-07 beside other work), 20 validation
            cases (n >= 20 for the primary tests), geometric eps grid 0.02..2 up to collapse, 3-step attacks:
            FGSM, PGD, margin PGD, PGD at the training temperature, transfer, targeted margin, and 10-step APGD
            with SEA's four losses (added after the timing above); adversarial training with PGD at the
            reference eps 0.2.
  brats     GPU: BraTS folder at --config.data.root, whole brain-cropped volumes (192 x 192 x 160) attacked and
            scored through Gaussian-blended sliding-window inference with 128^3 windows (as deployed),
            bfloat16 U-Net with a float32 first layer, N = 10 attack steps (APGD: 50), every attack, 8 eps.
Attacks are chosen by name from the attack zoo (mri_poison/attacks/zoo/), the victim by model.name ("unet" |
"resenc_unet"); "transfer_model" replays the PGD examples of another trained model (attack.transfer_model, any
architecture), e.g. a run with the other victim: --config.attack.transfer_model=<workdir>/models/undefended.
Every setting below that the paper (arXiv 1908.00656) leaves open is a default chosen here. The adaptive
threat (per volume, the worst of every attack run on a model) is derived from the single attacks, so it is as
strong as the attack list: keep "margin", "pgd_temp" and "transfer" in it when judging a defence.
"""
import ml_collections

from experiments.configs import base_config
from mri_poison.data.datasets import FOLDER_DEFAULTS, default_data_config
from mri_poison.defenses import adversarial
from mri_poison.studies import learnt

VARIANTS = ("runlocal", "phantom", "brats")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = base_config(arg, VARIANTS)
  variant = config.variant

  config.data = default_data_config()
  config.data.update(dict(mode="3d", fg_fraction=0.5))
  config.model = ml_collections.ConfigDict(dict(
      name="unet",  # the victim: "unet" | "resenc_unet" (mri_poison.models.VICTIMS)
      features=(8, 16, 32), out_channels=4, norm="instance", activation="leaky_relu", dropout=0.0,
      dtype="float32", input_dtype="float32", deep_supervision=False,  # input_dtype: first conv in float32
      conv_impl="auto"))  # auto | xla | folded: how convs are computed (folded 3D convs on CPU); same params
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
  config.attack = ml_collections.ConfigDict(dict(
      attacks=("fgsm", "ifgsm", "ifgsm_targeted", "pgd", "segpgd", "cospgd", "margin", "pgd_temp", "transfer",
               "targeted_margin", "apgd_ce", "apgd_js", "apgd_mce", "apgd_bmce"),  # mri_poison/attacks/zoo/
      # L-inf, z-score units, brain voxels only; a geometric grid up to collapse (*default chosen here*; the
      # paper's grid is not given).
      eps=(0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0),
      eps_mode="absolute",  # "absolute": eps in z-score units; "per_channel_range": eps x each case's per-channel
                            # intensity range over its brain voxels (eps is then a fraction of that range)
      steps=5,  # iterations N of the iterative attacks
      apgd_steps=0,  # APGD's iterations (SEA's losses); 0 -> steps (*default chosen here*; SEA runs 300 per loss)
      step_frac=0.5,  # step size alpha = step_frac * eps (N alpha = 2.5 eps: the steps can cross the ball)
      restarts=1,  # PGD / SegPGD / CosPGD / margin random restarts
      margin_kappa=0.0,  # margin / targeted margin: stop rewarding a voxel once it is wrong / on target by kappa
      target="erase_tumour",  # targeted attacks' target: "erase_tumour" | "et_to_oedema" | "least_likely"
      transfer_model="",  # attack "transfer_model": a trained model folder (any architecture, e.g. another run's
                          # models/undefended) whose PGD examples are replayed on every victim
      batch=10,  # validation volumes attacked together
      eps_chunk=0,  # 0: all eps in one vmap; k: k eps at a time (bounded memory at full size)
      seed=0))
  config.eval = ml_collections.ConfigDict(dict(
      max_cases=0,  # 0: every validation case
      cells="all",  # "all"; "none": train the models only; "i/K": the i-th of K shares of the cells (array jobs)
      robust_factor=0.5,  # 3D AutoAttack: broken when Dice < factor x clean mean Dice
      reference_eps=0.2,  # eps of the headline tables, the primary comparisons and adversarial training
      collapse_dice=0.1,  # "collapsed" when the adaptive mean Dice at the largest eps is below this
      n_boot=1000,  # bootstrap resamples of the halving-budget CI
      sliding_window=False,  # True: attacks and scoring go through differentiable sliding-window inference
      window=(),  # sliding-window size; () -> data.patch_shape
      overlap=0.5, window_batch=1,  # window overlap; windows per model call
      example_attack="pgd", example_eps=0.2, n_volumes=2))  # figure + NIfTI volumes (undefended model)
  # Learnt-region gate (mri_poison/studies/learnt.py): a region enters headline means, drops and tests only if
  # the clean undefended model learnt it (*defaults chosen here*).
  config.gate = learnt.default_config()
  # PGD with a random start at the reference eps on half of every batch (*default chosen here*; the paper:
  # "adversarial training by data augmentation"); defenses.adversarial.recommended_config.
  config.adversarial = adversarial.recommended_config(eps=config.eval.reference_eps, steps=3, step_frac=0.8,
                                                      mix_ratio=0.5)
  config.adversarial.update(dict(
      init="base",  # "base": fine-tune the base model (as the undefended one is); "scratch": from random init
      train_steps=0,  # 0 -> train.steps // 2 when fine-tuning, train.steps from scratch (undefended: the same)
      lr=0.0))  # 0 -> train.lr

  d, m, t, a = config.data, config.model, config.train, config.attack
  if variant == "runlocal":
    # 32^3 volumes (phantom heads at 48^3, cropped to the brain): at 16^3 a tumour core is 1-3 voxels wide and
    # the U-Net learnt no core (TC 0.28, below the intensity-only baseline); here 300 + 100 steps learn WT and TC
    # (RESULTS.md, 2026-12-07 study 2 at 32^3). ET needs the longer `phantom` variant.
    d.update(dict(n_cases=18, n_val=8, phantom_shape=(48, 48, 48), shape=(32, 32, 32), patch_shape=(32, 32, 32),
                  batch_size=2, read_threads=1, prefetch=2))
    t.update(dict(steps=300, warmup_steps=10, log_every=50, ckpt_every=300))
    config.distill.steps = config.adversarial.train_steps = 100  # fine-tunes after `base` (undefended: the same)
    a.update(dict(attacks=("fgsm", "pgd", "margin", "pgd_temp", "transfer", "targeted_margin"),
                  eps=(0.05, 0.2, 2.0), steps=3, step_frac=0.8, batch=10))
    config.eval.update(dict(reference_eps=0.2, example_eps=0.2, n_volumes=1))
  elif variant == "phantom":
    d.update(dict(n_cases=50, n_val=20, phantom_shape=(48, 48, 48), shape=(32, 32, 32), patch_shape=(32, 32, 32),
                  batch_size=2, read_threads=2))
    t.update(dict(steps=600, ckpt_every=200, log_every=50))
    # APGD with SEA's four losses joins the adaptive threat, with 10 steps (3 would leave its step-size schedule
    # no room): results/adaptive_members.csv says whether it finds lower Dice than PGD and margin.
    a.update(dict(attacks=("fgsm", "pgd", "margin", "pgd_temp", "transfer", "targeted_margin", "apgd_ce", "apgd_js",
                           "apgd_mce", "apgd_bmce"),
                  eps=(0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0), steps=3, step_frac=0.8, apgd_steps=10))
  elif variant == "brats":
    # Whole brain-cropped volumes (the BraTS brain's bounding box fits 192 x 192 x 160, so no reference label
    # is cropped away), attacked and scored through sliding-window inference with training-size windows.
    d.update(dict(FOLDER_DEFAULTS, source="brats", root="", n_cases=0, n_val=50, phantom_shape=(128, 128, 128),
                  shape=(192, 192, 160), patch_shape=(128, 128, 128), batch_size=2, read_threads=8, prefetch=8))
    m.update(dict(features=(32, 64, 128, 256, 320), dtype="bfloat16", input_dtype="float32"))
    t.update(dict(steps=30000, lr=1e-3, warmup_steps=500, log_every=100, ckpt_every=1000))
    a.update(dict(eps=(0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0), steps=10, step_frac=0.25, batch=1, eps_chunk=1,
                  apgd_steps=50))
    config.eval.update(dict(n_volumes=3, sliding_window=True, window=(128, 128, 128), overlap=0.5, window_batch=2,
                            reference_eps=0.1, example_eps=0.1))
    config.adversarial.update(dict(eps=0.1, steps=5, step_frac=0.5, train_steps=10000))
  return config
