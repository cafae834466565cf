"""Protections that draw noise and fit nothing: the clean reference, random sign noise, class-wise noise and the
class pattern (a positive control: a shortcut a convolution reads anywhere)."""
from __future__ import annotations

import numpy as np

from mri_poison.poison import unlearnable as ul
from mri_poison.poison.protections import NONE, Inputs, Protection, register


def _none(a: Inputs):
  return np.asarray(a.data["image"]), {}


register(Protection(NONE, 0, "no protection (clean training data)", _none))
register(Protection("random", 1, "random sign noise of the same L-inf budget on the brain",
                    lambda a: (np.asarray(ul.random_noise(a.stream(1), a.data, a.eps)), {})))
register(Protection("classwise", 2, "class-wise random noise: one fixed random sign pattern per label class and "
                    "position",
                    lambda a: (np.asarray(ul.classwise_noise(a.stream(4), a.data, a.eps, a.n_classes)), {})))
register(Protection("classpattern", 3, "class pattern: one 2x2 sign tile per label class repeated over the slice "
                    "(positive control: a shortcut a convolution reads anywhere)",
                    lambda a: (np.asarray(ul.classpattern_noise(a.stream(5), a.data, a.eps, a.n_classes,
                                                                int(a.config.protect.classpattern.tile))), {})))
