"""Study 2: attacking and scoring whole validation volumes as evaluation cells; the tables derived from them.

A cell (`cellstore.Cell`) is one victim model under one threat at one eps on the validation split: clean (eps 0),
an attack of the zoo (`mri_poison.attacks.zoo`, named in attack.attacks), or the same-eps random sign noise
`NOISE`. Its rows hold, per case, the Dice of each
region and their mean, CE to the labels, CE to the target map, the perceptibility of the perturbation (PSNR,
SSIM against the clean volume) and, for the iterative attacks, the plain-CE trajectory `ce_step<t>` (CE of the
deployed model to the true labels at every iterate, whatever loss the attack optimises); targeted attacks add
their success measures (`metrics.targeted_success`); the clean cell adds the fraction of zero input gradients
and of saturated softmax voxels. `evaluate_victim` computes only the cells missing from the table, with one
compiled sweep per (victim, attack, volume batch) over the missing eps.

The adaptive threat `ADAPTIVE` is not a cell: per case and eps it is the worst (lowest mean Dice) of the
victim's attacks (`adaptive_rows`), so it is never better for the model than any single attack. Which attacks
a victim gets (`victim_threats`, each zoo entry's `applies`): e.g. `pgd_temp` (PGD on logits / T) only for a
model trained at T != 1 (at T = 1 it is `pgd`), `transfer` (the undefended model's own PGD examples) only for
the other models.
"""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mri_poison import cellstore
from mri_poison import losses as seg_losses
from mri_poison import metrics
from mri_poison.attacks import losses as attack_losses
from mri_poison.attacks import sanity
from mri_poison.attacks import sliding_window
from mri_poison.attacks import zoo
from mri_poison.data.case import REGIONS
from mri_poison.report import tables
from mri_poison.studies import common
from mri_poison.train import state as state_lib
from mri_poison.train import workdir as workdir_lib


NOISE = "random_sign"  # same-eps random sign noise: the baseline every attack must beat
CLEAN = "clean"
ADAPTIVE = "adaptive"  # per case and eps, the worst of the victim's attacks (derived, not a cell)
SOURCE = "undefended"  # the model whose examples the `replays` threats (transfer) replay on the others
ATTACKS = tuple(n for n in zoo.names() if n != NOISE)  # every attack of the zoo (`mri_poison.attacks.zoo`)
THREATS = ATTACKS + (NOISE,)
TARGETS = ("erase_tumour", "et_to_oedema", "least_likely")
EPS_MODES = ("absolute", "per_channel_range")
DICE_COLUMNS = tuple(f"dice_{r}" for r in REGIONS) + ("dice_mean",)
PER_CASE_COLUMNS = DICE_COLUMNS + ("ce", "ce_target")
SUCCESS_COLUMNS = ("reached", "dice_target", "tumour_left")
# Bump when a change of this module changes any cell's numbers: every cell is then recomputed.
EVAL_VERSION = 2
ADAPTIVE_TEXT = "adaptive: per case, the lowest mean Dice over all the attacks above run on this model"


def attack_text(name: str) -> str:
  """One line describing a threat (the zoo's own, or the derived adaptive threat's)."""
  return ADAPTIVE_TEXT if name == ADAPTIVE else zoo.get(name).text


def is_targeted(name: str) -> bool:
  return name not in (CLEAN, ADAPTIVE) and zoo.get(name).targeted


# ------------------------------------------------------------------------------------------------ models


def model_apply_fn(model_cfg):
  """The apply_fn of config.model, the same object for equal configs (make_apply_fn is cached by value).

  Attack losses and the scorer hold apply_fn as a static part of their compiled programs: one object per
  architecture means every victim of that architecture reuses them.
  """
  return state_lib.make_apply_fn(state_lib.make_model(model_cfg))


def deployed_apply_fn(config, model_cfg=None):
  """The model as deployed: whole-volume `model_apply_fn`, or with eval.sliding_window its differentiable
  Gaussian-blended sliding-window inference (window eval.window, default data.patch_shape), which attacks and
  scoring then both go through; `model_cfg` replaces config.model (another architecture deployed the same way).
  Equal configs give equal (hashable) objects: one compilation per setting."""
  apply_fn = model_apply_fn(config.model if model_cfg is None else model_cfg)
  ecfg = config.eval
  if not bool(ecfg.get("sliding_window", False)):
    return apply_fn
  window = tuple(int(w) for w in (ecfg.get("window", ()) or config.data.patch_shape))
  return sliding_window.windowed_apply(apply_fn, window=window, overlap=float(ecfg.get("overlap", 0.5)),
                                       batch=int(ecfg.get("window_batch", 1)))


def victim_threats(victim: str, temperature: float, attacks: Sequence[str]) -> tuple[str, ...]:
  """The configured attacks that are distinct attacks on `victim` (each zoo entry's `applies`), then the noise."""
  return tuple(a for a in attacks if zoo.get(a).applies(victim, float(temperature), SOURCE)) + (NOISE,)


