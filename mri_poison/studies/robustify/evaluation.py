"""Study 2: attacking and scoring whole validation volumes as evaluation cells; the tables derived from them.

A cell (`common.Cell`) is one victim model under one threat at one eps on the validation split: clean (eps 0),
an attack of `ATTACKS`, or the same-eps random sign noise `NOISE`. Its rows hold, per case, the Dice of each
region and their mean, CE to the labels, CE to the target map and, for the loop's attacks, whether the loss
went the right way (`loss_gain`, `loss_monotone`); the clean cell also holds the fraction of zero input
gradients. `evaluate_victim` computes only the cells missing from the table, with one compiled sweep per
(victim, attack, volume batch) over the missing eps; per-case rows, sanity rows, summaries, Wilcoxon tests and
the robust fraction are all derived from the table.
"""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mri_poison import metrics
from mri_poison.attacks import gradient
from mri_poison.attacks import losses as attack_losses
from mri_poison.attacks import sanity
from mri_poison.attacks.eps_sweep import sweep
from mri_poison.data.case import REGIONS
from mri_poison.report import tables
from mri_poison.studies import common
from mri_poison.train import state as state_lib
from mri_poison.train import workdir as workdir_lib


ATTACKS = ("fgsm", "ifgsm", "ifgsm_targeted", "pgd", "segpgd", "cospgd")
NOISE = "random_sign"  # same-eps random sign noise: the baseline every attack must beat
CLEAN = "clean"
# Every threat's random stream is numbered by its place here (not in the config's list), so adding or dropping
# an attack leaves the other threats' cells valid.
THREATS = ATTACKS + (NOISE,)
ITERATIVE = ("ifgsm", "ifgsm_targeted", "pgd", "segpgd", "cospgd")
RANDOM_START = ("pgd", "segpgd", "cospgd")
TARGETS = ("erase_tumour", "et_to_oedema", "least_likely")
DICE_COLUMNS = tuple(f"dice_{r}" for r in REGIONS) + ("dice_mean",)
PER_CASE_COLUMNS = DICE_COLUMNS + ("ce", "ce_target")
# Bump when a change of this module changes any cell's numbers: every cell is then recomputed.
EVAL_VERSION = 1
ATTACK_TEXT = {
    "fgsm": "FGSM: x + eps sign(grad CE) (one step)",
    "ifgsm": "i-FGSM / BIM: N sign steps of alpha, projected on the eps-ball",
    "ifgsm_targeted": "targeted i-FGSM: N sign steps decreasing CE to the target map",
    "pgd": "PGD: i-FGSM from a uniform random start in the eps-ball",
    "segpgd": "SegPGD: PGD on CE re-weighted from correct to wrong voxels, lambda_t = (t-1)/(2N)",
    "cospgd": "CosPGD: PGD on CE weighted by stop-grad cos(softmax, one-hot label)",
    NOISE: "random sign noise: x + eps * random signs (baseline)",
}


# ------------------------------------------------------------------------------------------------ attacks


def model_apply_fn(model_cfg):
  """The apply_fn of config.model, the same object for equal configs (make_apply_fn is cached by value).

  Attack losses and the scorer hold apply_fn as a static part of their compiled programs: one object per
  architecture means every victim of that architecture reuses them.
  """
  return state_lib.make_apply_fn(state_lib.make_model(model_cfg))


def make_target(kind: str, apply_fn, params, x, labels):
  if kind == "erase_tumour":
    return attack_losses.target_erase_tumour(labels)
  if kind == "et_to_oedema":
    return attack_losses.target_et_to_oedema(labels)
  if kind == "least_likely":
    return attack_losses.target_least_likely(apply_fn, params, x)
  raise ValueError(f"config attack.target={kind!r}: expected one of {TARGETS}")


