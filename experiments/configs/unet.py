"""U-Net segmentation training configs: `get_config("<variant>[,basic_unet]")`.

Run (from the repository root; re-running the same command on the same workdir resumes):
  python -m experiments.train --config experiments/configs/unet.py:runlocal --workdir /tmp/unet_runlocal
  python -m experiments.train --config experiments/configs/unet.py:phantom2d --workdir runs/unet_phantom2d
  python -m experiments.train --config experiments/configs/unet.py:phantom3d --workdir runs/unet_phantom3d
  python -m experiments.train --config experiments/configs/unet.py:brats3d --workdir runs/unet_brats3d \
      --config.data.root=/data/BraTS2021
  python -m experiments.train --config experiments/configs/unet.py:brats3d,basic_unet --workdir runs/basic_brats
Any field can be overridden, e.g. --config.train.steps=200 --config.data.batch_size=4.

Variants:
  runlocal   CPU, seconds: 2D slices of 6 tiny phantom heads, 100 steps.
  phantom2d  CPU, ~1-2 min: 2D whole-slice model on 24 phantom heads (32^3 grid).
  phantom3d  CPU, a few minutes: 3D 32^3 patches of 24 phantom heads, sliding-window eval.
  brats3d    GPU: BraTS folder (data.root), 128^3 grid and patches, bfloat16, batch 2, 30k steps.
  basic_unet modifier (or alone = brats3d,basic_unet): MONAI BasicUNet features (32, 32, 64, 128, 256, 32).
"""
import ml_collections

from mri_poison.data.datasets import FOLDER_DEFAULTS, default_data_config

VARIANTS = ("runlocal", "phantom2d", "phantom3d", "brats3d")
BASIC_UNET_FEATURES = (32, 32, 64, 128, 256, 32)  # as mri_poison.models.unet.basic_unet_features()


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  parts = [p for p in (arg or "runlocal").split(",") if p]
  basic = "basic_unet" in parts
  parts = [p for p in parts if p != "basic_unet"] or (["brats3d"] if basic else ["runlocal"])
  if len(parts) != 1 or parts[0] not in VARIANTS:
    raise ValueError(f"unknown config variant {arg!r}: expected one of {VARIANTS}, optionally ',basic_unet'")
  variant = parts[0]

  config = ml_collections.ConfigDict()
  config.variant = arg or "runlocal"
  config.data = default_data_config()
  config.model = ml_collections.ConfigDict(dict(
      name="unet",  # the segmenter: "unet" | "resenc_unet" (mri_poison.models.VICTIMS)
      features=(16, 32, 64, 128), out_channels=4, norm="instance", activation="leaky_relu", dropout=0.0,
      dtype="float32", deep_supervision=False,
      conv_impl="auto",  # auto | xla | folded: how convs are computed (folded 3D convs on CPU); same params
      remat=False))  # recompute block activations in the backward pass: ~3x less stored, ~1 more forward
  config.train = ml_collections.ConfigDict(dict(
      seed=0, steps=1000, lr=2e-3, warmup_steps=50, min_lr_ratio=0.0, weight_decay=1e-5, grad_clip=1.0,
      log_every=50, ckpt_every=500, keep_checkpoints=2, eval_every=0, loss="ce_dice",
      schedule_steps=0))  # lr horizon; 0 = steps. To train a finished run longer, set it to the old steps
  config.eval = ml_collections.ConfigDict(dict(
      window=(32, 32, 32), overlap=0.5, sw_batch=4, slice_batch=8, pad_multiple=16, max_cases=0))

  d, m, t, e = config.data, config.model, config.train, config.eval
  if variant == "runlocal":
    d.update(dict(n_cases=6, n_val=2, phantom_shape=(32, 32, 32), shape=(32, 32, 32), mode="2d",
                  patch_shape=(32, 32), batch_size=4, read_threads=1, prefetch=2))
    m.features = (8, 16, 32)
    t.update(dict(steps=100, warmup_steps=10, log_every=25, ckpt_every=50))
    e.pad_multiple = 4
  elif variant == "phantom2d":
    d.update(dict(n_cases=24, n_val=4, phantom_shape=(40, 40, 40), shape=(32, 32, 32), mode="2d",
                  patch_shape=(32, 32), batch_size=8, tumour_fraction=0.7, read_threads=2))
    m.features = (16, 32, 64)
    t.update(dict(steps=300, warmup_steps=20, log_every=25, ckpt_every=100, eval_every=100))
    e.pad_multiple = 4
  elif variant == "phantom3d":
    d.update(dict(n_cases=24, n_val=4, phantom_shape=(48, 48, 48), shape=(32, 32, 32), mode="3d",
                  patch_shape=(32, 32, 32), batch_size=2, read_threads=2))
    m.features = (8, 16, 32, 64)
    t.update(dict(steps=400, warmup_steps=20, log_every=25, ckpt_every=100, eval_every=200))
    e.window = (32, 32, 32)
  elif variant == "brats3d":
    d.update(dict(FOLDER_DEFAULTS, source="brats", root="", n_cases=0, n_val=50, phantom_shape=(128, 128, 128),
                  shape=(128, 128, 128), mode="3d", patch_shape=(128, 128, 128), batch_size=2, read_threads=8,
                  prefetch=8, spacing=(1.5, 1.5, 1.5)))  # [ours] the brain's box fits 128^3 at 1.5 mm
    m.update(dict(features=(32, 64, 128, 256, 320), dtype="bfloat16"))
    t.update(dict(steps=30000, lr=1e-3, warmup_steps=500, log_every=100, ckpt_every=1000, eval_every=5000))
    e.update(dict(window=(128, 128, 128), overlap=0.5, sw_batch=2, max_cases=0))
  if basic:
    m.features = BASIC_UNET_FEATURES
  return config