# ------------------------------------------------------------------------------------------------ attacks


def make_target(kind: str, apply_fn, params, x, labels):
  if kind == "erase_tumour":
    return attack_losses.target_erase_tumour(labels)
  if kind == "et_to_oedema":
    return attack_losses.target_et_to_oedema(labels)
  if kind == "least_likely":
    return attack_losses.target_least_likely(apply_fn, params, x)
  raise ValueError(f"config attack.target={kind!r}: expected one of {TARGETS}")


def eps_scale(x, brain, mode: str):
  """(B, 1.., C) multiplier of eps: ones ("absolute", z-score units) or each case's per-channel intensity
  range over its brain voxels ("per_channel_range": eps is then a fraction of that range)."""
  x = np.asarray(x, np.float32)
  shape = (x.shape[0],) + (1,) * (x.ndim - 2) + (x.shape[-1],)
  if mode == "absolute":
    return np.ones(shape, np.float32)
  if mode != "per_channel_range":
    raise ValueError(f"config attack.eps_mode={mode!r}: expected one of {EPS_MODES}")
  out = np.ones(shape, np.float32)
  brain = np.asarray(brain, bool)
  for b in range(x.shape[0]):
    v = x[b][brain[b]]  # (n_brain, C)
    if v.size:
      out[b] = np.maximum(v.max(0) - v.min(0), 1e-6).reshape(out[b].shape)
  return out


def attack_volumes(name: str, apply_fn, params, x, labels, brain, eps, attack_cfg, key, target=None, *,
                   temperature: float = 1.0):
  """x_adv (E, B, *S, C) for every eps of `eps` in one compiled call, and the plain-CE history or None.

  eps: (E,) in z-score units, or (E, B, 1.., C) per case and channel (`eps_scale`). Untargeted attacks increase
  their loss to `labels` over brain voxels; targeted ones decrease theirs to `target`. The history ("loss":
  (E, [restarts,] N, B)) is the deployed model's CE to `labels` at each iterate (`zoo.CETracked`). Random
  attacks draw from `key` alone, the same for every eps: an eps's result does not depend on which other eps are
  computed with it. `temperature`: the victim's training temperature (`pgd_temp` divides the logits by it).
  """
  threat = zoo.get(name)
  if threat.run is None:
    raise ValueError(f"attack {name!r} replays {threat.replays!r} from the source model: run that one instead")
  return threat.run(zoo.Inputs(apply_fn, params, x, labels, brain, jnp.asarray(eps, jnp.float32), attack_cfg, key,
                               target, float(temperature)))


def attack_cost(name: str, attack_cfg) -> int:
  """Gradient evaluations per eps and volume (for the progress line)."""
  return zoo.get(name).gradient_evaluations(attack_cfg)


@functools.lru_cache(maxsize=8)
def make_scorer(apply_fn):
  """Jitted scoring functions of one deployed apply_fn (cached: the models share one compilation each).

  score(params, xs (E, B, *S, C), labels, brain, target) -> dice (E, B, 3), ce (E, B), ce_target (E, B);
  predict(params, xs (E, B, ...)) -> labels (E, B, *S); saturation(params, x, brain) -> (B,) fraction of brain
  voxels whose float32 max softmax probability is exactly 1 (cross-entropy gradients vanish there).
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
  def predict(params, xs):
    return jax.lax.map(lambda x: jnp.argmax(apply_fn(params, x), axis=-1), xs)

  @jax.jit
  def saturation(params, x, brain):
    p_max = jnp.max(jax.nn.softmax(jnp.asarray(apply_fn(params, x), jnp.float32), axis=-1), axis=-1)
    return seg_losses.masked_mean((p_max == 1.0).astype(jnp.float32), brain)

  return score, predict, saturation


# ------------------------------------------------------------------------------------------------ cells


def threat_settings(threat: str, attack_cfg, key, *, temperature: float = 1.0, sources: dict | None = None) -> dict:
  """The config values (and random stream) that change `threat`'s cells; the rest of attack.* does not.

  Every cell scores CE to the target map, so the target kind is in all of them, and the eps mode; then the
  zoo entry's own settings. Random threats draw one key per volume batch (`key` folded with the batch's first
  index and the threat's stream), so their cells also depend on the victim's key and the batch size. A threat
  that replays another attack from a source model (`sources[entry.source]`: "own", the undefended model, or
  "external", attack.transfer_model) depends on that model (its digest, architecture included, and key) and on
  that attack's stream instead. `eps_chunk` only bounds memory.
  """
  entry = zoo.get(threat)
  s = {"target": str(attack_cfg.target), "eps_mode": str(attack_cfg.get("eps_mode", "absolute"))}
  s.update(entry.settings(attack_cfg, float(temperature)))
  if entry.random:
    s["restarts"] = int(attack_cfg.restarts)
    s.update(key=np.asarray(jax.random.key_data(key)).tolist(), stream=entry.stream, batch=int(attack_cfg.batch))
  if entry.replays is not None:
    source = sources[entry.source]
    s.update(source=source["digest"], key=np.asarray(jax.random.key_data(source["key"])).tolist(),
             stream=zoo.get(entry.replays).stream)
  return s


def victim_digest(model_cfg, params) -> str:
  """A trained model's identity in its cells' keys: its architecture config and its params' bytes."""
  model = workdir_lib.config_dict(model_cfg)
  if model.get("name") == "unet":  # the default victim, as configs without the key meant it: the same cells
    del model["name"]
  return cellstore.digest({"model": model, "params": cellstore.tree_digest(params)})


