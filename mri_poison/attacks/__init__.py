"""Gradient attacks on dense segmentation: the general loop `optimize`, its sign-step instance (FGSM, i-FGSM,
PGD), APGD, dense losses, eps sweeps, sanity checks, differentiable sliding-window inference (attacks through the
deployed model), and the attack zoo (`zoo`: every threat a study runs, by name)."""
from mri_poison.attacks import apgd, losses, sanity, sliding_window, zoo
from mri_poison.attacks.optimize import optimize, sign_step  # the function `optimize` shadows its module here
from mri_poison.attacks.gradient import fgsm, ifgsm, kurakin_schedule, pgd
from mri_poison.attacks.loop import ball_projection, project, run_steps
from mri_poison.attacks.sanity import (gradient_sanity, loss_increase, random_sign_baseline, random_sign_noise,
                                       robust_fraction, sequential_robustness)
from mri_poison.attacks.eps_sweep import sweep
from mri_poison.attacks.sliding_window import sliding_window_logits, windowed_apply
