"""Look-alikes of the v2 phantom: normal structures a segmenter must learn to reject (all labelled 0).

On T1-Ce: cortical vessels and the dural venous sinuses (blood with gadolinium; flow voids on spin-echo
sequences), the choroid plexus in the ventricular atria (no blood-brain barrier) and dura left by an imperfect
skull strip (rendered where the brain mask reaches outside the intracranial volume). On FLAIR: periventricular
caps and deep white-matter lesions (long T2, like oedema) and CSF-inflow artefacts (CSF that escaped the
inversion pulse). On CT: physiological calcification of the choroid plexus. Structures are placed in template
coordinates, so they follow the subject warp and the tumour's mass effect. `density` (data.phantom.lookalikes)
scales how many and how likely: 0 draws none, 1 is the default [ours].
"""
from __future__ import annotations

import numpy as np

from mri_poison.data.phantom_v1 import smooth_noise
from mri_poison.data.phantom_v2.anatomy import C

LOOKALIKES = ("vessel", "sinus", "choroid", "wm_lesion", "csf_inflow", "calcification")


def _tube(dist_mm: np.ndarray, radius: float, h: float) -> np.ndarray:
  """Volume fraction of a tube of `radius` around points at `dist_mm`; tubes thinner than a voxel spread
  their volume over the voxels they cross, keeping the fraction per unit length."""
  width = max(radius, 0.56 * h)
  amplitude = min(1.0, (radius / width) ** 2)
  return amplitude * np.clip((width - dist_mm) / h + 0.5, 0.0, 1.0)


def _ball(points_mm: np.ndarray, centre_mm, radius: float, h: float) -> np.ndarray:
  d = np.linalg.norm(points_mm - np.asarray(centre_mm, np.float32), axis=-1)
  return np.clip((radius - d) / h + 0.5, 0.0, 1.0)