def _deployment(config) -> dict:
  """The inference path in every cell's key (whole volume, or the sliding window's settings)."""
  ecfg = config.eval
  if not bool(ecfg.get("sliding_window", False)):
    return {}
  window = [int(w) for w in (ecfg.get("window", ()) or config.data.patch_shape)]
  return {"window": window, "overlap": float(ecfg.get("overlap", 0.5))}


def victim_cells(victim: str, params_digest: str, key, data: dict, config, *, temperature: float = 1.0,
                 sources: dict | None = None) -> dict[tuple[str, float], cellstore.Cell]:
  """{(threat, eps): cell} of one victim: ("clean", 0.0) and every (threat, eps) of its threats and the grid."""
  acfg = config.attack
  cases = list(data["case_id"])
  split = {"data": data["digest"]} if "digest" in data else {}
  deploy = _deployment(config)
  make = lambda threat, e, settings: cellstore.make_cell(victim, threat, e, params=params_digest,
                                                      settings=dict(settings, **deploy), cases=cases,
                                                      version=EVAL_VERSION, **split)
  cells = {(CLEAN, 0.0): make(CLEAN, 0.0, {"target": str(acfg.target)})}
  for threat in victim_threats(victim, temperature, acfg.attacks):
    settings = threat_settings(threat, acfg, key, temperature=temperature, sources=sources)
    for e in acfg.eps:
      cells[(threat, float(e))] = make(threat, float(e), settings)
  return cells


def evaluation_cost(cells, config) -> int:
  """Gradient evaluations (x volumes) the given cells take: the progress line's total."""
  return sum(attack_cost(c.threat, config.attack) for c in cells if c.threat != CLEAN)


def _perceptibility(x, x_adv) -> tuple[list[float], list[float]]:
  """Per case PSNR and SSIM (mean over channels) of x_adv against x; data range: the clean case's range."""
  x, x_adv = np.asarray(x, np.float64), np.asarray(x_adv, np.float64)
  psnr, ssim = [], []
  for b in range(x.shape[0]):
    r = float(x[b].max() - x[b].min()) or 1.0
    psnr.append(metrics.psnr(x[b], x_adv[b], data_range=r))
    ssim.append(float(np.mean([metrics.ssim(x[b, ..., c], x_adv[b, ..., c], data_range=r)
                               for c in range(x.shape[-1])])))
  return psnr, ssim


