"""Study 2: gradient attacks on a 3D U-Net and two defences (arXiv 1908.00656, J Digit Imaging 2021).

`run(config, workdir)` trains (or reuses, from workdir/models/*) a base 3D U-Net (4 contrasts -> 4 labels) and,
from it with equal fine-tuning budgets, an undefended model ("undefended"), a defensively distilled student
("distilled", its teacher in models/teacher) and an adversarially trained one ("adversarial"); evaluates each on
whole validation volumes, clean and under FGSM, i-FGSM, targeted i-FGSM, PGD, SegPGD, CosPGD and random sign noise
over an eps grid (z-score units, brain voxels only; each attack's eps grid is one compiled call), and writes
per-case Dice, summaries, Wilcoxon signed-rank tests, the 3D AutoAttack-style robust fraction, sanity checks,
figures, a few adversarial NIfTI volumes and report.md. Every file is written atomically; a rerun reuses finished
models and evaluations.

Modules: training (the models), evaluation (attacks, scores, statistics), report (report.md), study (`run`).
"""
from mri_poison.robustify.evaluation import ATTACKS, DICE_COLUMNS, NOISE, TARGETS
from mri_poison.robustify.study import run
from mri_poison.robustify.training import MODELS, train_models