def attack_volumes(name: str, apply_fn, params, x, labels, brain, eps, attack_cfg, key, target=None):
  """x_adv (E, B, *S, C) for every eps of `eps` (E,) in one compiled call, and the loop's loss history or None.

  Untargeted attacks increase CE to `labels` over brain voxels; "ifgsm_targeted" decreases CE to `target`.
  Random attacks draw from `key` alone, the same for every eps: an eps's result does not depend on which other
  eps are computed with it.
  """
  steps, frac = int(attack_cfg.steps), float(attack_cfg.step_frac)
  chunk = int(attack_cfg.get("eps_chunk", 0)) or None
  eps = jnp.asarray(eps, jnp.float32)
  common_kw = dict(eps=eps, mask=brain, chunk_size=chunk)
  ce = attack_losses.cross_entropy(apply_fn, params, labels, brain)
  if name == "fgsm":
    return sweep(gradient.fgsm, ce, x, **common_kw), None
  if name == NOISE:
    return _noise_sweep(x, eps, key, brain), None
  if name in ("ifgsm", "ifgsm_targeted"):
    targeted = name == "ifgsm_targeted"
    loss = attack_losses.targeted_cross_entropy(apply_fn, params, target, brain) if targeted else ce
    return sweep(gradient.ifgsm, loss, x, step_size_frac=frac, steps=steps, targeted=targeted,
                 return_history=True, **common_kw)
  if name in RANDOM_START:
    loss = {"pgd": lambda: ce, "segpgd": lambda: attack_losses.segpgd(apply_fn, params, labels, steps, brain),
            "cospgd": lambda: attack_losses.cospgd(apply_fn, params, labels, brain)}[name]()
    return sweep(gradient.pgd, loss, x, step_size_frac=frac, steps=steps, key=key,
                 restarts=int(attack_cfg.restarts), return_history=True, **common_kw)
  raise ValueError(f"unknown attack {name!r}: expected one of {THREATS}")


@jax.jit
def _noise_sweep(x, eps, key, brain):
  return jax.vmap(lambda e: sanity.random_sign_noise(x, eps=e, key=key, mask=brain))(eps)


def attack_cost(name: str, attack_cfg) -> int:
  """Gradient evaluations per eps and volume (for the progress line)."""
  if name in ("fgsm", NOISE):
    return 1
  restarts = int(attack_cfg.restarts) if name in RANDOM_START else 1
  return int(attack_cfg.steps) * restarts


@functools.lru_cache(maxsize=8)
def make_scorer(apply_fn):
  """Jitted `score(params, xs (E, B, *S, C), labels, brain, target) -> dice (E, B, 3), ce (E, B), ce_target (E, B)`.

  Cached per apply_fn, so the models (same architecture, params as arguments) share one compilation.
  """

  def one(params, x, labels, brain, target):
    logits = apply_fn(params, x)
    pred = jnp.argmax(logits, axis=-1)
    dice = metrics.dice_from_counts(metrics.region_counts(pred, labels))
    ce = attack_losses.cross_entropy(apply_fn, params, labels, brain).reduce(logits, labels, brain, 0, 1)
    ce_t = attack_losses.cross_entropy(apply_fn, params, target, brain).reduce(logits, target, brain, 0, 1)
    return dice, ce, ce_t

  @jax.jit
  def score(params, xs, labels, brain, target):
    return jax.lax.map(lambda x: one(params, x, labels, brain, target), xs)

  @jax.jit
  def predict(params, x):
    return jnp.argmax(apply_fn(params, x), axis=-1)

  return score, predict


# ------------------------------------------------------------------------------------------------ cells


def threat_settings(threat: str, attack_cfg, key) -> dict:
  """The config values (and random stream) that change `threat`'s cells; the rest of attack.* does not.

  Every cell scores CE to the target map, so the target kind is in all of them. Random threats draw one key
  per volume batch (`key` folded with the batch's first index and the threat's place in THREATS), so their
  cells also depend on the victim's key and the batch size. `eps_chunk` only bounds memory and is left out.
  """
  s = {"target": str(attack_cfg.target)}
  if threat in ITERATIVE:
    s.update(steps=int(attack_cfg.steps), step_frac=float(attack_cfg.step_frac))
  if threat in RANDOM_START:
    s["restarts"] = int(attack_cfg.restarts)
  if threat in RANDOM_START or threat == NOISE:
    s.update(key=np.asarray(jax.random.key_data(key)).tolist(), stream=THREATS.index(threat),
             batch=int(attack_cfg.batch))
  return s


def victim_digest(model_cfg, params) -> str:
  """A trained model's identity in its cells' keys: its architecture config and its params' bytes."""
  return common.digest({"model": workdir_lib.config_dict(model_cfg), "params": common.tree_digest(params)})


