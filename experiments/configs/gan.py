r"""SANTA-style translation GAN (study 1): CT -> T1-Ce on the phantom, any MR contrast -> T1-Ce on BraTS.

Run (from the repository root; re-running the same command on the same workdir resumes):
  python -m experiments.train_gan --config experiments/configs/gan.py:runlocal --workdir /tmp/gan_runlocal
  python -m experiments.train_gan --config experiments/configs/gan.py --workdir runs/gan_phantom
  python -m experiments.train_gan --config experiments/configs/gan.py:brats --workdir runs/gan_brats \
      --config.data.root=/data/BraTS2021 --config.gan.source=t1
Any field can be overridden, e.g. --config.gan.train.steps=2000 --config.gan.loss.path=0.1.
Outputs: workdir/report.md (PSNR, SSIM, MAE against the real T1-Ce on held-out cases, ET contrast of both), results/gan_quality.csv,
figures/gan_grid.png (source / synthetic / real), models/gan (checkpoints, metrics.jsonl).

Variants:
  runlocal  CPU, ~1 min: 24^3 phantom grid, tiny generator (features 8, 1 residual block per side), 60 steps.
  phantom   (default) CPU, a few minutes: 32^3 grid, features 16, 2 residual blocks per side, 600 steps.
  brats     GPU: BraTS folder at --config.data.root, 128^3 grid (slices 128^2), SANTA's sizes (features 64,
            4 + 4 residual blocks), 20k steps.
Loss weights and optimiser settings are SANTA's (docs/methods.md, study 1); sizes and steps are defaults chosen here.
"""
import ml_collections

from experiments.configs import base_config
from mri_poison.data.datasets import FOLDER_DEFAULTS, default_data_config

VARIANTS = ("runlocal", "phantom", "brats")


def gan_section(variant: str) -> ml_collections.ConfigDict:
  """config.gan of a variant (shared with experiments/configs/poison.py)."""
  gan = ml_collections.ConfigDict(dict(
      source="ct",  # source contrast: the phantom's CT-like channel (CT -> T1-Ce, as the seed); t1/t2/flair on BraTS
      target="t1ce",  # the contrast the GAN synthesises (the segmenter's input)
      intensity_scale=4.0,  # z-score units mapped to the tanh range: clip(x / scale, -1, 1) [ours]
  ))
  gan.model = ml_collections.ConfigDict(dict(
      features=64,  # generator width after the 7x7 stem [SANTA 64]
      n_down=2,  # stride-2 stages in the encoder (and up-sampling stages in the decoder) [SANTA 2]
      n_res=4,  # residual blocks in the encoder and in the decoder each [ours; SANTA ~9 in total]
      style_dim=8,  # learned domain embeddings e0, e1 [SANTA 8]
      disc_features=64,  # PatchGAN width [pix2pix 64]
      disc_layers=3,  # PatchGAN stride-2 layers; 3 = the 70x70 receptive field
  ))
  gan.loss = ml_collections.ConfigDict(dict(
      adv=1.0,  # LSGAN generator term [SANTA]
      rec=5.0,  # L1 reconstruction at d = 0 [SANTA]
      idt=5.0,  # L1 identity on target images at d = 1 [SANTA]
      latent=0.01,  # mean(mu^2) [SANTA]
      path=0.01,  # shortest-path regulariser lambda_path [SANTA default 0.01; 0.1 in their example]
      supervised=0.0,  # L1 to the co-registered target (paired data only) [ours; off by default]
      delta_min=0.05, delta_max=0.1,  # delta ~ U(delta_min, delta_max) around d_c [SANTA]
      min_gap=0.1,  # J = dh / max(d1 - d2, min_gap) [SANTA]
  ))
  gan.train = ml_collections.ConfigDict(dict(
      seed=0, steps=600, lr=2e-4, b1=0.5, b2=0.999,  # Adam for both networks [SANTA]
      batch_size=8,  # slices per stream per step [ours]
      tumour_fraction=0.5,  # slices drawn from the tumour's slices with this probability [ours]
      log_every=50, ckpt_every=300, keep_checkpoints=1, eval_every=0))
  m, t = gan.model, gan.train
  if variant == "runlocal":
    m.update(dict(features=8, n_res=1, disc_features=8))
    t.update(dict(steps=60, batch_size=4, log_every=20, ckpt_every=60))
  elif variant == "phantom":
    m.update(dict(features=16, n_res=2, disc_features=16))
    t.update(dict(lr=1e-3))  # [ours] a short CPU run needs a larger step than SANTA's 2e-4
  elif variant == "brats":
    gan.source = "t1"  # BraTS has no CT: T1 -> T1-Ce (any of t1, t2, flair)
    t.update(dict(steps=20000, batch_size=4, log_every=100, ckpt_every=1000))
  else:
    raise ValueError(f"unknown config variant {variant!r}: expected one of {VARIANTS}")
  return gan


def data_section(variant: str) -> ml_collections.ConfigDict:
  """config.data of a variant: the source contrast and T1-Ce as channels, whole axial slices."""
  d = default_data_config()
  d.update(dict(modalities=("ct", "t1ce"), mode="2d", tumour_fraction=0.7, read_threads=2, prefetch=2))
  if variant == "runlocal":
    d.update(dict(n_cases=18, n_val=6, phantom_shape=(32, 32, 32), shape=(24, 24, 24), patch_shape=(24, 24),
                  batch_size=4, read_threads=1))
  elif variant == "phantom":
    d.update(dict(n_cases=48, n_val=24, phantom_shape=(40, 40, 40), shape=(32, 32, 32), patch_shape=(32, 32),
                  batch_size=8))
  elif variant == "brats":
    d.update(dict(FOLDER_DEFAULTS, source="brats", root="", n_cases=0, n_val=50, modalities=("t1", "t1ce"),
                  shape=(128, 128, 128), patch_shape=(128, 128), batch_size=16, read_threads=8, prefetch=8,
                  spacing=(1.5, 1.5, 1.5)))  # [ours] the brain's box fits 128^3 at 1.5 mm
  return d


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = base_config(arg, VARIANTS)
  variant = config.variant
  config.data = data_section(variant)
  config.gan = gan_section(variant)
  config.eval = ml_collections.ConfigDict(dict(
      n_figure_cases=3,  # held-out cases in the source / synthetic / real figure grid
      max_cases=0))  # 0: every validation case for PSNR / SSIM / MAE
  return config
