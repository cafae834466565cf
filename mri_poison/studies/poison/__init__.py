"""Study 1: synthetic-data poisoning of U-Net training (arXiv 2502.03825) with a SANTA-style translation GAN.

`run(config, workdir)` trains (or reuses, from workdir/models/gan) the translation GAN on the training cases,
synthesises the target contrast (T1-Ce) of every case, builds training sets whose synthetic share is k/6
(`mri_poison.poison.mixing`, modes "replace" and "add"), trains the six 2D enhancing-tumour U-Nets of every
(mode, seed) as ONE vmapped program (`training`), scores each on real validation cases as evaluation cells
(`evaluation`: victim = "<mode>/k<k>/seed<s>", threat "none", budget = share), tests every share against k = 0
(Wilcoxon, Holm, bootstrap CIs), measures how detectable the synthetic slices are (`mri_poison.poison.detect`)
and writes results/poison_sweep.csv, figures and report.md (`render(workdir)` writes report.md again
from a finished workdir's result files alone). `run_gan` (module `translator`) is the GAN alone.
"""
from mri_poison.studies.poison.study import PAPER, RESUMABLE_KEYS, check, render, run
from mri_poison.studies.poison.translator import run_gan
