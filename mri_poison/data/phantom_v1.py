"""Phantom v1: a procedural BraTS-like head (the embedded data of every result before phantom v2).

`make_case(seed)` draws a head (scalp, skull, CSF, grey and white matter, ventricles) and a glioma-like tumour
(necrotic core 1, oedema 2, enhancing rim 3) whose size, shape and position vary with the seed, then renders
T1 / T1-Ce / T2 / FLAIR (and optionally CT) with the contrasts each compartment has in real scans, a smooth
bias field and Rician noise. Everything is vectorised numpy: smooth random fields are a few coarse Gaussian
samples interpolated with separable Gaussian-kernel matrices (three small matmuls), so a 64^3 case takes well
under 0.5 s on one core.

Kept unchanged so that earlier results reproduce (`data.phantom_version="v1"`); `mri_poison.data.phantom` is the
versioned front and writes either version as a BraTS folder.
"""
from __future__ import annotations

import functools
from typing import Sequence

import numpy as np
from scipy import ndimage

from mri_poison.data.case import MODALITIES, Case

# Tissue classes of the internal class map (the rendered label map keeps only the tumour classes).
BG, SCALP, SKULL, CSF, GM, WM, OEDEMA, ENHANCING, NECROSIS = range(9)
_N_CLASSES = 9
TISSUES = ("background", "scalp", "skull", "csf", "gm", "wm", "oedema", "enhancing", "necrosis")
_TUMOUR_LABEL = np.array([0, 0, 0, 0, 0, 0, 2, 3, 1], np.int32)  # class -> contract label

# Mean intensity per class (rows: BG, SCALP, SKULL, CSF, GM, WM, OEDEMA, ET, NECROSIS) in scanner-like units.
# MR values follow the usual appearance: fat-rich scalp bright on T1; cortical bone dark on all MR; CSF dark on
# T1 and FLAIR (fluid suppressed) but the brightest tissue on T2; WM > GM on T1, GM > WM on T2/FLAIR; oedema
# bright on T2/FLAIR; enhancing tumour bright only after contrast (T1-Ce); necrosis dark on T1-Ce, fluid-like on
# T2. CT is HU + 1000: bone very bright, soft tissues within a few tens of HU of each other (tumour ~invisible).
_INTENSITY = {
    "t1":    [0.0, 700.0,  60.0, 150.0, 450.0, 620.0, 370.0,  440.0, 260.0],
    "t1ce":  [0.0, 720.0,  60.0, 170.0, 470.0, 630.0, 390.0, 1000.0, 220.0],
    "t2":    [0.0, 380.0,  50.0, 1000.0, 560.0, 400.0, 860.0, 650.0, 920.0],
    "flair": [0.0, 420.0,  50.0, 120.0, 560.0, 440.0, 920.0,  700.0, 450.0],
    "ct":    [0.0, 900.0, 2000.0, 1005.0, 1040.0, 1028.0, 1022.0, 1042.0, 1015.0],
}
MR_MODALITIES = ("t1", "t1ce", "t2", "flair")
ALL_MODALITIES = MR_MODALITIES + ("ct",)



def make_case(seed: int, shape: Sequence[int] = (64, 64, 64), modalities: Sequence[str] = MODALITIES,
              anatomy: str = "procedural", spacing: float | Sequence[float] | None = None) -> Case:
  """One phantom case, a deterministic function of `seed`.

  Args:
    seed: integer seed of a `numpy.random.Generator`; everything (anatomy, tumour, contrasts, noise) follows.
    shape: voxel grid (X, Y, Z); axes are left->right, posterior->anterior, inferior->superior (RAS affine).
    modalities: any of "t1", "t1ce", "t2", "flair", "ct", in the channel order wanted.
    anatomy: "procedural" (ellipsoidal head with folded cortex) or "mni152" (nilearn's bundled MNI152
      template and grey/white-matter maps resampled to `shape`; needs nilearn, a dependency of mri_poison).
    spacing: voxel size in mm (one number or three). Default: 200 mm / shape per axis, i.e. a real-sized head
      filling the grid. The anatomy always fills the grid; `spacing` only changes the affine.

  Returns:
    `Case` with float32 image (X, Y, Z, C) in 0..~1200 (CT to ~2100), exactly 0 outside the head, > 0 inside,
    and int32 label in {0, 1, 2, 3} with every tumour label present.
  """
  case, _ = make_case_and_tissue(seed, shape, modalities, anatomy, spacing)
  return case