def evaluate_victim(table: cellstore.CellTable, victim: str, params, data: dict, config, key, *,
                    temperature: float = 1.0, sources: dict | None = None, params_digest: str | None = None,
                    progress: common.Progress | None = None) -> list[cellstore.Cell]:
  """Computes the cells of `victim` missing from `table` (saving it after each threat); returns them.

  data: {"image" (N, *S, C), "label" (N, *S), "brain" (N, *S), "case_id": [N], optional "digest"}; key: the
  victim's random stream; temperature: its training temperature (for `pgd_temp`); sources: {"own" | "external":
  {"params", "key", "digest", "apply_fn"}}, the models whose examples the replaying threats (transfer) replay;
  params_digest: `victim_digest(config.model, params)` when
  already known. Volumes go in batches of attack.batch; per threat and batch ONE compiled sweep runs over the
  threat's missing eps. In a multi-process job the batches are shared out over the processes
  (`cellstore.map_case_batches`); the keys are per batch, so the cells equal a 1-process run's.
  """
  acfg = config.attack
  apply_fn = deployed_apply_fn(config)
  score, predict, saturation = make_scorer(apply_fn)
  params_digest = params_digest or victim_digest(config.model, params)
  cells = victim_cells(victim, params_digest, key, data, config, temperature=temperature, sources=sources)
  todo = table.missing(cells.values())
  if not todo:
    return []
  todo_keys = {c.key for c in todo}
  cases = list(data["case_id"])
  size = int(acfg.batch)
  # With P processes each computes every P-th batch (cellstore.map_case_batches): its progress line counts its
  # own batches, scaled to the whole job's work.
  n_batches = len(cellstore.case_batches(len(cases), size))
  share = n_batches / max(len(cellstore.own_batches(n_batches)), 1)
  mode = str(acfg.get("eps_mode", "absolute"))

  def batch_arrays(sl):
    x, y = jnp.asarray(data["image"][sl]), jnp.asarray(data["label"][sl])
    brain = jnp.asarray(data["brain"][sl])
    return x, y, brain, make_target(str(acfg.target), apply_fn, params, x, y)

  def clean_batch(sl):
    out = {m: [] for m in PER_CASE_COLUMNS + ("zero_grad_fraction", "saturated_fraction", "tumour_left")}
    x, y, brain, target = batch_arrays(sl)
    d, ce, cet = (np.asarray(v)[0] for v in score(params, x[None], y, brain, target))
    _append_scores(out, d, ce, cet)
    ce_loss = attack_losses.cross_entropy(apply_fn, params, y, brain)
    out["zero_grad_fraction"].extend(np.asarray(sanity.gradient_sanity(ce_loss, x, mask=brain)["zero_grad_fraction"]))
    out["saturated_fraction"].extend(np.asarray(saturation(params, x, brain)))
    pred = np.asarray(predict(params, x[None]))[0]
    out["tumour_left"].extend(metrics.targeted_success(pred[i], np.asarray(target[i]), np.asarray(y[i]),
                                                       np.asarray(brain[i]))["tumour_left"]
                              for i in range(pred.shape[0]))
    return out

  clean = cells[(CLEAN, 0.0)]
  if clean.key in todo_keys:
    table.add(clean, cases, cellstore.map_case_batches(len(cases), size, clean_batch))
    table.save()

  def threat_batch(threat, eps, sl):
    """{eps index: {metric: per-case values}} of one volume batch under `threat` at every eps of `eps`."""
    out = {str(i): {m: [] for m in PER_CASE_COLUMNS} for i in range(len(eps))}
    x, y, brain, target = batch_arrays(sl)
    scale = eps_scale(data["image"][sl], data["brain"][sl], mode)
    eps_arr = np.asarray(eps, np.float32).reshape((-1,) + (1,) * scale.ndim) * scale[None]
    if mode == "absolute":
      eps_arr = np.asarray(eps, np.float32)  # (E,): the compiled sweeps of the plain grid
    replays = zoo.get(threat).replays
    if replays is not None:
      # The source model's own examples: its key, the replayed attack's stream, the same batches (threat_settings).
      source = sources[zoo.get(threat).source]
      src_key = jax.random.fold_in(jax.random.fold_in(source["key"], sl.start), zoo.get(replays).stream)
      x_adv, _ = attack_volumes(replays, source["apply_fn"], source["params"], x, y, brain, eps_arr, acfg, src_key,
                                target)
      hist = None
    else:
      # One key per volume batch, the same for every eps (see threat_settings).
      threat_key = jax.random.fold_in(jax.random.fold_in(key, sl.start), zoo.get(threat).stream)
      x_adv, hist = attack_volumes(threat, apply_fn, params, x, y, brain, eps_arr, acfg, threat_key, target,
                                   temperature=temperature)
    d, ce, cet = (np.asarray(v) for v in score(params, x_adv, y, brain, target))
    x_adv_host = np.asarray(x_adv)
    if is_targeted(threat):
      preds = np.asarray(predict(params, x_adv))
    if hist is not None:
      loss_hist = np.asarray(hist["loss"])  # (E, [restarts,] N, B): N is the attack's own number of steps
      traj = loss_hist.reshape(len(eps), -1, loss_hist.shape[-2], x.shape[0]).mean(axis=1)  # (E, N, B)
    for i in range(len(eps)):
      o = out[str(i)]
      _append_scores(o, d[i], ce[i], cet[i])
      o["psnr"], o["ssim"] = _perceptibility(data["image"][sl], x_adv_host[i])
      if hist is not None:
        for t in range(traj.shape[1]):
          o[f"ce_step{t}"] = traj[i, t].tolist()
      if is_targeted(threat):
        for j in range(preds.shape[1]):
          s = metrics.targeted_success(preds[i, j], np.asarray(target[j]), np.asarray(y[j]), np.asarray(brain[j]))
          for m in SUCCESS_COLUMNS:
            o.setdefault(m, []).append(s[m])
    if progress is not None:
      progress.advance(attack_cost(threat, acfg) * len(eps) * (sl.stop - sl.start) * share,
                       label=f"{victim}/{threat} eps {eps} volumes {sl.stop}/{len(cases)}")
    return out

  for threat in victim_threats(victim, temperature, acfg.attacks):
    eps = [float(e) for e in acfg.eps if cells[(threat, float(e))].key in todo_keys]
    if not eps:
      continue
    out = cellstore.map_case_batches(len(cases), size, functools.partial(threat_batch, threat, eps))
    for i, e in enumerate(eps):
      table.add(cells[(threat, e)], cases, out[str(i)])
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


