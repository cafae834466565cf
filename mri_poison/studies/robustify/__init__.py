"""Study 2: gradient attacks on a 3D U-Net and two defences (arXiv 1908.00656, J Digit Imaging 2021), evaluated
as a reviewer would.

`run(config, workdir)` trains (or reuses, from workdir/models/*) a base 3D U-Net (4 contrasts -> 4 labels) and,
from it with equal fine-tuning budgets, an undefended model ("undefended"), a defensively distilled student
("distilled", its teacher in models/teacher) and an adversarially trained one ("adversarial", PGD at the
reference eps by default); attacks each on whole validation volumes (or through sliding-window inference,
eval.sliding_window) over a geometric eps grid up to collapse with every configured attack: FGSM, i-FGSM, PGD,
SegPGD, CosPGD, a CW-style margin PGD, PGD at the model's training temperature (distilled model), transfer of
the undefended model's PGD examples, targeted i-FGSM / targeted margin, and random sign noise. Per case and
eps the worst attack is the *adaptive* threat: the headline table, the Dice-vs-eps curve to collapse, the
budget at which Dice halves (bootstrap CI) and the pre-declared primary comparisons (Holm-corrected; each
defence vs undefended under the adaptive attack, each attack vs clean) use it. The report adds masking
diagnostics (saturated softmax, T = 1 vs adaptive gap, transfer vs direct, collapse, plain-CE trajectories),
perceptibility (PSNR/SSIM) per budget, targeted success and generated findings. Every file is written
atomically.

Every (model, threat, eps) result on the validation split is an evaluation cell (`studies.common`), stored in
results/cells.csv and keyed by the model's params, the threat's settings, the eps, the split and the code
version; per_case.csv, summary.csv and the rest are derived from it. A rerun reuses finished models and cells;
adding an eps, an attack or validation cases (attack.* / eval.* may change between runs of one workdir)
computes only the new cells, each threat's missing eps in one compiled sweep.

Modules: training (the models), evaluation (cells, attacks, scores, adaptive worst case, budgets, statistics),
report (report.md), study (`run`).
"""
from mri_poison.studies.robustify.evaluation import (ADAPTIVE, ATTACKS, CLEAN, DICE_COLUMNS, NOISE, TARGETS, THREATS,
                                                     halving_budget, halving_budget_ci)
from mri_poison.studies.robustify.study import RESUMABLE_KEYS, check, render, run
from mri_poison.studies.robustify.training import MODELS, train_models, training_budgets
