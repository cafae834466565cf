"""Study 3: every (arm/victim, threat, budget) result on the held-out cases as an evaluation cell; statistics.

Threats (budget in brackets): "clean" (0), "deform" (target drop Delta: per-case optimisation), "deform_max"
(1: hinge to Dice 0 for every step, the largest drop the budgets allow), "random" (1: random fields at the full
budgets), "generator" (Delta: G(x, Delta), one forward pass; undefended victims only, G was trained against
them), and study 2's "ifgsm" / "pgd" (eps). Deformation cells hold per case: dice_clean, dice, target, drop_error
(achieved minus target drop), reached, max_disp, folded (fraction of det J <= 0), bias_min, bias_max, add_max,
steps_used; gradient-attack cells hold dice_clean and dice.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from mri_poison import cellstore
from mri_poison import metrics
from mri_poison.attacks import deform
from mri_poison.attacks import gradient
from mri_poison.attacks import losses as attack_losses
from mri_poison.train import workdir as workdir_lib

EVAL_VERSION = 1
DEFORM_THREATS = ("deform", "deform_max", "random", "generator")
GRADIENT_THREATS = ("ifgsm", "pgd")
THREATS = ("clean",) + DEFORM_THREATS + GRADIENT_THREATS
DEFORM_METRICS = ("dice_clean", "dice", "target", "drop_error", "reached", "max_disp", "folded", "bias_min",
                  "bias_max", "add_max", "steps_used")


def victim_digest(model_cfg, params) -> str:
  return cellstore.digest({"model": workdir_lib.config_dict(model_cfg), "params": cellstore.tree_digest(params)})


def case_keys(key, n: int):
  """One key per case (by its place in the split), so a case's random field does not depend on batching."""
  return jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(n))


@functools.partial(jax.jit, static_argnames=("shape", "s"))
def random_fields(keys, shape, s: deform.Settings) -> dict:
  """Random fields at the full budgets, one per key: (B, ...) normalised variables for images of `shape`."""
  one = lambda k: jax.tree.map(lambda v: v[0], deform.random_variables(k, (1,) + tuple(shape[1:]), s))
  return jax.vmap(one)(keys)


def _report(apply_fn, params, x, y, z, s, clean, target, steps_used) -> dict:
  ev = deform.evaluate(apply_fn, params, x, y, z, s)
  dice = np.asarray(ev["dice"], np.float64)
  drop_error = (clean - dice) - (clean - target)
  rows = {"dice_clean": clean, "dice": dice, "target": target, "drop_error": drop_error,
          "reached": np.asarray(deform.reached(jnp.asarray(dice), jnp.asarray(target), s), np.float64),
          "steps_used": np.asarray(steps_used, np.float64)}
  rows.update({m: np.asarray(ev[m], np.float64) for m in ("max_disp", "folded", "bias_min", "bias_max", "add_max")})
  return rows


def deform_cell_values(threat: str, budget: float, apply_fn, params, data: dict, s: deform.Settings, key,
                       batch: int, generator=None) -> dict:
  """Per-case metrics (each (N,)) of one deformation threat at one budget on the held-out arrays."""
  n = data["image"].shape[0]
  keys = case_keys(key, n)

  def one_batch(sl):
    x, y = jnp.asarray(data["image"][sl]), jnp.asarray(data["label"][sl])
    clean = np.asarray(deform.hard_region_dice(apply_fn(params, x), y), np.float64)
    b = x.shape[0]
    if threat in ("deform", "deform_max"):
      st = s if threat == "deform" else s._replace(loss="hinge", stop="none")
      delta = jnp.full((b,), float(budget) if threat == "deform" else 1.0, jnp.float32)
      z, info = deform.attack(apply_fn, params, x, y, delta, keys[sl][0], st)
      target, used = np.asarray(info["target"], np.float64), info["steps_used"]
    elif threat == "random":
      z = random_fields(keys[sl], x.shape, s)
      target, used = np.full(b, np.nan), np.zeros(b)
    elif threat == "generator":
      gen_model, gen_params = generator
      z = gen_model.apply({"params": gen_params}, x, jnp.full((b,), float(budget)))
      target, used = np.maximum(clean - float(budget), 0.0), np.zeros(b)
    else:
      raise ValueError(f"unknown deformation threat {threat!r}")
    # Scored with the base settings whatever the threat's loss/stop (they do not change the transformation), so
    # one compiled scorer serves every threat.
    values = _report(apply_fn, params, x, y, z, s, clean, target, used)
    return {m: np.asarray(values[m], np.float64).reshape(-1) for m in DEFORM_METRICS}

  return cellstore.map_case_batches(n, batch, one_batch)