def per_case_rows(table: cellstore.CellTable, cells: dict, victims: Sequence[str], config,
                  case_ids: Sequence[str], temperatures: dict | None = None,
                  regions: Sequence[str] = REGIONS) -> list[dict]:
  """results/per_case.csv: one row per (model, attack, eps, case) from the cells, then the adaptive rows.

  cells: {victim: {(threat, eps): cell}}. Rows go victim by victim, volume batch by volume batch: the clean
  rows of the batch, then every threat and eps of the victim on it; then the victim's `adaptive_rows`.
  dice_mean is the mean over `regions` (the learnt ones: `mri_poison.studies.learnt`), so the adaptive attack,
  drops and tests see only those; dice_mean_all keeps the mean over all three.
  """
  acfg = config.attack
  eps = [float(e) for e in acfg.eps]
  temperatures = temperatures or {}
  rows = []
  for victim in victims:
    vc = cells[victim]
    threats = victim_threats(victim, temperatures.get(victim, 1.0), acfg.attacks)
    values = {k: {m: dict(zip(case_ids, table.values(c, m, case_ids))) for m in PER_CASE_COLUMNS}
              for k, c in vc.items()}
    own = []
    for sl in cellstore.case_batches(len(case_ids), int(acfg.batch)):
      ids = case_ids[sl]
      own += [_row(victim, CLEAN, 0.0, cid, values[(CLEAN, 0.0)], regions) for cid in ids]
      for threat in threats:
        for e in eps:
          own += [_row(victim, threat, e, cid, values[(threat, e)], regions) for cid in ids]
    rows += own + adaptive_rows(own, [t for t in threats if t != NOISE], eps)
  return rows


def _row(model, attack, eps, case, values, regions) -> dict:
  row = {"model": model, "attack": attack, "eps": float(eps), "case": str(case)}
  row.update({m: float(values[m][case]) for m in PER_CASE_COLUMNS})
  row["dice_mean_all"] = row["dice_mean"]
  if tuple(regions) != REGIONS:  # recomputed only then, so the all-region mean keeps the cell's bits
    row["dice_mean"] = float(np.mean([row[f"dice_{r}"] for r in regions])) if regions else float("nan")
  return row


def adaptive_rows(rows: Sequence[dict], attacks: Sequence[str], eps: Sequence[float]) -> list[dict]:
  """Per (model, eps, case), the row of the attack with the lowest mean Dice among `attacks`, as attack
  ADAPTIVE (its `worst_attack` names the one chosen; ties go to the first in `attacks`)."""
  by_key = {(r["model"], r["attack"], float(r["eps"]), r["case"]): r for r in rows}
  out = []
  for model in dict.fromkeys(r["model"] for r in rows):
    cases = list(dict.fromkeys(r["case"] for r in rows if r["model"] == model))
    for e in eps:
      for case in cases:
        candidates = [by_key[(model, a, float(e), case)] for a in attacks if (model, a, float(e), case) in by_key]
        if not candidates:
          continue
        worst = min(candidates, key=lambda r: r["dice_mean"])  # min keeps the first of equal values
        out.append(dict(worst, attack=ADAPTIVE, worst_attack=worst["attack"]))
  return out


def adaptive_member_rows(per_case: Sequence[dict], attacks_of: dict, reference_eps: float) -> list[dict]:
  """results/adaptive_members.csv: what each attack adds to the adaptive threat at the reference eps.

  Per model and attack (in `attacks_of[model]` order): worst_fraction, the share of cases where it is the
  adaptive threat's worst; dice_alone, its mean Dice; and, paired by case, the adaptive mean Dice without it
  minus with it (mean_diff >= 0, bootstrap CI, Wilcoxon p; exploratory): > 0 where it found lower Dice than
  every other attack. This is how a new attack (e.g. APGD with SEA's losses) shows whether it beats the others.
  """
  ref = float(reference_eps)
  out = []
  for model, attacks in attacks_of.items():
    dice = {a: tables.paired_values(per_case, {"model": model, "attack": a, "eps": ref}, "dice_mean")
            for a in attacks}
    worst = {r["case"]: r["worst_attack"] for r in per_case
             if r["model"] == model and r["attack"] == ADAPTIVE and float(r["eps"]) == ref}
    cases = [c for c in worst if all(c in dice[a] for a in attacks)]
    if len(attacks) < 2 or not cases:
      continue
    adaptive = [min(dice[a][c] for a in attacks) for c in cases]
    for a in attacks:
      without = [min(dice[b][c] for b in attacks if b != a) for c in cases]
      row = tables.wilcoxon_row(without, adaptive, model=model, attack=a, eps=ref)
      row.update(worst_fraction=float(np.mean([worst[c] == a for c in cases])),
                 dice_alone=float(np.mean([dice[a][c] for c in cases])))
      out.append(row)
  return out


