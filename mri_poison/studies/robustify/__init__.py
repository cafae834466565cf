"""Study 2: gradient attacks on a 3D U-Net and two defences (arXiv 1908.00656, J Digit Imaging 2021).

`run(config, workdir)` trains (or reuses, from workdir/models/*) a base 3D U-Net (4 contrasts -> 4 labels) and,
from it with equal fine-tuning budgets, an undefended model ("undefended"), a defensively distilled student
("distilled", its teacher in models/teacher) and an adversarially trained one ("adversarial"); evaluates each on
whole validation volumes, clean and under FGSM, i-FGSM, targeted i-FGSM, PGD, SegPGD, CosPGD and random sign noise
over an eps grid (z-score units, brain voxels only), and writes per-case Dice, summaries, Wilcoxon signed-rank
tests, the 3D AutoAttack-style robust fraction, sanity checks, figures, a few adversarial NIfTI volumes and
report.md. Every file is written atomically.

Every (model, threat, eps) result on the validation split is an evaluation cell (`studies.common`), stored in
results/cells.csv and keyed by the model's params, the threat's settings, the eps, the split and the code
version; per_case.csv, summary.csv, sanity.csv and the rest are derived from it. A rerun reuses finished models
and cells; adding an eps, an attack or validation cases (attack.* / eval.* may change between runs of one
workdir) computes only the new cells, each threat's missing eps in one compiled sweep.

Modules: training (the models), evaluation (cells, attacks, scores, statistics), report (report.md),
study (`run`).
"""
from mri_poison.studies.robustify.evaluation import ATTACKS, CLEAN, DICE_COLUMNS, NOISE, TARGETS, THREATS
from mri_poison.studies.robustify.study import RESUMABLE_KEYS, run
from mri_poison.studies.robustify.training import MODELS, train_models