def make_case_and_tissue(seed: int, shape: Sequence[int] = (64, 64, 64), modalities: Sequence[str] = MODALITIES,
                         anatomy: str = "procedural", spacing: float | Sequence[float] | None = None):
  """`make_case` plus the uint8 tissue-class map it was rendered from (classes in `TISSUES`)."""
  shape = tuple(int(s) for s in shape)
  if len(shape) != 3 or min(shape) < 8:
    raise ValueError(f"phantom shape must be 3 sizes >= 8, got {shape}")
  modalities = tuple(modalities)
  unknown = [m for m in modalities if m not in _INTENSITY]
  if unknown:
    raise ValueError(f"unknown phantom modalities {unknown}; known: {ALL_MODALITIES}")
  rng = np.random.default_rng(seed)

  if anatomy == "procedural":
    classes, affine = _procedural_head(rng, shape)
  elif anatomy == "mni152":
    classes, affine = _mni152_head(rng, shape)
  else:
    raise ValueError(f"anatomy must be 'procedural' or 'mni152', got {anatomy!r}")
  _add_tumour(rng, classes)
  if spacing is not None:
    affine = _ras_affine(shape, np.broadcast_to(np.asarray(spacing, np.float64), (3,)).copy())
  image = _render(rng, classes, modalities)
  case = Case(image=image, modalities=modalities, label=_TUMOUR_LABEL[classes], affine=affine,
              spacing=tuple(float(s) for s in np.sqrt((affine[:3, :3] ** 2).sum(0))), case_id=f"phantom-{seed}")
  return case, classes


# ---------------------------------------------------------------------------------------------------------------
# Smooth random fields.


def _interp_matrix(n: int, cells: int) -> np.ndarray:
  """(n, cells) rows of normalised Gaussian weights: maps coarse samples to a smooth field on n points."""
  x = (np.arange(n) + 0.5) / n
  centres = (np.arange(cells) + 0.5) / cells
  w = np.exp(-0.5 * ((x[:, None] - centres[None, :]) * cells) ** 2)
  return (w / w.sum(1, keepdims=True)).astype(np.float32)


def smooth_noise(rng: np.random.Generator, shape: Sequence[int], n_fields: int = 1,
                 cells: int | Sequence[int] = 6) -> np.ndarray:
  """`n_fields` smooth random fields of roughly unit std on `shape` (first axis = field), features ~ 1/cells."""
  cells = np.broadcast_to(np.asarray(cells), (3,))
  coarse = rng.standard_normal((n_fields, *cells), dtype=np.float32)
  mx, my, mz = (_interp_matrix(n, int(c)) for n, c in zip(shape, cells))
  f = np.einsum("nabc,ia->nibc", coarse, mx)
  f = np.einsum("nibc,jb->nijc", f, my)
  f = np.einsum("nijc,kc->nijk", f, mz)
  # Interpolation shrinks the variance; rescale each field back to ~unit std.
  std = f.reshape(n_fields, -1).std(1).reshape(n_fields, 1, 1, 1)
  return f / np.maximum(std, 1e-6)


def _grid(shape: Sequence[int]) -> list[np.ndarray]:
  """Broadcastable normalised coordinates in [-1, 1] per axis (voxel centres)."""
  out = []
  for ax, n in enumerate(shape):
    c = ((np.arange(n, dtype=np.float32) + 0.5) / n) * 2 - 1
    out.append(c.reshape([n if i == ax else 1 for i in range(3)]))
  return out


def _ras_affine(shape: Sequence[int], spacing: np.ndarray) -> np.ndarray:
  """Diagonal RAS affine with the grid centre at world (0, 0, 0)."""
  affine = np.eye(4)
  affine[:3, :3] = np.diag(spacing)
  affine[:3, 3] = -spacing * (np.asarray(shape) - 1) / 2.0
  return affine


# ---------------------------------------------------------------------------------------------------------------
# Anatomy.


