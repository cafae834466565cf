"""Anatomy of the v2 phantom: template maps on the case grid and a smooth, fold-free warp per subject.

Template maps (channels `CHANNELS`, float32):
  gm, wm, csf    volume fractions inside the intracranial volume (ICV); they sum to the ICV fraction,
  ventricle      the part of csf inside the ventricles,
  icv_sd         signed distance to the ICV surface in mm (> 0 inside),
  ventricle_sd   signed distance to the ventricles in mm (> 0 inside).
"mni152": nilearn's bundled MNI152 2009 template and GM / WM probability maps (no download; CSF is the rest of
the ICV). "procedural": the v1 phantom's folded ellipsoidal head rendered at 2x and averaged, for users without
nilearn. A base copy at 1 or 2 mm is prepared once (the MNI one cached on disk, see `cache_dir`); maps on a
case grid are that base averaged over each voxel (Gaussian pre-filter of FWHM one voxel, then linear reads),
which is the partial volume a scanner voxel of that size records.

The case grid spans the ICV's bounding box plus `MARGIN_MM` with isotropic voxels; its affine maps voxels to
template millimetres (RAS), so `x`, `y`, `z` of a warped voxel are its template coordinates.
"""
from __future__ import annotations

import functools
import hashlib
import os

import jax
import jax.numpy as jnp
import numpy as np
from scipy import ndimage

from mri_poison import io_utils
from mri_poison.ops import warp as warp_ops

CHANNELS = ("gm", "wm", "csf", "ventricle", "icv_sd", "ventricle_sd")
C = {name: i for i, name in enumerate(CHANNELS)}
ANATOMIES = ("mni152", "procedural")
MARGIN_MM = 10.0
_FORMAT = 1  # bump when the base maps' recipe changes (invalidates the disk cache)