def sanity_rows(table: cellstore.CellTable, cells: dict, victim: str, config, case_ids: Sequence[str],
                temperature: float = 1.0) -> list[dict]:
  """results/sanity.csv rows of one victim from its cells (per threat and eps, means over the cases).

  zero_grad_fraction / saturated_fraction: exactly-zero CE input gradients / brain voxels whose float32 max
  softmax probability is 1, on the clean volumes; loss_adv / loss_noise: CE (target CE for targeted attacks)
  on the attack's volumes / on same-eps noise; beats_noise_fraction: cases where the attack did better than
  the noise; ce_gain: CE to the labels on the attacked minus on the clean volume (plain CE, whatever loss the
  attack optimised; it must rise for an untargeted attack), ce_increased_fraction: cases where it rose;
  ce_monotone_fraction: for iterative attacks, the share of steps along which plain CE did not fall.
  """
  acfg = config.attack
  vc = cells[victim]
  # float32, the precision the scorer and the attack loop produced them in (the means are taken in it too).
  f32 = lambda cell, m: table.values(cell, m, case_ids).astype(np.float32)
  clean = vc[(CLEAN, 0.0)]
  zero_grad = float(np.mean(table.values(clean, "zero_grad_fraction", case_ids)))
  saturated = float(np.mean(table.values(clean, "saturated_fraction", case_ids)))
  ce_clean = f32(clean, "ce")
  out = []
  for threat in victim_threats(victim, temperature, acfg.attacks):
    targeted = is_targeted(threat)
    loss = "ce_target" if targeted else "ce"  # each threat is compared with the noise on its own loss
    for e in (float(e) for e in acfg.eps):
      cell, noise = vc[(threat, e)], vc[(NOISE, e)]
      adv, base = f32(cell, loss), f32(noise, loss)
      beats = adv < base if targeted else adv > base
      gain = f32(cell, "ce") - ce_clean
      row = {"model": victim, "attack": threat, "eps": e, "loss": "target CE" if targeted else "CE",
             "zero_grad_fraction": zero_grad, "saturated_fraction": saturated,
             "loss_adv": float(np.mean(adv)), "loss_noise": float(np.mean(base)),
             "beats_noise_fraction": float(np.mean(beats)) if threat != NOISE else float("nan"),
             "dice_adv": float(np.mean(table.values(cell, "dice_mean", case_ids))),
             "dice_noise": float(np.mean(table.values(noise, "dice_mean", case_ids))),
             "ce_clean": float(np.mean(ce_clean)), "ce_gain": float(np.mean(gain)),
             "ce_increased_fraction": float(np.mean(gain > 0)), "ce_monotone_fraction": float("nan")}
      steps = [m for m in table.metrics(cell) if m.startswith("ce_step")]
      if steps:
        traj = np.stack([f32(cell, f"ce_step{t}") for t in range(len(steps))] + [f32(cell, "ce")])  # (N+1, n)
        row["ce_monotone_fraction"] = float(np.mean(np.diff(traj, axis=0) >= -1e-6))
      out.append(row)
  return out


def ce_trajectories(table: cellstore.CellTable, cells: dict, victims: Sequence[str], config, case_ids, eps: float,
                    temperatures: dict | None = None) -> dict:
  """{victim: {threat: (x, mean CE)}} at `eps`: x = 0 the clean volume, 1..N the iterates x_0..x_{N-1} the
  loop computed the gradient at (x_0 = x for i-FGSM, the random start for PGD), N + 1 the returned volume;
  one-step and transfer attacks have the clean and the final point only."""
  temperatures = temperatures or {}
  out = {}
  for victim in victims:
    vc = cells[victim]
    clean = float(np.mean(table.values(vc[(CLEAN, 0.0)], "ce", case_ids)))
    out[victim] = {}
    for threat in victim_threats(victim, temperatures.get(victim, 1.0), config.attack.attacks):
      if threat == NOISE:
        continue
      cell = vc[(threat, float(eps))]
      steps = sorted((m for m in table.metrics(cell) if m.startswith("ce_step")), key=lambda m: int(m[7:]))
      ys = [clean] + [float(np.mean(table.values(cell, m, case_ids))) for m in steps]
      ys.append(float(np.mean(table.values(cell, "ce", case_ids))))
      xs = list(range(len(ys))) if steps else [0, int(config.attack.steps) + 1]
      out[victim][threat] = (xs, ys)
  return out


def cell_means(table: cellstore.CellTable, cells: dict, victims: Sequence[str], metric_names: Sequence[str],
               case_ids, threats: Sequence[str] | None = None) -> list[dict]:
  """Mean over cases of each metric present, per (victim, threat, eps) cell (e.g. PSNR/SSIM, targeted success)."""
  out = []
  for victim in victims:
    for (threat, e), cell in cells[victim].items():
      if threat == CLEAN or (threats is not None and threat not in threats):
        continue
      have = [m for m in metric_names if m in table.metrics(cell)]
      if not have:
        continue
      row = {"model": victim, "attack": threat, "eps": float(e)}
      for m in have:
        v = table.values(cell, m, case_ids)
        row[m] = float(np.nanmean(v)) if np.any(np.isfinite(v)) else float("nan")
      out.append(row)
  return out


# ------------------------------------------------------------------------------------------------ budgets