def victim_cells(victim: str, params_digest: str, key, data: dict, config) -> dict[tuple[str, float], common.Cell]:
  """{(threat, eps): cell} of one victim: ("clean", 0.0) and every (threat, eps) of the config's grid."""
  acfg = config.attack
  cases = list(data["case_id"])
  split = {"data": data["digest"]} if "digest" in data else {}
  make = lambda threat, e, settings: common.make_cell(victim, threat, e, params=params_digest, settings=settings,
                                                      cases=cases, version=EVAL_VERSION, **split)
  cells = {(CLEAN, 0.0): make(CLEAN, 0.0, {"target": str(acfg.target)})}
  for threat in tuple(acfg.attacks) + (NOISE,):
    settings = threat_settings(threat, acfg, key)
    for e in acfg.eps:
      cells[(threat, float(e))] = make(threat, float(e), settings)
  return cells


def _batches(n: int, size: int) -> list[slice]:
  return [slice(start, min(start + size, n)) for start in range(0, n, size)]


def evaluation_cost(cells, config) -> int:
  """Gradient evaluations (x volumes) the given cells take: the progress line's total."""
  return sum(attack_cost(c.threat, config.attack) for c in cells if c.threat != CLEAN)


def evaluate_victim(table: common.CellTable, victim: str, params, data: dict, config, key, *,
                    params_digest: str | None = None, progress: common.Progress | None = None) -> list[common.Cell]:
  """Computes the cells of `victim` missing from `table` (saving it after each threat); returns them.

  data: {"image" (N, *S, C), "label" (N, *S), "brain" (N, *S), "case_id": [N], optional "digest"}; key: the
  victim's random stream; params_digest: `victim_digest(config.model, params)` when already known. Volumes go
  in batches of attack.batch; per threat and batch ONE compiled sweep runs over the threat's missing eps.
  """
  acfg = config.attack
  apply_fn = model_apply_fn(config.model)
  score, _ = make_scorer(apply_fn)
  params_digest = params_digest or victim_digest(config.model, params)
  cells = victim_cells(victim, params_digest, key, data, config)
  todo = table.missing(cells.values())
  if not todo:
    return []
  todo_keys = {c.key for c in todo}
  cases = list(data["case_id"])
  batches = _batches(len(cases), int(acfg.batch))

  def batch_arrays(sl):
    x, y = jnp.asarray(data["image"][sl]), jnp.asarray(data["label"][sl])
    brain = jnp.asarray(data["brain"][sl])
    return x, y, brain, make_target(str(acfg.target), apply_fn, params, x, y)

  clean = cells[(CLEAN, 0.0)]
  if clean.key in todo_keys:
    out = {m: [] for m in PER_CASE_COLUMNS + ("zero_grad_fraction",)}
    for sl in batches:
      x, y, brain, target = batch_arrays(sl)
      d, ce, cet = (np.asarray(v)[0] for v in score(params, x[None], y, brain, target))
      _append_scores(out, d, ce, cet)
      ce_loss = attack_losses.cross_entropy(apply_fn, params, y, brain)
      out["zero_grad_fraction"].extend(np.asarray(sanity.gradient_sanity(ce_loss, x, mask=brain)["zero_grad_fraction"]))
    table.add(clean, cases, out)
    table.save()

  for threat in tuple(acfg.attacks) + (NOISE,):
    eps = [float(e) for e in acfg.eps if cells[(threat, float(e))].key in todo_keys]
    if not eps:
      continue
    out = {e: {m: [] for m in PER_CASE_COLUMNS} for e in eps}
    for sl in batches:
      x, y, brain, target = batch_arrays(sl)
      # One key per volume batch, the same for every eps (see threat_settings).
      threat_key = jax.random.fold_in(jax.random.fold_in(key, sl.start), THREATS.index(threat))
      x_adv, hist = attack_volumes(threat, apply_fn, params, x, y, brain, np.asarray(eps, np.float32), acfg,
                                   threat_key, target)
      d, ce, cet = (np.asarray(v) for v in score(params, x_adv, y, brain, target))
      if hist is not None:
        inc = sanity.loss_increase(hist, targeted=threat == "ifgsm_targeted")
        b = sl.stop - sl.start  # restarts (if any) are averaged per case
        gain = np.asarray(inc["gain"]).reshape(len(eps), -1, b).mean(axis=1)
        mono = np.asarray(inc["monotone_fraction"]).reshape(len(eps), -1, b).mean(axis=1)
      for i, e in enumerate(eps):
        _append_scores(out[e], d[i], ce[i], cet[i])
        if hist is not None:
          out[e].setdefault("loss_gain", []).extend(gain[i])
          out[e].setdefault("loss_monotone", []).extend(mono[i])
      if progress is not None:
        progress.advance(attack_cost(threat, acfg) * len(eps) * (sl.stop - sl.start),
                         label=f"{victim}/{threat} eps {eps} volumes {sl.stop}/{len(cases)}")
    for e in eps:
      table.add(cells[(threat, e)], cases, out[e])
    table.save()
  return todo


