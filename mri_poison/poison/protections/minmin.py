"""Error-minimising noise (min-min, Huang et al., ICLR 2021): a surrogate and the noise that makes its loss small,
trained in alternation (`poison.unlearnable.minmin_*`)."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import optax

from mri_poison.poison import unlearnable as ul
from mri_poison.poison.protections import Inputs, Protection, fit_config, fitted, register, surrogate
from mri_poison.train import state as state_lib
from mri_poison.train import trainer


def _minmin(a: Inputs):
  p, m = a.config.protect, a.config.protect.minmin
  model, surrogate_init = surrogate(a.config, np.shape(a.data["image"])[1:])
  apply_fn = state_lib.make_apply_fn(model)
  tx = optax.adam(float(m.lr))
  init = ul.minmin_init(surrogate_init, a.stream(2), a.data, tx, str(m.mode))
  step = ul.minmin_step_fn(apply_fn, tx, batch=int(p.batch), eps=a.eps, train_steps=int(m.train_steps),
                           pgd_steps=int(m.pgd_steps), step_frac=float(m.step_frac),
                           stop_accuracy=float(m.stop_accuracy), mode=str(m.mode), n_classes=a.n_classes)
  state = trainer.fit(fit_config(a.config, "minmin", int(m.steps)), a.run_dir, init_state=init, step_fn=step,
                      step_args=({k: jnp.asarray(v) for k, v in a.data.items()},))
  images = np.asarray(ul.minmin_protect(state, a.data, str(m.mode)))
  return images, {"stopped_at": int(state["noise"]["stopped_at"]),
                  "accuracy": float(state["noise"]["last"]["accuracy"]),
                  **fitted(apply_fn, state["surrogate"]["params"], images, a.data, float(p.hallmark_max))}


register(Protection("minmin", 4, "error-minimising noise (min-min, Huang et al. 2021) on the brain", _minmin,
                    trained=True))