def halving_budget(eps: Sequence[float], dice: np.ndarray, clean: np.ndarray) -> float:
  """The eps at which the per-case-mean Dice curve first falls to half the clean mean Dice.

  eps: (E,) increasing positive grid; dice: (E, n) per case; clean: (n,). The curve starts at (0, clean
  mean); between two positive grid points it is interpolated linearly in log eps (a geometric grid's natural
  scale), between 0 and the first grid point linearly in eps. inf when the curve never gets that low.
  """
  eps = np.asarray(eps, np.float64)
  m = np.asarray(dice, np.float64).mean(axis=-1)
  c = float(np.mean(clean))
  half = 0.5 * c
  xs, ys = np.concatenate([[0.0], eps]), np.concatenate([[c], m])
  for i in range(1, len(xs)):
    if ys[i] <= half:
      y0, y1 = ys[i - 1], ys[i]
      f = 1.0 if y0 == y1 else float(np.clip((y0 - half) / (y0 - y1), 0.0, 1.0))
      if xs[i - 1] <= 0:
        return float(f * xs[i])
      return float(np.exp(np.log(xs[i - 1]) + f * (np.log(xs[i]) - np.log(xs[i - 1]))))
  return float("inf")


def halving_budget_ci(eps, dice, clean, *, n_boot: int = 1000, seed: int = 0, alpha: float = 0.05) -> dict:
  """halving_budget with a percentile bootstrap CI over cases (cases resampled with replacement; a resample
  whose curve never halves counts as inf, so a CI bound can be inf)."""
  dice, clean = np.asarray(dice, np.float64), np.asarray(clean, np.float64)
  n = clean.shape[0]
  rng = np.random.default_rng(seed)
  boot = np.asarray([halving_budget(eps, dice[:, idx], clean[idx])
                     for idx in rng.integers(0, n, size=(int(n_boot), n))])
  low, high = np.quantile(boot, [alpha / 2, 1 - alpha / 2], method="inverted_cdf")
  return {"eps_half": halving_budget(eps, dice, clean), "ci_low": float(low), "ci_high": float(high),
          "never_halved_fraction": float(np.mean(np.isinf(boot)))}


def halving_rows(per_case: Sequence[dict], models: Sequence[str], eps: Sequence[float], *, n_boot: int = 1000,
                 seed: int = 0) -> list[dict]:
  """results/halving_budget.csv: per model and attack (adaptive first), the eps at which mean Dice halves."""
  eps = sorted(float(e) for e in eps)
  out = []
  for model in models:
    clean = tables.paired_values(per_case, {"model": model, "attack": CLEAN}, "dice_mean")
    cases = list(clean)
    attacks = [ADAPTIVE] + [a for a in dict.fromkeys(r["attack"] for r in per_case if r["model"] == model)
                            if a not in (CLEAN, ADAPTIVE)]
    for attack in attacks:
      curve = [tables.paired_values(per_case, {"model": model, "attack": attack, "eps": e}, "dice_mean")
               for e in eps]
      if any(not c for c in curve):
        continue
      dice = np.asarray([[c[k] for k in cases] for c in curve])
      res = halving_budget_ci(eps, dice, np.asarray([clean[k] for k in cases]), n_boot=n_boot, seed=seed)
      out.append({"model": model, "attack": attack, "clean": float(np.mean(list(clean.values()))), **res})
  return out


# ------------------------------------------------------------------------------------------------ statistics


def is_claimed(row: dict) -> bool:
  """A primary comparison supports a claim when its Holm p < 0.05 AND the bootstrap CI of the mean difference
  excludes 0: on skewed per-case differences the two can disagree, and then no effect is claimed."""
  return bool(row["p_holm"] < 0.05 and (row["ci_low"] > 0 or row["ci_high"] < 0))


