r"""Study 1: synthetic-data poisoning of U-Net training (arXiv 2502.03825) with a SANTA-style GAN.

Run (from the repository root; re-running the same command on the same workdir reuses the GAN, the trained
sweeps and every evaluation cell; more --config.sweep.seeds or modes train only the new sweeps):
  python -m experiments.poison_sweep --config experiments/configs/poison.py:runlocal --workdir /tmp/poison_runlocal
  python -m experiments.poison_sweep --config experiments/configs/poison.py --workdir runs/poison_phantom
  python -m experiments.poison_sweep --config experiments/configs/poison.py:brats --workdir runs/poison_brats \
      --config.data.root=/data/BraTS2021 --config.gan.source=t1
Any field can be overridden, e.g. --config.sweep.modes='("replace",)' --config.train.steps=500.
Outputs: workdir/report.md (start there), results/poison_sweep.csv, results/*.csv|json, figures/*.png, models/*.

Variants:
  runlocal  CPU, a few minutes on 2 cores: 24^3 phantom grid, 12 training / 6 validation cases, tiny GAN and
            U-Nets, 2 seeds, both modes. Every test in it is exploratory (n < 20).
  phantom   (default) CPU, ~10 min on 2 cores: 32^3 grid, 24 training / 24 validation cases, 3 seeds, both modes.
  brats     GPU: BraTS folder at --config.data.root, T1 -> T1-Ce, 128^2 slices, SANTA-sized GAN, 50 validation cases.
Settings the paper leaves open are defaults chosen here (marked [ours]); the GAN's loss weights and optimiser
are SANTA's (docs/methods.md, study 1).
"""
import ml_collections

from experiments.configs import base_config
from experiments.configs import gan as gan_config
from mri_poison.studies import learnt

VARIANTS = ("runlocal", "phantom", "brats")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = base_config(arg, VARIANTS)
  variant = config.variant
  config.data = gan_config.data_section(variant)
  config.data.augment = dict(flip=True, scale=0.1, shift=0.1)  # the segmenters' augmentation [ours]
  config.gan = gan_config.gan_section(variant)
  # The segmenter: 2D U-Net on whole target-contrast slices, one sigmoid output (enhancing tumour).
  config.model = ml_collections.ConfigDict(dict(
      features=(8, 16, 32), out_channels=1, norm="instance", activation="leaky_relu", dropout=0.0,
      dtype="float32", deep_supervision=False, conv_impl="auto"))
  config.train = ml_collections.ConfigDict(dict(
      seed=0,  # replaced by each sweep seed (init, data stream and mixing all follow it)
      steps=300, lr=3e-3, warmup_steps=20, min_lr_ratio=0.0, weight_decay=1e-5, grad_clip=1.0,  # [ours]
      log_every=50, ckpt_every=300, keep_checkpoints=1, eval_every=0, loss="ce_dice",  # loss: unused (BCE + Dice)
      schedule_steps=0))  # lr horizon; 0 = steps
  config.sweep = ml_collections.ConfigDict(dict(
      ks=(0, 1, 2, 3, 4, 5),  # synthetic shares k / n_parts [paper: 16.67 .. 83.33 %; k = 0 the reference]
      n_parts=6,
      modes=("replace", "add"),  # "replace": fixed set size (the paper's design; primary); "add": on top of real
      seeds=(0, 1, 2),  # whole-sweep seeds: seed-to-seed spread next to the share effect
      stacked="auto"))  # "true": one vmapped program per (mode, seed); "false": one by one; "auto": by memory
  config.eval = ml_collections.ConfigDict(dict(
      n_boot=2000,  # bootstrap resamples of the paired differences
      n_figure_cases=3,  # cases in the source / synthetic / real grid
      max_cases=0))  # unused by the sweep (every validation case is scored)
  config.detect = ml_collections.ConfigDict(dict(
      steps=300, batch=32, lr=1e-3, features=(8, 16, 32),  # the CNN real-vs-synthetic probe [ours]
      hf_radius=0.5,  # frequency statistic: energy above this fraction of the Nyquist frequency [ours]
      min_brain_fraction=0.1,  # slices with at least this share of head voxels
      n_boot=1000, seed=0))
  # Learnt-region gate (mri_poison/studies/learnt.py) on the clean (k = 0) segmenters' ET Dice over the
  # validation cases that contain ET (*defaults chosen here*).
  config.gate = learnt.default_config()

  d, t, sw = config.data, config.train, config.sweep
  if variant == "runlocal":
    d.update(dict(n_cases=18, n_val=6))
    config.model.features = (8, 16)
    # 500 steps [ours]: at 120 the k = 0 segmenters found no ET (Dice 0.000 / 0.016 on the ET cases of the main
    # job); at 500 they reach 0.52 / 0.52 (seeds 0 / 1, the main job's 23 ET cases) and the main job's stage takes
    # ~4 min on 2 cores.
    t.update(dict(steps=500, warmup_steps=10, log_every=100, ckpt_every=500))
    sw.seeds = (0, 1)
    config.detect.update(dict(steps=100, n_boot=200))
    config.eval.n_boot = 500
  elif variant == "brats":
    config.model.update(dict(features=(32, 64, 128, 256), dtype="bfloat16"))
    t.update(dict(steps=10000, lr=1e-3, warmup_steps=300, log_every=100, ckpt_every=1000))
    config.detect.update(dict(steps=2000, features=(16, 32, 64, 64)))
  return config