def _procedural_head(rng: np.random.Generator, shape: tuple[int, int, int]):
  """Class map of an ellipsoidal head: scalp, skull, subarachnoid CSF, folded cortex, WM, ventricles, nuclei."""
  x, y, z = _grid(shape)
  # Head semi-axes in normalised grid units (the head fills ~90% of the grid), jittered per seed.
  semi = np.array([0.80, 0.92, 0.86]) * rng.uniform(0.95, 1.02, 3)
  centre = np.array([0.0, 0.0, -0.02]) + rng.uniform(-0.02, 0.02, 3)
  # Coarse fields: head outline, cortical folding (finer), ventricle wobble.
  shape_f = smooth_noise(rng, shape, 1, cells=4)[0]
  fold_cells = max(min(shape) // 5, 4)
  fold = smooth_noise(rng, shape, 1, cells=fold_cells)[0]

  xs, ys, zs = (x - centre[0]) / semi[0], (y - centre[1]) / semi[1], (z - centre[2]) / semi[2]
  r = np.sqrt(xs ** 2 + ys ** 2 + zs ** 2) * (1.0 + 0.025 * shape_f)  # 1 at the skin

  classes = np.full(shape, BG, np.uint8)
  scalp_in, skull_in, csf_in = 0.93, 0.86, 0.82  # radii where scalp, skull and subarachnoid CSF end inside
  classes[r < 1.0] = SCALP
  classes[r < scalp_in] = SKULL
  classes[r < skull_in] = CSF
  brain_r = r / csf_in  # 1 at the brain surface
  brain = brain_r < 1.0
  # Folding: sulci are thin CSF sheets along the zero set of a smooth field, cutting in from the surface;
  # the grey-matter ribbon thickens around them and thins over gyral crowns, where white matter reaches out.
  near_sulcus = np.clip(1.0 - np.abs(fold) / 0.6, 0.0, 1.0)
  cortex_depth = 0.10 + 0.12 * near_sulcus
  classes[brain] = GM
  classes[brain & (brain_r < 1.0 - cortex_depth)] = WM
  # |grad fold| is ~ fold_cells / n per voxel, so this band is about one voxel wide at any grid size.
  sulcus_band = 0.6 * fold_cells / min(shape)
  classes[brain & (np.abs(fold) < sulcus_band) & (brain_r > 1.0 - 0.85 * cortex_depth)] = CSF
  # Interhemispheric fissure: a thin midline CSF sheet through the upper cortex.
  half_voxel = 1.0 / shape[0]
  classes[brain & (np.abs(x - centre[0]) < half_voxel) & (brain_r > 0.55) & (zs > -0.1)] = CSF
  # Deep grey nuclei (thalami / basal ganglia) either side of the midline.
  for side in (-1, 1):
    d = (((x - centre[0] - side * 0.17 * semi[0]) / (0.13 * semi[0])) ** 2 +
         ((y - centre[1] + 0.02) / (0.17 * semi[1])) ** 2 + ((z - centre[2] + 0.05) / (0.13 * semi[2])) ** 2)
    classes[d < 1.0] = GM
  # Lateral ventricles: two curved ellipsoids (bending down at the back), plus the third ventricle.
  vent_scale = rng.uniform(0.8, 1.3)
  for side in (-1, 1):
    yy = (y - centre[1] - 0.02) / (0.36 * semi[1])
    bend = 0.12 * yy ** 2
    d = (((x - centre[0] - side * 0.09 * semi[0]) / (0.06 * vent_scale * semi[0] + half_voxel)) ** 2 + yy ** 2 +
         ((z - centre[2] - 0.12 + bend) / (0.11 * vent_scale * semi[2])) ** 2)
    classes[d < 1.0] = CSF
  d = (((x - centre[0]) / (half_voxel * 1.5)) ** 2 + ((y - centre[1]) / (0.16 * semi[1])) ** 2 +
       ((z - centre[2] + 0.02) / (0.08 * semi[2])) ** 2)
  classes[d < 1.0] = CSF
  return classes, _ras_affine(shape, 200.0 / np.asarray(shape, np.float64))


def _mni152_head(rng: np.random.Generator, shape: tuple[int, int, int]):
  """Class map from nilearn's bundled MNI152 template and GM/WM maps, with a procedural skull and scalp."""
  t1, gm, wm, affine = _mni152_maps(shape)
  spacing = np.sqrt((affine[:3, :3] ** 2).sum(0))
  intracranial = ndimage.binary_fill_holes(ndimage.binary_closing(t1 > 0.05 * t1.max(), iterations=2))
  classes = np.full(shape, BG, np.uint8)
  # Skull and scalp as shells of per-case thickness around the intracranial volume (the template is
  # skull-stripped).
  dist_out = ndimage.distance_transform_edt(~intracranial, sampling=spacing)  # mm
  jitter = rng.uniform(0.85, 1.15)
  classes[dist_out < 12.0 * jitter] = SCALP
  classes[dist_out < 7.0 * jitter] = SKULL
  classes[intracranial] = CSF
  classes[intracranial & (gm > 0.35) & (gm >= wm)] = GM
  classes[intracranial & (wm > 0.35) & (wm > gm)] = WM
  return classes, affine


@functools.lru_cache(maxsize=4)
def _mni152_maps(shape: tuple[int, int, int]):
  """MNI152 T1, GM and WM maps cropped to the head (+ room for skull and scalp), resampled to `shape`."""
  try:
    from nilearn import datasets  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("anatomy='mni152' needs nilearn (its MNI152 templates ship inside the wheel, no download): "
                      "pip install nilearn") from e
  template = datasets.load_mni152_template()
  t1 = np.asarray(template.get_fdata(), np.float32)
  gm = np.asarray(datasets.load_mni152_gm_template().get_fdata(), np.float32)
  wm = np.asarray(datasets.load_mni152_wm_template().get_fdata(), np.float32)
  src_affine = np.asarray(template.affine, np.float64)
  src_spacing = np.sqrt((src_affine[:3, :3] ** 2).sum(0))
  # Crop to the brain's bounding box plus 16 mm for CSF, skull and scalp, so the head fills the grid.
  nz = np.argwhere(t1 > 0.05 * t1.max())
  margin = np.ceil(16.0 / src_spacing).astype(int)
  lo = np.maximum(nz.min(0) - margin, 0)
  hi = np.minimum(nz.max(0) + 1 + margin, np.array(t1.shape))
  crop = tuple(slice(a, b) for a, b in zip(lo, hi))
  factors = np.asarray(shape, np.float64) / (hi - lo)
  def resample(a):
    return np.clip(ndimage.zoom(a[crop], factors, order=1, grid_mode=True, mode="nearest"), 0, None)
  t1, gm, wm = resample(t1), resample(gm), resample(wm)
  gm, wm = gm / max(float(gm.max()), 1e-6), wm / max(float(wm.max()), 1e-6)
  # With grid_mode zoom, output voxel j sits at source index lo + (j + 0.5) / f - 0.5.
  affine = src_affine.copy()
  affine[:3, :3] = src_affine[:3, :3] / factors[None, :]
  affine[:3, 3] = src_affine[:3, :3] @ (lo - 0.5 + 0.5 / factors) + src_affine[:3, 3]
  for a in (t1, gm, wm):
    a.setflags(write=False)
  return t1, gm, wm, affine


# ---------------------------------------------------------------------------------------------------------------
# Tumour.


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
  q, r = np.linalg.qr(rng.standard_normal((3, 3)))
  return q * np.sign(np.diag(r))


def _add_tumour(rng: np.random.Generator, classes: np.ndarray) -> None:
  """Paints oedema, enhancing rim and necrotic core into `classes` (in place), always inside the brain.

  One deformed-ellipsoid "distance" t (0 at the centre, 1 at the outer enhancing boundary) defines all three
  compartments as nested level sets, so the necrotic core is enclosed by the enhancing rim and the tumour core by
  at least a thin shell of oedema. Sizes have voxel minimums so every label exists (and stays nested) on 32^3.
  """
  shape = np.array(classes.shape)
  brain = (classes == GM) | (classes == WM) | (classes == CSF)
  parenchyma = (classes == GM) | (classes == WM)
  # Depth inside the brain (ventricles count as inside; the subarachnoid CSF shell does not).
  depth = ndimage.distance_transform_edt(ndimage.binary_fill_holes(parenchyma))
  brain_radius = float(depth.max())
  small = brain_radius < 14  # coarse grids: tamer shapes so the voxel minimums still fit
  wobble = rng.uniform(0.08, 0.22) * (0.5 if small else 1.0)  # amplitude of the shape deformation
  aniso = np.exp(rng.uniform(-0.25, 0.25, 3) * (0.5 if small else 1.0))
  core_frac = rng.uniform(0.45, 0.75)  # necrosis radius / enhancing radius
  oedema_ext = rng.uniform(0.3, 1.0)  # oedema reach in white matter beyond the enhancing boundary, units of t
  squash = (1.0 + 1.5 * wobble) / aniso.min()  # worst-case shrink of t-distances into voxels
  # Enhancing rim >= 1.5 voxels and necrotic core >= 1 voxel in radius, wherever the deformation puts them.
  min_radius = squash * max(1.5 / (1.0 - core_frac), 1.0 / core_frac)
  radius = max(rng.uniform(0.25, 0.45) * brain_radius, min_radius)
  shell = 1.5  # guaranteed oedema thickness (voxels) around the tumour core

  def core_reach(radius):
    return radius * aniso.max() * (1.0 + 1.5 * wobble) + shell + 1.0

  # Shrink until the core plus its oedema shell fits inside the brain; tiny grids end at the deepest voxel.
  candidates = np.argwhere(depth >= core_reach(radius))
  while not len(candidates) and radius > min_radius:
    radius = max(radius * 0.85, min_radius)
    candidates = np.argwhere(depth >= core_reach(radius))
  if not len(candidates):
    candidates = np.argwhere(depth >= depth.max())
  centre = candidates[rng.integers(len(candidates))]

  # Work in the lesion's bounding box only.
  reach = radius * aniso.max() * (1.0 + 1.5 * wobble) * (1.0 + 1.5 * oedema_ext) + shell
  half = int(np.ceil(reach)) + 1
  lo = np.maximum(centre - half, 0)
  hi = np.minimum(centre + half + 1, shape)
  box = tuple(slice(a, b) for a, b in zip(lo, hi))
  coords = [np.arange(a, b, dtype=np.float32) - c for a, b, c in zip(lo, hi, centre)]
  d = np.stack(np.meshgrid(*coords, indexing="ij"), -1)  # voxel offsets from the centre
  d = d @ _random_rotation(rng).astype(np.float32)
  base = np.sqrt((((d / (radius * aniso)) ** 2).sum(-1)))
  box_shape = tuple(hi - lo)
  deform, spread = smooth_noise(rng, box_shape, 2, cells=np.clip(np.array(box_shape) // 4, 2, 6))
  t = base / (1.0 + wobble * np.clip(deform, -1.5, 1.5))  # irregular blob, star-shaped around the centre

  sub = classes[box]  # a view: writes land in `classes`
  shell_t = shell * squash / radius
  # Oedema spreads along white matter further than into cortex; CSF only gets the thin shell (periventricular).
  spread = 1.0 + 0.5 * np.clip(spread, -1, 1)
  reach_t = np.where(sub == WM, 1.0 + oedema_ext * spread, 1.0 + 0.4 * oedema_ext * spread)
  reach_t = np.where(sub == CSF, 0.0, np.maximum(reach_t, 1.0 + shell_t))
  reach_t = np.maximum(reach_t, np.where(brain[box], 1.0 + shell_t, 0.0))
  sub[(t < reach_t) & brain[box]] = OEDEMA
  sub[(t < 1.0) & brain[box]] = ENHANCING
  sub[(t < core_frac) & brain[box]] = NECROSIS


# ---------------------------------------------------------------------------------------------------------------
# Rendering.


def _render(rng: np.random.Generator, classes: np.ndarray, modalities: tuple[str, ...]) -> np.ndarray:
  """Intensities per class with per-case jitter, texture, partial volume, bias field and noise.

  Case-level draws come from `rng` in a fixed order, and each channel's own draws from a generator keyed by the
  modality name, so a channel is the same whichever other modalities are asked for.
  """
  shape = classes.shape
  head = classes != BG
  texture = smooth_noise(rng, shape, 1, cells=max(min(shape) // 4, 4))[0]
  bias_shared = smooth_noise(rng, shape, 1, cells=3)[0]
  bias_strength = rng.uniform(0.08, 0.16)
  sigma = rng.uniform(8.0, 20.0)  # Rician noise level of this "scanner"
  channel_keys = rng.integers(2**32, size=len(ALL_MODALITIES))
  channels = []
  for m in modalities:
    mrng = np.random.default_rng(channel_keys[ALL_MODALITIES.index(m)])
    table = np.asarray(_INTENSITY[m], np.float32)
    if m == "ct":  # a few HU of jitter: CT numbers are calibrated, so soft tissues stay within tens of HU
      table = table + np.where(table > 0, mrng.uniform(-4.0, 4.0, _N_CLASSES), 0.0).astype(np.float32)
    else:  # per-case contrast jitter (+-6%) keeps every ordering the tests rely on (margins are >= 15%)
      table = table * mrng.uniform(0.94, 1.06, _N_CLASSES).astype(np.float32)
    img = table[classes] * (1.0 + 0.03 * texture)  # a few percent of tissue texture
    img = ndimage.gaussian_filter(img, sigma=0.6, truncate=2.5)  # partial volume at tissue boundaries
    if m == "ct":
      img = img + 6.0 * mrng.standard_normal(shape, dtype=np.float32)
    else:
      # Smooth multiplicative bias field (coil sensitivity): shared across sequences plus a little of its own.
      own = smooth_noise(mrng, shape, 1, cells=3)[0]
      img = img * np.exp(bias_strength * (bias_shared + mrng.uniform(0.0, 0.4) * own))
      # Rician noise: magnitude of a complex signal with Gaussian noise in both channels.
      n1 = mrng.standard_normal(shape, dtype=np.float32)
      n2 = mrng.standard_normal(shape, dtype=np.float32)
      img = np.sqrt((img + sigma * n1) ** 2 + (sigma * n2) ** 2)
    # Background exactly 0; strictly positive inside the head (so "nonzero" masks find the whole head).
    channels.append(np.where(head, np.maximum(img, 1.0), 0.0).astype(np.float32))
  return np.stack(channels, -1)