def comparison_rows(per_case: list[dict], models: Sequence[str], eps, reference_eps: float) -> list[dict]:
  """Paired (by case) comparisons of Dice: a few PRIMARY ones, Holm-corrected as one family, the rest
  exploratory (uncorrected, p_holm = nan).

  "claimed" (`is_claimed`, primary rows only): the report claims an effect only from such rows.
  Primary (pre-declared, mean Dice, eps = reference_eps): each defence vs the undefended model under the
  adaptive attack; each single attack vs clean on the undefended model. Exploratory: every other
  (comparison, attack, eps, region): "clean vs attack" per model, "<defence> vs undefended" and "distilled vs
  adversarial" under the same attack and eps (eps 0: clean inputs). a - b > 0: the attack hurts / the
  defence helps.
  """
  ref = float(reference_eps)
  attacks_of = {m: [a for a in dict.fromkeys(r["attack"] for r in per_case if r["model"] == m) if a != CLEAN]
                for m in models}
  primary = []
  defences = [m for m in models if m != SOURCE]
  for d in defences:
    primary.append(tables.paired_test(
        per_case, {"model": d, "attack": ADAPTIVE, "eps": ref}, {"model": SOURCE, "attack": ADAPTIVE, "eps": ref},
        "dice_mean", comparison=f"{d} vs undefended", model_a=d, model_b=SOURCE, attack=ADAPTIVE, eps=ref,
        region="mean", family="primary"))
  for a in attacks_of.get(SOURCE, []):
    if a in (NOISE, ADAPTIVE):
      continue
    primary.append(tables.paired_test(
        per_case, {"model": SOURCE, "attack": CLEAN}, {"model": SOURCE, "attack": a, "eps": ref}, "dice_mean",
        comparison="clean vs attack", model_a=SOURCE, model_b=SOURCE, attack=a, eps=ref, region="mean",
        family="primary"))
  tables.add_holm(primary)
  for r in primary:
    r["claimed"] = is_claimed(r)
  done = {(r["comparison"], r["model_a"], r["attack"], r["eps"], r["region"]) for r in primary}

  out = list(primary)

  def add(comparison, a, b, attack, e, col, sel_a, sel_b):
    if (comparison, a, attack, float(e), col[5:]) in done:
      return
    row = tables.paired_test(per_case, sel_a, sel_b, col, comparison=comparison, model_a=a, model_b=b,
                             attack=attack, eps=float(e), region=col[5:], family="exploratory")
    row.update(p_holm=float("nan"), claimed=False)  # exploratory: reported, never claimed
    out.append(row)

  for model in models:
    for attack in attacks_of[model]:
      for e in eps:
        for col in DICE_COLUMNS:
          add("clean vs attack", model, model, attack, e, col, {"model": model, "attack": CLEAN},
              {"model": model, "attack": attack, "eps": e})
  pairs = [(m, SOURCE) for m in defences]
  if "distilled" in models and "adversarial" in models:
    pairs.append(("distilled", "adversarial"))
  for a, b in pairs:
    shared = [x for x in attacks_of[a] if x in attacks_of[b]]
    for attack, e in [(CLEAN, 0.0)] + [(x, e) for x in shared for e in eps]:
      for col in DICE_COLUMNS:
        sel = {"attack": attack} if attack == CLEAN else {"attack": attack, "eps": e}
        add(f"{a} vs {b}", a, b, attack, e, col, dict(sel, model=a), dict(sel, model=b))
  return out


def robust_fraction_rows(per_case: list[dict], models, attacks_of: dict, eps, factor: float) -> list[dict]:
  """3D AutoAttack-style: a volume is broken when its mean Dice < factor x the model's clean mean Dice.
  attacks_of: {model: its attacks, in the order they run}."""
  out = []
  for model in models:
    attacks = list(attacks_of[model])
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


def masking_rows(per_case: list[dict], sanity: Sequence[dict], models: Sequence[str], eps: Sequence[float],
                 reference_eps: float, collapse_dice: float = 0.1) -> list[dict]:
  """Signs of gradient masking per model (means over cases): saturated-softmax fraction; at the reference eps
  the best deployed-logit CE attack (T = 1, the zoo's `deployed_ce` attacks) vs adaptive (gap > 0: T = 1
  attacks overstate robustness), transfer vs direct PGD (transfer lower: the direct gradient is masked); adaptive Dice at the
  largest eps (collapse: below `collapse_dice`, from a clean mean Dice at least twice that, so a model that never
  segmented cannot "collapse"); the share of untargeted attacks whose plain CE rose."""
  ref, top = float(reference_eps), max(float(e) for e in eps)
  mean = lambda m, a, e: (lambda v: float(np.mean(list(v.values()))) if v else float("nan"))(
      tables.paired_values(per_case, {"model": m, "attack": a, "eps": e}, "dice_mean"))
  out = []
  for m in models:
    srow = [s for s in sanity if s["model"] == m and float(s["eps"]) == ref]
    deployed = [mean(m, s["attack"], ref) for s in srow if s["attack"] != NOISE and zoo.get(s["attack"]).deployed_ce]
    t1 = min(deployed) if deployed else float("nan")
    adaptive = mean(m, ADAPTIVE, ref)
    untargeted = [s for s in srow if s["attack"] != NOISE and not zoo.get(s["attack"]).targeted
                  and zoo.get(s["attack"]).replays is None]
    adaptive_top, clean = mean(m, ADAPTIVE, top), mean(m, CLEAN, 0.0)
    out.append({
        "model": m, "saturated_fraction": srow[0]["saturated_fraction"] if srow else float("nan"),
        "zero_grad_fraction": srow[0]["zero_grad_fraction"] if srow else float("nan"),
        "dice_t1_best": t1, "dice_adaptive": adaptive, "t1_adaptive_gap": t1 - adaptive,
        "dice_pgd": mean(m, "pgd", ref), "dice_transfer": mean(m, "transfer", ref),
        "dice_adaptive_max_eps": adaptive_top, "max_eps": top, "dice_clean": clean,
        "collapses": bool(adaptive_top < collapse_dice <= clean / 2),
        "ce_rose_fraction": float(np.mean([s["ce_increased_fraction"] for s in untargeted])) if untargeted
                            else float("nan")})
  return out
