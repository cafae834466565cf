"""UMed: contour- (CDC U-Net) and texture-aware (LBP-clipped U-Net) perturbations on the tumour and its band,
trained against a surrogate (`poison.unlearnable.umed_*`)."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import optax

from mri_poison.poison import unlearnable as ul
from mri_poison.poison.protections import Inputs, Protection, fit_config, fitted, register, surrogate
from mri_poison.train import state as state_lib
from mri_poison.train import trainer


def _umed(a: Inputs):
  p, u = a.config.protect, a.config.protect.umed
  shape = np.shape(a.data["image"])[1:]
  model, surrogate_init = surrogate(a.config, shape)
  apply_fn = state_lib.make_apply_fn(model)
  g_c, g_t = ul.perturbators(u, int(shape[-1]))
  txs = (optax.adam(float(u.lr)), optax.adam(float(u.lr)), optax.adam(float(u.surrogate_lr)))
  init = ul.umed_init(g_c, g_t, surrogate_init, a.stream(3), a.data,
                      dict(zip(("contour", "texture", "surrogate"), txs)))
  step = ul.umed_step_fn(g_c, g_t, apply_fn, txs, batch=int(p.batch), eps=a.eps, k=int(u.k),
                         warmup=int(u.surrogate_warmup))
  state = trainer.fit(fit_config(a.config, "umed", int(u.steps)), a.run_dir, init_state=init, step_fn=step,
                      step_args=({k: jnp.asarray(v) for k, v in a.data.items()},))
  images = ul.umed_protect(g_c, g_t, state, a.data, a.eps)
  return images, fitted(apply_fn, state["surrogate"]["params"], images, a.data, float(p.hallmark_max))


register(Protection("umed", 5, "UMed: contour (CDC U-Net) + texture (LBP-clipped U-Net) perturbations on the "
                    "tumour and its band", _umed, trained=True))