def gradient_cell_values(threat: str, eps: float, apply_fn, params, data: dict, attack_cfg, key, batch: int) -> dict:
  """Per-case clean and attacked Dice of study 2's i-FGSM / PGD (CE, L-inf in z-score units, brain voxels)."""
  steps, frac = int(attack_cfg.gradient_steps), float(attack_cfg.step_frac)

  def one_batch(sl):
    x, y = jnp.asarray(data["image"][sl]), jnp.asarray(data["label"][sl])
    brain = jnp.any(x != 0, axis=-1)
    loss = attack_losses.cross_entropy(apply_fn, params, y, brain)
    if threat == "ifgsm":
      x_adv = gradient.ifgsm(loss, x, eps=eps, step_size=frac * eps, steps=steps, mask=brain)
    elif threat == "pgd":
      x_adv = gradient.pgd(loss, x, eps=eps, step_size=frac * eps, steps=steps, key=jax.random.fold_in(key, sl.start),
                           mask=brain)
    else:
      raise ValueError(f"unknown gradient threat {threat!r}")
    return {"dice_clean": np.asarray(deform.hard_region_dice(apply_fn(params, x), y), np.float64),
            "dice": np.asarray(deform.hard_region_dice(apply_fn(params, x_adv), y), np.float64)}

  return cellstore.map_case_batches(data["image"].shape[0], batch, one_batch)


def threat_settings(threat: str, config) -> dict:
  """The config values that change a threat's cells."""
  if threat in GRADIENT_THREATS:
    return {"steps": int(config.attack.gradient_steps), "step_frac": float(config.attack.step_frac),
            "seed": int(config.attack.seed)}
  if threat == "clean":
    return {}
  s = {"deform": config.deform.to_dict(), "seed": int(config.attack.seed)}
  if threat == "generator":
    s["generator"] = config.generator.to_dict()
  return s


def victim_plan(config, arm: str, victim: str) -> list[tuple[str, float]]:
  """(threat, budget) pairs evaluated for one victim."""
  acfg = config.attack
  plan = [("deform", float(d)) for d in acfg.deltas]
  if bool(acfg.max_threat):
    plan.append(("deform_max", 1.0))
  plan.append(("random", 1.0))
  if victim == "undefended" and bool(config.generator.enabled) and arm in tuple(config.generator.arms):
    plan += [("generator", float(d)) for d in acfg.deltas]
  plan += [(t, float(e)) for t in acfg.gradient_attacks for e in acfg.eps]
  return plan


def make_cells(config, arm: str, victim: str, params_digest: str, data: dict, extra: dict | None = None) -> dict:
  cases = list(data["case_id"])
  name = f"{arm}/{victim}"
  cells = {}
  for threat, budget in victim_plan(config, arm, victim):
    also = dict(extra or {}) if threat == "generator" else {}
    cells[(threat, budget)] = cellstore.make_cell(name, threat, budget, params=params_digest,
                                               settings=threat_settings(threat, config), cases=cases,
                                               version=EVAL_VERSION, data=data["digest"], **also)
  return cells


def evaluate(table: cellstore.CellTable, cells: dict, apply_fn, params, data: dict, config, key, *,
             generator=None, progress=None) -> int:
  """Computes the missing cells of one victim (saving the table after each); returns how many were computed."""
  s = deform.settings(config.deform)
  batch = int(config.attack.batch)
  todo = {c.key for c in table.missing(cells.values())}
  done = 0
  for i, ((threat, budget), cell) in enumerate(cells.items()):
    if cell.key not in todo:
      continue
    k = jax.random.fold_in(jax.random.fold_in(key, THREATS.index(threat)), int(round(budget * 1000)))
    if threat in GRADIENT_THREATS:
      values = gradient_cell_values(threat, budget, apply_fn, params, data, config.attack, k, batch)
    else:
      values = deform_cell_values(threat, budget, apply_fn, params, data, s, k, batch, generator)
    table.add(cell, data["case_id"], values)
    table.save()
    done += 1
    if progress is not None:
      progress.advance(1, label=f"{cell.victim} {threat} {budget:g}")
  return done


# ------------------------------------------------------------------------------------------------ tables