def _append_scores(out: dict, dice, ce, ce_target) -> None:
  """Per-case Dice per region, their mean (float64, as in per_case.csv), CE and target CE of one batch."""
  dice = np.asarray(dice, np.float64)
  for i, r in enumerate(REGIONS):
    out[f"dice_{r}"].extend(dice[:, i])
  out["dice_mean"].extend(np.mean(dice[j]) for j in range(dice.shape[0]))
  out["ce"].extend(np.asarray(ce))
  out["ce_target"].extend(np.asarray(ce_target))


# ------------------------------------------------------------------------------------------------ tables


def per_case_rows(table: common.CellTable, cells: dict, victims: Sequence[str], config,
                  case_ids: Sequence[str]) -> list[dict]:
  """results/per_case.csv: one row per (model, attack, eps, case) from the cells.

  cells: {victim: {(threat, eps): cell}}. Rows go victim by victim, volume batch by volume batch: the clean
  rows of the batch, then every threat and eps of the config on it (the order the rows always had).
  """
  acfg = config.attack
  threats = tuple(acfg.attacks) + (NOISE,)
  eps = [float(e) for e in acfg.eps]
  rows = []
  for victim in victims:
    vc = cells[victim]
    values = {k: {m: dict(zip(case_ids, table.values(c, m, case_ids))) for m in PER_CASE_COLUMNS}
              for k, c in vc.items()}
    for sl in _batches(len(case_ids), int(acfg.batch)):
      ids = case_ids[sl]
      rows += [_row(victim, CLEAN, 0.0, cid, values[(CLEAN, 0.0)]) for cid in ids]
      for threat in threats:
        for e in eps:
          rows += [_row(victim, threat, e, cid, values[(threat, e)]) for cid in ids]
  return rows


def _row(model, attack, eps, case, values) -> dict:
  row = {"model": model, "attack": attack, "eps": float(eps), "case": str(case)}
  row.update({m: float(values[m][case]) for m in PER_CASE_COLUMNS})
  return row


def sanity_rows(table: common.CellTable, cells: dict, victim: str, config, case_ids: Sequence[str]) -> list[dict]:
  """results/sanity.csv rows of one victim from its cells (per threat and eps, means over the cases).

  zero_grad_fraction: exactly-zero CE input gradients on the clean volumes; loss_adv / loss_noise: the
  threat's loss (target CE for the targeted attack) on its volumes / on same-eps noise; beats_noise_fraction:
  cases where the attack did better than the noise; loss_increased_fraction / monotone_fraction: from the
  attack loop's loss history.
  """
  acfg = config.attack
  threats = tuple(acfg.attacks) + (NOISE,)
  vc = cells[victim]
  # float32, the precision the scorer and the attack loop produced them in (the means are taken in it too).
  f32 = lambda cell, m: table.values(cell, m, case_ids).astype(np.float32)
  zero_grad = float(np.mean(table.values(vc[(CLEAN, 0.0)], "zero_grad_fraction", case_ids)))
  out = []
  for threat in threats:
    targeted = threat == "ifgsm_targeted"
    loss = "ce_target" if targeted else "ce"  # each threat is compared with the noise on its own loss
    for e in (float(e) for e in acfg.eps):
      cell, noise = vc[(threat, e)], vc[(NOISE, e)]
      adv, base = f32(cell, loss), f32(noise, loss)
      beats = adv < base if targeted else adv > base
      row = {"model": victim, "attack": threat, "eps": e, "loss": "target CE" if targeted else "CE",
             "zero_grad_fraction": zero_grad, "loss_adv": float(np.mean(adv)), "loss_noise": float(np.mean(base)),
             "beats_noise_fraction": float(np.mean(beats)) if threat != NOISE else float("nan"),
             "dice_adv": float(np.mean(table.values(cell, "dice_mean", case_ids))),
             "dice_noise": float(np.mean(table.values(noise, "dice_mean", case_ids)))}
      if "loss_gain" in table.metrics(cell):
        gain = f32(cell, "loss_gain")
        row["loss_gain"] = float(np.mean(gain))
        row["loss_increased_fraction"] = float(np.mean(gain > 0))
        row["monotone_fraction"] = float(np.mean(f32(cell, "loss_monotone")))
      else:
        row.update(loss_gain=float("nan"), loss_increased_fraction=float("nan"), monotone_fraction=float("nan"))
      out.append(row)
  return out


