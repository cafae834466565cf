"""Study 4: unlearnable examples for segmentation (UMed, arXiv 2403.14250; error-minimising noise as baseline).

`run(config, workdir)` protects the training split with each of config.protect.methods (nothing, random noise
of the same budget, class-wise random noise, the position-independent class pattern (the positive control),
min-min, UMed), trains a fresh victim U-Net from scratch on each
protected split, under each counter-measure of config.counter.regimes (standard, adversarial training, strong
augmentation, purification; against config.counter.methods), with partial protection (a fraction of the cases
protected) and at the larger budgets of config.protect.sweep_eps, and tests every victim on the clean test
split (data.n_val cases). Diagnostics say why a protection does or does not work: each standard victim is also
scored on its own protected training data and on the same cases unprotected (a learned shortcut shows as a
gap), and the hallmark (the min-min / UMed surrogates' and victims' CE on protected / clean slices; above
protect.hallmark_max a protection is "not converged") is recorded; standard victims of
config.replicates.methods are retrained with other seeds (the run-to-run spread). Protection quality (PSNR /
SSIM on [0, 1]-scaled intensities, the perturbation's share inside ROI + band and the band) and every victim's
per-case Dice are evaluation cells (results/cells.csv); `analysis` turns them into the result tables (paired
tests, Holm over the primary family) and figures, and report.md is worded from those files alone (`render`).
Protections are resumable `fit` runs (protect/<method>), victims `train_model` runs (models/<victim>): a rerun
reuses both. Protected training splits are also written as BraTS NIfTI folders (protected/<method>)
and as TFDS datasets brats_protected/<method> under protected_tfds/ (read with data.source="tfds").

With config.phase_map.enabled, `phase_map.run` then maps the victim Dice drop over data difficulty x budget
(workdir/phase_map/, a section of report.md).

Modules: counter (the counter-measures), victims, study (`run`, `render`), analysis (result tables, statistics,
figures), report (report.md from the result rows), phase_map.
"""
from mri_poison.studies.unlearnable.counter import REGIMES
from mri_poison.studies.unlearnable.study import RESUMABLE_KEYS, check, render, run