def draw(rng: np.random.Generator, maps: np.ndarray, tcoords: np.ndarray, h: float, density: float) -> dict:
  """{name: fraction map (X, Y, Z)} for LOOKALIKES (before carving them out of the tissues they replace),
  plus "info": what was drawn (counts and flags, for tests and reports)."""
  shape = maps.shape[:3]
  density = float(density)
  prob = lambda p: rng.uniform() < min(1.0, p * density)
  icv_sd, vent = maps[..., C["icv_sd"]], maps[..., C["ventricle"]]
  x, y, z = tcoords[..., 0], tcoords[..., 1], tcoords[..., 2]
  inside = icv_sd > 0
  yc, zc = float(y[inside].mean()), float(z[inside].mean())
  out = {name: np.zeros(shape, np.float32) for name in LOOKALIKES}
  info = {}

  # Superior sagittal sinus: midline, just outside the brain surface, over the convexity down to the occiput;
  # transverse sinuses: from the torcula laterally along the occipital base.
  r = float(rng.uniform(3.0, 5.0))
  posterior = np.clip((yc - 40.0 - y) / 30.0, 0.0, 1.0)
  over = z > zc - 10.0 - 25.0 * posterior
  if prob(1.0):
    out["sinus"] += _tube(np.sqrt(x ** 2 + (icv_sd + r) ** 2), r, h) * over
    info["sss"] = True
  if prob(0.9):
    z_ts = zc - 30.0 + 0.15 * np.abs(x)
    out["sinus"] += _tube(np.sqrt((z - z_ts) ** 2 + (icv_sd + r) ** 2), r, h) * (y < yc - 35.0)
    info["transverse"] = True
  out["sinus"] = np.clip(out["sinus"], 0.0, 1.0)

  # Cortical vessels: the crossing curves of two smooth random fields' zero sets, kept near the surface.
  n_vessels = int(rng.poisson(3.0 * density))
  superficial = np.clip((12.0 - icv_sd) / 4.0, 0.0, 1.0) * (icv_sd > -1.0)
  cells = max(2, int(round(h * max(shape) / 25.0)))
  for _ in range(n_vessels):
    f = smooth_noise(rng, shape, 2, cells=cells)
    dist = np.sqrt(sum((fi / np.maximum(np.sqrt(sum(g ** 2 for g in np.gradient(fi, h))), 1e-3)) ** 2
                       for fi in f))
    out["vessel"] = np.maximum(out["vessel"], _tube(dist, float(rng.uniform(0.7, 1.8)), h) * superficial)
  info["vessels"] = n_vessels

  # Choroid plexus glomera in the atria (posterior, lateral ventricle), both sides.
  vent_pts = np.argwhere(vent > 0.5)
  pts_mm = tcoords
  if len(vent_pts) and prob(1.0):
    vy = y[tuple(vent_pts.T)]
    vx = x[tuple(vent_pts.T)]
    atrium = vent_pts[(vy < np.quantile(vy, 0.35)) & (np.abs(vx) > np.median(np.abs(vx)))]
    for side in (-1, 1):
      cand = atrium[np.sign(x[tuple(atrium.T)]) == side] if len(atrium) else atrium
      if not len(cand):
        continue
      centre = tcoords[tuple(cand[rng.integers(len(cand))])]
      radius = float(rng.uniform(4.0, 8.0))
      out["choroid"] = np.maximum(out["choroid"], _ball(pts_mm, centre, radius, h) * np.clip(vent * 1.5, 0, 1))
      if prob(0.5):
        out["calcification"] = np.maximum(out["calcification"],
                                          _ball(pts_mm, centre, float(rng.uniform(1.5, 3.0)), h))
    info["choroid"] = True
  out["calcification"] = np.minimum(out["calcification"], out["choroid"])

  # White-matter lesions: periventricular caps (thicker at the frontal and occipital horns) and deep lesions.
  wm = maps[..., C["wm"]]
  vent_sd = maps[..., C["ventricle_sd"]]
  thickness = float(rng.uniform(0.0, 7.0)) * min(density, 2.0)
  if len(vent_pts) and thickness > 0.5:
    vy = y[tuple(vent_pts.T)]
    span = max(float(np.ptp(vy)), 1.0)
    horn = np.clip((np.abs(y - float(np.median(vy))) - 0.2 * span) / (0.3 * span), 0.0, 1.0)
    rough = smooth_noise(rng, shape, 1, cells=cells * 2)[0]
    reach = thickness * (0.35 + 0.65 * horn) * (1.0 + 0.3 * rough)
    out["wm_lesion"] = np.clip((reach + vent_sd) / h + 0.5, 0.0, 1.0) * (vent_sd < 0)
  n_deep = int(rng.poisson(3.0 * density))
  deep = np.argwhere((wm > 0.7) & (icv_sd > 8.0))
  if len(deep) and n_deep:
    for c in deep[rng.integers(len(deep), size=n_deep)]:
      out["wm_lesion"] = np.maximum(out["wm_lesion"], _ball(pts_mm, tcoords[tuple(c)], float(rng.uniform(1.5, 4.5)),
                                                            h))
  out["wm_lesion"] = np.minimum(out["wm_lesion"], wm)
  info.update(pvh_mm=thickness, deep_lesions=n_deep)

  # CSF inflow on FLAIR: bright blobs in the ventricles.
  n_inflow = int(rng.integers(1, 4)) if len(vent_pts) and prob(0.6) else 0
  for c in (vent_pts[rng.integers(len(vent_pts), size=n_inflow)] if n_inflow else []):
    out["csf_inflow"] = np.maximum(out["csf_inflow"], _ball(pts_mm, tcoords[tuple(c)], float(rng.uniform(3.0, 7.0)),
                                                            h))
  out["csf_inflow"] = np.minimum(out["csf_inflow"], maps[..., C["csf"]])
  info["csf_inflow"] = n_inflow
  return {"fractions": out, "info": info}