# ------------------------------------------------------------------------------------------------ statistics


def wilcoxon_rows(per_case: list[dict], models: Sequence[str], attacks: Sequence[str], eps) -> list[dict]:
  """Paired (by case) Wilcoxon signed-rank tests, per region and on the mean Dice.

  "clean vs attack": a = clean Dice, b = attacked Dice of the same model (median_diff > 0: the attack hurts).
  "<defence> vs undefended": a = defence's Dice, b = undefended model's Dice under the same attack and eps
  (median_diff > 0: the defence helps); eps 0 = no attack. "distilled vs adversarial" likewise.
  """
  out = []
  for model in models:
    for attack in attacks:
      for e in eps:
        for col in DICE_COLUMNS:
          out.append(tables.paired_test(
              per_case, {"model": model, "attack": "clean"}, {"model": model, "attack": attack, "eps": e}, col,
              comparison="clean vs attack", model_a=model, model_b=model, attack=attack, eps=e,
              region=col[5:]))
  pairs = [(m, "undefended") for m in models if m != "undefended"]
  if "distilled" in models and "adversarial" in models:
    pairs.append(("distilled", "adversarial"))
  for a, b in pairs:
    for attack, e in [("clean", 0.0)] + [(x, e) for x in attacks for e in eps]:
      for col in DICE_COLUMNS:
        out.append(tables.paired_test(
            per_case, {"model": a, "attack": attack, "eps": e}, {"model": b, "attack": attack, "eps": e}, col,
            comparison=f"{a} vs {b}", model_a=a, model_b=b, attack=attack, eps=e, region=col[5:]))
  return out


def robust_fraction_rows(per_case: list[dict], models, attacks, eps, factor: float) -> list[dict]:
  """3D AutoAttack-style: a volume is broken when its mean Dice < factor x the model's clean mean Dice."""
  out = []
  for model in models:
    clean = tables.paired_values(per_case, {"model": model, "attack": "clean"}, "dice_mean")
    cases = list(clean)
    dice_clean = np.asarray([clean[c] for c in cases])
    for e in eps:
      by_attack = {a: tables.paired_values(per_case, {"model": model, "attack": a, "eps": e}, "dice_mean")
                   for a in attacks}
      fns = [(a, (lambda idx, d=by_attack[a]: np.asarray([d[cases[i]] for i in idx]))) for a in attacks]
      res = sanity.sequential_robustness(fns, dice_clean, factor=factor)
      out.append({"model": model, "eps": float(e), "attack": "clean", "threshold": res["threshold"],
                  "robust_alone": float(np.mean(dice_clean >= res["threshold"])),
                  "robust_sequential": float(np.mean(dice_clean >= res["threshold"]))})
      for a in attacks:
        alone = np.asarray([by_attack[a][c] for c in cases])
        out.append({"model": model, "eps": float(e), "attack": a, "threshold": res["threshold"],
                    "robust_alone": float(np.mean((alone >= res["threshold"]) & (dice_clean >= res["threshold"]))),
                    "robust_sequential": res["robust_after"][a]})
  return out