def cache_dir() -> str:
  """Where prepared template bases are kept: $MRI_POISON_CACHE, else ~/.cache/mri_poison."""
  return os.environ.get("MRI_POISON_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "mri_poison")


# ------------------------------------------------------------------------------------------------ bases


def _block_mean(a: np.ndarray, f: int) -> np.ndarray:
  pad = [(0, (-n) % f) for n in a.shape]
  a = np.pad(a, pad, mode="edge")
  s = a.shape
  return a.reshape(s[0] // f, f, s[1] // f, f, s[2] // f, f).mean(axis=(1, 3, 5))


def _signed_distance(mask: np.ndarray, spacing: float) -> np.ndarray:
  inside = ndimage.distance_transform_edt(mask) - 0.5
  outside = ndimage.distance_transform_edt(~mask) - 0.5
  return (np.where(mask, inside, -outside) * spacing).astype(np.float32)


def _finish_base(gm, wm, icv_frac, spacing) -> np.ndarray:
  """Stack CHANNELS from GM / WM / ICV fractions on a base grid of `spacing` mm."""
  scale = np.minimum(1.0, icv_frac / np.maximum(gm + wm, 1e-6))  # GM + WM never exceed the ICV
  gm, wm = gm * scale, wm * scale
  csf = np.clip(icv_frac - gm - wm, 0.0, 1.0)
  icv = icv_frac >= 0.5
  icv_sd = _signed_distance(icv, spacing)
  # Ventricles: CSF deep inside the brain in components of at least 1 ml (sulci and cisterns are not deep).
  deep = (csf > 0.5) & (icv_sd > 12.0)
  comp, n = ndimage.label(deep)
  sizes = ndimage.sum(np.ones_like(comp), comp, index=np.arange(1, n + 1)) * spacing ** 3
  vent = np.isin(comp, 1 + np.flatnonzero(sizes >= 1000.0))
  vent = ndimage.binary_dilation(vent, iterations=1) & (csf > 0.3)
  ventricle = np.where(vent, csf, 0.0)
  return np.stack([gm, wm, csf, ventricle, icv_sd, _signed_distance(vent, spacing)], -1).astype(np.float32)


def _mni152_base(spacing_mm: int) -> tuple[np.ndarray, np.ndarray]:
  try:
    from nilearn import datasets  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("phantom anatomy 'mni152' needs nilearn (its MNI152 templates ship inside the wheel, no "
                      "download): pip install nilearn, or set data.phantom.anatomy='procedural'") from e
  template = datasets.load_mni152_template(resolution=1)
  t1 = np.asarray(template.get_fdata(), np.float32)
  gm = np.asarray(datasets.load_mni152_gm_template(resolution=1).get_fdata(), np.float32)
  wm = np.asarray(datasets.load_mni152_wm_template(resolution=1).get_fdata(), np.float32)
  icv = ndimage.binary_fill_holes(ndimage.binary_closing(t1 > 0.05 * t1.max(), iterations=2))
  affine = np.asarray(template.affine, np.float64)
  f = int(spacing_mm)
  if f > 1:
    gm, wm, icv = _block_mean(gm, f), _block_mean(wm, f), _block_mean(icv.astype(np.float32), f)
    affine = affine.copy()
    affine[:3, 3] = affine[:3, :3] @ np.full(3, (f - 1) / 2.0) + affine[:3, 3]
    affine[:3, :3] = affine[:3, :3] * f
  return _finish_base(gm, wm, icv.astype(np.float32), float(f)), affine


def _procedural_base(spacing_mm: int) -> tuple[np.ndarray, np.ndarray]:
  from mri_poison.data import phantom_v1  # pylint: disable=g-import-not-at-top
  n = int(round(200.0 / spacing_mm))
  fine, _ = phantom_v1._procedural_head(np.random.default_rng(0), (2 * n,) * 3)  # pylint: disable=protected-access
  onehot = lambda *k: _block_mean(np.isin(fine, k).astype(np.float32), 2)
  gm, wm = onehot(phantom_v1.GM), onehot(phantom_v1.WM)
  icv = onehot(phantom_v1.GM, phantom_v1.WM, phantom_v1.CSF)
  spacing = 200.0 / n
  affine = np.eye(4)
  affine[:3, :3] *= spacing
  affine[:3, 3] = -spacing * (n - 1) / 2.0
  return _finish_base(gm, wm, icv, spacing), affine


@functools.lru_cache(maxsize=4)
def base(anatomy: str, spacing_mm: int) -> tuple[np.ndarray, np.ndarray]:
  """(maps (X, Y, Z, CHANNELS), affine) of the template at about `spacing_mm` (1 or 2) mm, read-only."""
  if anatomy not in ANATOMIES:
    raise ValueError(f"data.phantom.anatomy: expected one of {ANATOMIES}, got {anatomy!r}")
  if anatomy == "procedural":
    maps, affine = _procedural_base(spacing_mm)
  else:
    maps, affine = _cached(f"mni152_{spacing_mm}mm", lambda: _mni152_base(spacing_mm))
  maps.setflags(write=False)
  return maps, affine


def _cached(name: str, build):
  """`build()` -> (maps, affine), kept as an .npz under cache_dir() (rebuilt when nilearn's files change)."""
  try:
    from nilearn import datasets  # pylint: disable=g-import-not-at-top
    stamp = repr([(f, os.path.getsize(os.path.join(d, f))) for d in [os.path.dirname(datasets.__file__) + "/data"]
                  for f in sorted(os.listdir(d)) if f.startswith("mni_icbm152")])
  except ImportError:
    return build()  # raises the install hint
  key = hashlib.sha1(f"{_FORMAT}{stamp}".encode()).hexdigest()[:12]
  path = os.path.join(cache_dir(), f"phantom_{name}_{key}.npz")
  try:
    with np.load(path, allow_pickle=False) as z:
      return np.array(z["maps"]), np.array(z["affine"])
  except (OSError, KeyError, ValueError):
    pass
  maps, affine = build()
  try:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with io_utils.atomic_path(path) as tmp:
      with open(tmp, "wb") as f:
        np.savez_compressed(f, maps=maps, affine=affine)
  except OSError:
    pass  # a read-only home only costs the rebuild next time
  return maps, affine


# ------------------------------------------------------------------------------------------- case grid


@functools.lru_cache(maxsize=8)
def grid_maps(anatomy: str, shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
  """(template maps on the case grid (X, Y, Z, CHANNELS), affine voxel -> template mm), read-only."""
  shape = tuple(int(s) for s in shape)
  base_maps, base_affine = base(anatomy, 1 if _fov_spacing(anatomy, shape) < 2.5 else 2)
  affine = grid_affine(anatomy, shape)
  h = affine[0, 0]
  base_h = float(np.abs(base_affine[0, 0]))
  # Voxel centres of the case grid in base voxel coordinates.
  ijk = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij"), -1)
  to_base = np.linalg.inv(base_affine) @ affine
  coords = ijk @ to_base[:3, :3].T + to_base[:3, 3]
  sigma = 0.42 * h / base_h  # FWHM of one case voxel
  out = np.empty(shape + (len(CHANNELS),), np.float32)
  for c, name in enumerate(CHANNELS):
    a = base_maps[..., c]
    smooth = name not in ("icv_sd", "ventricle_sd") and sigma > 0.3
    a = ndimage.gaussian_filter(a, sigma) if smooth else a
    cval = -100.0 if name.endswith("_sd") else 0.0
    out[..., c] = ndimage.map_coordinates(a, np.moveaxis(coords, -1, 0), order=1, mode="constant", cval=cval)
  out.setflags(write=False)
  return out, affine


def _icv_box(anatomy: str) -> tuple[np.ndarray, np.ndarray]:
  maps, affine = base(anatomy, 2)
  nz = np.argwhere(maps[..., C["icv_sd"]] > 0)
  corners = np.stack([nz.min(0), nz.max(0)]).astype(np.float64)
  world = corners @ affine[:3, :3].T + affine[:3, 3]
  return world.min(0) - MARGIN_MM, world.max(0) + MARGIN_MM


def _fov_spacing(anatomy: str, shape) -> float:
  lo, hi = _icv_box(anatomy)
  return float(np.max((hi - lo) / np.asarray(shape, np.float64)))


def grid_affine(anatomy: str, shape) -> np.ndarray:
  """Isotropic RAS affine whose grid covers the ICV box (plus margin), centred on it."""
  lo, hi = _icv_box(anatomy)
  h = _fov_spacing(anatomy, shape)
  affine = np.eye(4)
  affine[:3, :3] *= h
  affine[:3, 3] = (lo + hi) / 2.0 - h * (np.asarray(shape, np.float64) - 1) / 2.0
  return affine


# ------------------------------------------------------------------------------------------- subject warp


def draw_subject_warp(rng: np.random.Generator, shape, spacing: float, warp_mm: float) -> dict:
  """Random subject geometry: rotation (deg), isotropic and per-axis scale, shift (mm), velocity control points."""
  angles = rng.uniform(-6.0, 6.0, 3)
  scale = rng.uniform(0.92, 1.08) * rng.uniform(0.97, 1.03, 3)
  shift = rng.uniform(-3.0, 3.0, 3)
  grid = 6
  velocity = rng.standard_normal((1, grid, grid, grid, 3)).astype(np.float32) * (warp_mm / spacing)
  return dict(angles=angles, scale=scale, shift_mm=shift, velocity=velocity)


def _rotation(angles_deg) -> np.ndarray:
  a, b, c = np.deg2rad(angles_deg)
  rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
  ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
  rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
  return rz @ ry @ rx


def subject_coords(warp: dict, shape, spacing: float) -> np.ndarray:
  """(X, Y, Z, 3) template voxel coordinates read by each subject voxel: affine o exp(velocity)."""
  shape = tuple(int(s) for s in shape)
  centre = (np.asarray(shape, np.float64) - 1) / 2.0
  # Pull-back: subject voxel p reads template voxel centre + A (p + u(p) - centre) - shift.
  matrix = _rotation(warp["angles"]) / np.asarray(warp["scale"])[None, :]
  offset = centre - matrix @ centre - np.asarray(warp["shift_mm"]) / spacing
  with jax.default_device(jax.local_devices(backend="cpu")[0]):
    coords = _subject_coords(jnp.asarray(warp["velocity"]), jnp.asarray(matrix, jnp.float32),
                             jnp.asarray(offset, jnp.float32), shape)
    return np.asarray(coords)


@functools.partial(jax.jit, static_argnums=(3,))
def _subject_coords(velocity, matrix, offset, shape):
  u = warp_ops.integrate_velocity(warp_ops.upsample(velocity, shape, "bspline"), 6)[0]
  return (warp_ops.identity_grid(shape) + u) @ matrix.T + offset


def pull_back(maps: np.ndarray, coords: np.ndarray, *, cval: np.ndarray | float = 0.0) -> np.ndarray:
  """maps (X, Y, Z, K) read linearly at voxel coordinates (X', Y', Z', 3); outside the grid reads `cval` (per K)."""
  cval = np.broadcast_to(np.asarray(cval, np.float32), maps.shape[-1:])
  with jax.default_device(jax.local_devices(backend="cpu")[0]):
    out = _pull_back(jnp.asarray(maps - cval), jnp.asarray(coords, jnp.float32))
    return np.asarray(out) + cval


@jax.jit
def _pull_back(maps, coords):
  return warp_ops.sample(maps[None], coords[None], order=1, mode="constant", cval=0.0)[0]