def summary_rows(table: cellstore.CellTable, cells_by_victim: dict, case_ids: dict) -> list[dict]:
  """One row per (victim, threat, budget): means over cases, the folding / budget checks."""
  rows = []
  for victim, threat, budget, ids, v in _cell_values(table, cells_by_victim, case_ids):
    row = {"victim": victim, "threat": threat, "budget": budget, "n": len(ids),
           "dice_clean": float(np.mean(v["dice_clean"])), "dice": float(np.mean(v["dice"])),
           "dice_std": float(np.std(v["dice"])), "drop": float(np.mean(v["dice_clean"] - v["dice"]))}
    if "drop_error" in v:
      # deform_max has no target (it goes as far as the budget allows): no drop error, nothing to reach.
      err = v["drop_error"] if threat != "deform_max" else np.full(len(ids), np.nan)
      row.update(drop_error_mean=float(np.nanmean(err)) if np.isfinite(err).any() else float("nan"),
                 drop_error_abs=float(np.nanmean(np.abs(err))) if np.isfinite(err).any() else float("nan"),
                 reached=float(np.mean(v["reached"])) if threat in ("deform", "generator") else float("nan"),
                 max_disp=float(np.max(v["max_disp"])), max_disp_mean=float(np.mean(v["max_disp"])),
                 folded_max=float(np.max(v["folded"])), folded_cases=int(np.sum(v["folded"] > 0)),
                 bias_min=float(np.min(v["bias_min"])), bias_max=float(np.max(v["bias_max"])),
                 steps_used=float(np.mean(v["steps_used"])))
    rows.append(row)
  return rows


def per_case_rows(table: cellstore.CellTable, cells_by_victim: dict, case_ids: dict) -> list[dict]:
  rows = []
  for victim, threat, budget, ids, v in _cell_values(table, cells_by_victim, case_ids):
    for i, c in enumerate(ids):
      rows.append({"victim": victim, "threat": threat, "budget": budget, "case": c,
                   **{m: float(x[i]) for m, x in v.items()}})
  return rows


def _cell_values(table: cellstore.CellTable, cells_by_victim: dict, case_ids: dict):
  """(victim, threat, budget, case ids, {metric: per-case values}) for every cell of every victim."""
  for victim, cells in cells_by_victim.items():
    ids = case_ids[victim.split("/")[0]]
    for (threat, budget), cell in cells.items():
      yield victim, threat, budget, ids, {m: table.values(cell, m, ids) for m in table.metrics(cell)}


def comparison(name: str, a, b, *, primary: bool, seed: int = 0, **labels) -> dict:
  """Paired a vs b (mean difference with a bootstrap CI, Wilcoxon p, n, effective n)."""
  res = metrics.paired_comparison(a, b, seed=seed)
  return {"comparison": name, "primary": primary, **labels, **res}


def with_holm(rows: list[dict]) -> list[dict]:
  """Adds p_holm over the primary rows (the exploratory rows get NaN)."""
  prim = [i for i, r in enumerate(rows) if r["primary"]]
  adj = metrics.holm([rows[i]["p_value"] for i in prim]) if prim else []
  out = [dict(r, p_holm=float("nan")) for r in rows]
  for i, p in zip(prim, adj):
    out[i]["p_holm"] = float(p)
  return out


def claim_rows(config, summary: list[dict], comparisons: list[dict]) -> list[dict]:
  """The generator's two claims per arm as rows (claim, statistic, value, threshold, verdict), for the report to
  word: does its achieved drop follow Delta (the drop at the largest Delta exceeds the drop at the smallest by at
  least half their gap), and does it lower Dice more than random fields (the primary comparison, Holm p < 0.05
  with the bootstrap CI above 0). Only for an arm whose generator was evaluated at two or more Deltas."""
  rows = []
  for arm in config.arms:
    gen = [r for r in summary if r["victim"] == f"{arm}/undefended" and r["threat"] == "generator"]
    if len(gen) < 2:
      continue
    rise, gap = gen[-1]["drop"] - gen[0]["drop"], float(gen[-1]["budget"]) - float(gen[0]["budget"])
    rows.append({"arm": arm, "claim": "generator follows Delta", "statistic": "drop(largest Delta) - drop(smallest)",
                 "value": rise, "threshold": 0.5 * gap, "verdict": bool(rise > 0.5 * gap)})
    c = next((c for c in comparisons if c["primary"] and c.get("arm") == arm
              and c["comparison"].startswith("random - generator")), None)
    rows.append({"arm": arm, "claim": "generator beats random fields", "statistic": "Holm p; 95 % CI low > 0",
                 "value": c["p_holm"] if c else float("nan"), "threshold": 0.05,
                 "verdict": bool(c is not None and c["p_holm"] < 0.05 and c["ci_low"] > 0)})
  return rows
