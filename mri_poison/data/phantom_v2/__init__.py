"""Phantom v2: a BraTS-like glioma case from real anatomy, MR physics, a grown tumour and look-alikes.

`make_case(seed, shape, modalities, options)` builds, deterministically from the seed:
1. anatomy: the template (MNI152 2009 from nilearn, or the procedural head) on the case grid, moved by a
   subject warp (rotation, head size, a smooth fold-free velocity field) [anatomy];
2. a glioma grown by reaction-diffusion on that anatomy, with oedema along white matter, necrosis, an irregular
   enhancing rim, cysts / haemorrhage / calcification in some cases and lower-grade cases without
   enhancement [growth];
3. look-alikes: vessels, sinuses, choroid plexus, white-matter lesions, CSF inflow [lookalikes];
4. the tumour's mass effect on all of it;
5. per sequence, tissue signals from signal equations with per-case protocol jitter and gadolinium, partial
   volume, thick slices, residual misregistration to T1-Ce, coil bias and Rician noise; CT in Hounsfield units
   [tissues, acquisition];
6. skull stripping as BraTS ships its data (an imperfect brain mask that keeps some dura and sinus), or the
   whole head with skull, scalp and air (`skull_strip=False`).
Labels follow the contract {0, 1, 2, 3}: each voxel takes the tumour compartment with the largest volume in it
when the tumour fills at least half of it.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import ml_collections
import numpy as np

from mri_poison.data.case import MODALITIES, Case
from mri_poison.data.phantom_v1 import smooth_noise
from mri_poison.data.phantom_v2 import acquisition, anatomy, case_cache, growth, lookalikes, tissues
from mri_poison.data.phantom_v2.tissues import TISSUES, T

ALL_MODALITIES = ("t1", "t1ce", "t2", "flair", "ct")
_CT_OFFSET = 1024.0  # stored CT = HU + 1024, so air is ~24 and the background 0 stays "outside the head"


def default_config() -> ml_collections.ConfigDict:
  """The knobs of the v2 phantom (data.phantom in every config); all defaults are ours."""
  return ml_collections.ConfigDict(dict(
      anatomy="mni152",  # "mni152" (nilearn's bundled template) | "procedural" (no nilearn needed)
      skull_strip=True,  # True: BraTS-style brain-extracted volumes; False: whole head (skull, scalp, air)
      tumour_contrast=1.0,  # scales every tumour tissue's deviation from white matter (0: invisible tumour)
      lookalikes=1.0,  # density of look-alike structures (0: none)
      relaxation_jitter=0.08,  # per-subject sd of log T1 / T2 per tissue (twice that in tumour tissues)
      lgg_fraction=0.25,  # cases without enhancement (lower grade); BraTS 2019 had ~23 % LGG
      multifocal_fraction=0.12,
      cyst_fraction=0.15,
      haemorrhage_fraction=0.15,
      calcification_fraction=0.1,
      mass_effect=1.0,  # scales the pushed volume (0: no mass effect)
      warp_mm=4.0,  # amplitude of the subject's nonlinear warp (velocity control points, sd in mm)
      thick_slices=True,  # 2D sequences acquired with thick slices, resampled to isotropic voxels
      misregistration_deg=0.7,  # residual rigid misregistration of T1, T2, FLAIR to T1-Ce (sd per axis)
      misregistration_mm=0.7,
      bias=0.15,  # coil bias strength (log-amplitude sd)
      snr_scale=1.0,  # multiplies each sequence's drawn SNR
  ))


def _options(options) -> ml_collections.ConfigDict:
  cfg = default_config()
  if options is None:
    return cfg
  items = options.to_dict() if isinstance(options, ml_collections.ConfigDict) else dict(options)
  unknown = sorted(set(items) - set(cfg))
  if unknown:
    raise ValueError(f"data.phantom: unknown fields {unknown}; known: {sorted(cfg)}")
  cfg.update(items)
  return cfg


def make_case(seed: int, shape: Sequence[int] = (64, 64, 64), modalities: Sequence[str] = MODALITIES,
              options: Mapping | None = None) -> Case:
  """One v2 phantom case (see the module doc); float32 image, zero outside the brain mask, >= 1 inside.

  Kept on disk after it is first built (`case_cache`), so the same head is built once per machine.
  """
  shape, modalities = tuple(int(s) for s in shape), tuple(modalities)
  if not case_cache.enabled() or len(shape) != 3 or int(np.prod(shape)) > case_cache.MAX_VOXELS:
    return make_case_and_maps(seed, shape, modalities, options)[0]
  path = case_cache.path_for(seed, shape, modalities, _options(options).to_dict())
  case = case_cache.load(path, seed, modalities)
  if case is None:
    case = make_case_and_maps(seed, shape, modalities, options)[0]
    case_cache.store(path, case)
  return case


def make_case_and_maps(seed: int, shape: Sequence[int] = (64, 64, 64), modalities: Sequence[str] = MODALITIES,
                       options: Mapping | None = None) -> tuple[Case, dict]:
  """`make_case` plus what it was made from: {"fractions": (X, Y, Z, len(TISSUES)) volume fractions,
  "mask": brain mask, "tumour": growth parameters, "lookalikes": what was drawn, "push_mm", "protocols"}."""
  shape = tuple(int(s) for s in shape)
  if len(shape) != 3 or min(shape) < 8:
    raise ValueError(f"phantom shape must be 3 sizes >= 8, got {shape}")
  modalities = tuple(modalities)
  unknown = [m for m in modalities if m not in ALL_MODALITIES]
  if unknown:
    raise ValueError(f"unknown phantom modalities {unknown}; known: {ALL_MODALITIES}")
  cfg = _options(options)
  streams = np.random.SeedSequence([int(seed), 2]).spawn(6)
  rng_anat, rng_tumour, rng_look, rng_render, rng_channels, rng_tissue = (np.random.default_rng(s) for s in streams)

  template, affine = anatomy.grid_maps(str(cfg.anatomy), shape)
  h = float(affine[0, 0])
  warp = anatomy.draw_subject_warp(rng_anat, shape, h, float(cfg.warp_mm))
  coords = anatomy.subject_coords(warp, shape, h)
  sd_fill = np.array([-100.0 if n.endswith("_sd") else 0.0 for n in anatomy.CHANNELS], np.float32)
  maps = anatomy.pull_back(template, coords, cval=sd_fill)
  tcoords = coords @ affine[:3, :3].T + affine[:3, 3]  # template mm of each subject voxel

  tumour = growth.grow(rng_tumour, maps, tcoords, h, cfg)
  look = lookalikes.draw(rng_look, maps, tcoords, h, float(cfg.lookalikes))
  # Mass effect moves everything drawn so far, tumour included (it grows by the pushed volume).
  stack = np.concatenate([maps, tcoords, tumour["fractions"], tumour["texture"], tumour["gd"][..., None],
                          np.stack([look["fractions"][n] for n in lookalikes.LOOKALIKES], -1)], -1)
  fill = np.concatenate([sd_fill, np.zeros(stack.shape[-1] - len(sd_fill), np.float32)])
  push_coords, push_mm = growth.mass_effect_coords(tumour, maps, h)
  stack = anatomy.pull_back(stack, push_coords, cval=fill) if push_mm > 0 else stack
  split = np.cumsum([len(anatomy.CHANNELS), 3, len(growth.TUMOUR_OUT), 2, 1])
  maps, tcoords, tum, texture, gd, look_fr = np.split(stack, split, axis=-1)

  fractions, mask = _compose(maps, tum, look_fr, tcoords, h, cfg, rng_render)
  label = _labels(tum) * mask
  params = tissues.jitter_relaxation(tissues.tissue_params(float(cfg.tumour_contrast)), rng_tissue,
                                     float(cfg.relaxation_jitter))
  texture_n = smooth_noise(rng_render, shape, 1, cells=max(2, int(h * max(shape) / 8.0)))[0]
  shared_bias = smooth_noise(rng_render, shape, 1, cells=3)[0]
  gd_case = float(rng_render.uniform(0.6, 1.4))
  keys = rng_channels.integers(2 ** 32, size=len(ALL_MODALITIES))
  channels, protocols = [], {}
  for m in modalities:
    mrng = np.random.default_rng(keys[ALL_MODALITIES.index(m)])
    if m == "ct":
      channels.append(_render_ct(fractions, params, maps, tcoords, mask, h, mrng))
      continue
    img, protocols[m] = _render_mr(m, fractions, params, texture, texture_n, gd[..., 0] * gd_case, h, cfg,
                                   shared_bias, mask, mrng)
    channels.append(img)
  image = np.stack(channels, -1).astype(np.float32)
  case = Case(image=image, modalities=modalities, label=label.astype(np.int32), affine=affine,
              spacing=(h, h, h), case_id=f"phantom-{seed}")
  return case, {"fractions": fractions, "mask": mask, "tumour": tumour["params"], "lookalikes": look["info"],
                "push_mm": push_mm, "protocols": protocols, "template_coords": tcoords}


# ---------------------------------------------------------------------------------------------- tissues


def _compose(maps, tum, look, tcoords, h, cfg, rng):
  """Volume fractions over TISSUES that sum to at most 1, and the brain mask."""
  shape = maps.shape[:3]
  f = np.zeros(shape + (len(TISSUES),), np.float32)
  gm, wm, csf = (np.clip(maps[..., anatomy.C[n]], 0.0, 1.0) for n in ("gm", "wm", "csf"))
  tumour = np.clip(tum, 0.0, 1.0)
  total = tumour.sum(-1)
  scale = np.where(total > 1.0, 1.0 / np.maximum(total, 1e-6), 1.0)
  tumour = tumour * scale[..., None]
  total = np.minimum(total, 1.0)
  # The tumour takes its room from the parenchyma first, then from CSF.
  paren = gm + wm
  from_paren = np.minimum(total, paren)
  keep = 1.0 - from_paren / np.maximum(paren, 1e-6)
  gm, wm = gm * keep, wm * keep
  csf = np.maximum(csf - (total - from_paren), 0.0)
  for i, name in enumerate(growth.TUMOUR_OUT):
    f[..., T[name]] = tumour[..., i]
  lk = {n: np.clip(look[..., i], 0.0, 1.0) for i, n in enumerate(lookalikes.LOOKALIKES)}

  def take(amount, *sources):
    nonlocal gm, wm, csf
    pools = {"gm": gm, "wm": wm, "csf": csf}
    got = np.zeros(shape, np.float32)
    for s in sources:
      part = np.minimum(amount - got, pools[s])
      pools[s] = pools[s] - part
      got = got + part
    gm, wm, csf = pools["gm"], pools["wm"], pools["csf"]
    return got

  f[..., T["wm_lesion"]] = take(lk["wm_lesion"], "wm")
  f[..., T["choroid"]] = take(lk["choroid"], "csf")
  f[..., T["calcification"]] += np.minimum(lk["calcification"], f[..., T["choroid"]])
  f[..., T["choroid"]] -= np.minimum(lk["calcification"], f[..., T["choroid"]])
  f[..., T["csf_inflow"]] = take(lk["csf_inflow"], "csf")
  f[..., T["vessel"]] = take(lk["vessel"], "csf", "gm")
  icv_sd = maps[..., anatomy.C["icv_sd"]]
  rest = np.clip(1.0 - (gm + wm + csf + f.sum(-1)), 0.0, 1.0)
  sinus = np.minimum(lk["sinus"], rest)
  f[..., T["sinus"]] = sinus + take(lk["sinus"] - sinus, "csf")
  f[..., T["gm"]], f[..., T["wm"]], f[..., T["csf"]] = gm, wm, csf
  rest = np.clip(1.0 - f.sum(-1), 0.0, 1.0)
  wt = total > 0.5
  if cfg.skull_strip:
    # An automatic brain extraction: the ICV surface moved by a smooth +-2 mm error, biased outwards (BraTS
    # masks keep some dura and sinus more often than they cut cortex); never cutting the tumour.
    err = 0.5 + 1.5 * smooth_noise(rng, shape, 1, cells=6)[0]
    kept_sinus = (f[..., T["sinus"]] > 0.5) & (smooth_noise(rng, shape, 1, cells=8)[0] > 0.8)
    mask = (icv_sd + err > 0) | wt | kept_sinus
    f[..., T["dura"]] = rest * mask
  else:
    depth = -icv_sd  # mm outside the ICV
    f[..., T["dura"]] = rest * (depth < 1.0)
    x, y, z = tcoords[..., 0], tcoords[..., 1], tcoords[..., 2]
    ys, zs = np.quantile(y[icv_sd > 0], 0.95), np.quantile(z[icv_sd > 0], 0.3)
    air = ((np.abs(x) / 15.0) ** 2 + ((y - ys) / 10.0) ** 2 + ((z - zs) / 12.0) ** 2 < 1.0) & (depth > 1.0)
    f[..., T["air"]] = rest * air
    f[..., T["bone"]] = rest * (depth >= 1.0) * (depth < 7.0) * ~air
    f[..., T["fat"]] = rest * (depth >= 7.0) * (depth < 11.0) * ~air
    mask = (depth < 11.0) | wt
  f = f * mask[..., None]
  return f, mask


def _labels(tum: np.ndarray) -> np.ndarray:
  """Contract labels from the tumour compartments' fractions (majority of the tumour, if at least half)."""
  by_label = np.zeros(tum.shape[:3] + (4,), np.float32)
  for i, name in enumerate(growth.TUMOUR_OUT):
    by_label[..., growth.LABEL_OF[name]] += tum[..., i]
  label = np.argmax(by_label[..., 1:], -1) + 1
  return np.where(by_label[..., 1:].sum(-1) >= 0.5, label, 0).astype(np.int32)


