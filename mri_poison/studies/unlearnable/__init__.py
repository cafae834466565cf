"""Study 4: unlearnable examples for segmentation (UMed, arXiv 2403.14250; error-minimising noise as baseline).

`run(config, workdir)` protects the training split with each of config.protect.methods (nothing, random noise
of the same budget, min-min, UMed), trains a fresh victim U-Net from scratch on each protected split, under
each counter-measure of config.counter.regimes (standard, adversarial training, strong augmentation,
purification) and with partial protection (a fraction of the cases protected), and tests every victim on the
clean test split (data.n_val cases). Protection quality (PSNR / SSIM on [0, 1]-scaled intensities, the
perturbation's share inside ROI + band and the band) and every victim's per-case Dice are evaluation cells
(results/cells.csv); tables, paired tests (Holm over the primary family), figures and report.md derive from
them. Protections are resumable `fit` runs (protect/<method>), victims `train_model` runs (models/<victim>):
a rerun reuses both. Protected training splits are also written as BraTS NIfTI folders (protected/<method>).

Modules: counter (the counter-measures), study (`run`), report (tables, figures, report.md).
"""
from mri_poison.studies.unlearnable.counter import REGIMES
from mri_poison.studies.unlearnable.study import RESUMABLE_KEYS, run