# ---------------------------------------------------------------------------------------------- rendering


def _render_mr(m, fractions, params, texture, texture_n, gd_scale, h, cfg, shared_bias, mask, rng):
  protocol = tissues.draw_protocol(rng, m)
  contrast = m == "t1ce"
  s = tissues.tissue_signal(params, protocol, contrast=contrast).astype(np.float32)
  img = np.tensordot(fractions, s, axes=([-1], [0]))
  # Texture: a few percent in normal tissue, ~10 % inside the tumour (a channel-specific mix of two fields).
  normal = fractions[..., T["gm"]] * s[T["gm"]] + fractions[..., T["wm"]] * s[T["wm"]]
  img += 0.02 * texture_n * normal
  mix = rng.normal(0.0, 1.0, 2)
  mix = mix / max(float(np.linalg.norm(mix)), 1e-6)
  tumour_idx = [T[n] for n in tissues.TUMOUR_TISSUES]
  tumour_signal = np.tensordot(fractions[..., tumour_idx], s[tumour_idx], axes=([-1], [0]))
  img += 0.10 * (texture @ mix) * tumour_signal
  if contrast:  # enhancement varies with the leaky-vessel field: re-render ET at its own Gd level per voxel
    levels = np.linspace(0.0, 2.5, 26)
    et_curve = np.array([tissues.tissue_signal(params, protocol, contrast=True, gd_scale=g)[T["enhancing"]]
                         for g in levels])
    et = fractions[..., T["enhancing"]]
    img += et * (np.interp(np.clip(gd_scale, 0, 2.5), levels, et_curve) - s[T["enhancing"]]).astype(np.float32)
  if cfg.thick_slices:
    img = acquisition.thick_slices(img, protocol.get("thick", 1.0), h, float(rng.uniform()))
  if m != "t1ce":
    img = acquisition.misregister(img, rng, h, float(cfg.misregistration_deg), float(cfg.misregistration_mm))
  img = img * acquisition.bias_field(rng, img.shape, float(cfg.bias), shared_bias)
  wm_signal = float(s[T["wm"]])
  gain = float(rng.uniform(300.0, 1200.0)) / max(wm_signal, 1e-9)  # arbitrary scanner units
  snr = float(rng.uniform(*tissues.PROTOCOLS[m]["snr"])) * float(cfg.snr_scale)
  img = acquisition.rician(img * gain, gain * wm_signal / snr, rng)
  return np.where(mask, np.maximum(img, 1.0), 0.0).astype(np.float32), protocol


def _render_ct(fractions, params, maps, tcoords, mask, h, rng):
  hu = np.tensordot(fractions, params.hu.astype(np.float32), axes=([-1], [0]))
  empty = 1.0 - fractions.sum(-1)  # unfilled room inside the mask reads as CSF-like fluid
  hu = hu + empty * params.hu[T["csf"]]
  hu = acquisition.ct_noise_and_shading(hu, maps[..., anatomy.C["icv_sd"]], tcoords[..., 2], h, rng)
  return np.where(mask, np.maximum(hu + _CT_OFFSET, 1.0), 0.0).astype(np.float32)
