"""Tumour growth of the v2 phantom: tumour cell density, oedema, compartments and mass effect.

- Cell density u: the Fisher-Kolmogorov equation du/dt = div(D grad u) + rho u (1 - u) (Swanson et al., Cell
  Prolif 33:317 (2000)), D = D_w in white matter and about a tenth of it in grey matter, no flux into CSF or out of
  the brain (harmonic means of D on the voxel faces). Units: rho = 1, so sqrt(D_w) is the front width in mm.
  Explicit steps inside a `lax.while_loop` until the core (u above `core_level`) reaches the drawn volume.
- Vasogenic oedema: where the geodesic distance from the core, cheap along white matter, dear through grey
  matter and impassable through CSF, is below the case's oedema reach (an Eikonal model in the spirit of
  Konukoglu et al., IEEE TMI 29:77 (2010)); min-plus relaxations in a `lax.fori_loop`. The infiltrated rim of u
  counts as oedema too.
- Compartments: necrosis where u saturated, the enhancing rim between the core level and necrosis where a
  smooth random field lets the contrast leak (an irregular, partly missing rim), the rest of the core
  non-enhancing; cysts, haemorrhage and calcifications in some cases; no enhancement in lower-grade cases.
- The fields are solved on a 2.5 mm growth grid over a box around the seed, whatever the case grid, so a seed
  grows the same tumour at every resolution. Compartments are drawn from them on a render grid that splits each
  case voxel k ways per axis (to ~2.5 mm), as soft fractions (a linear ramp of each level set across a
  voxel), then averaged over the k^3 sub-voxels: partial volume by rendering finer and downsampling.
- Mass effect: the tumour pushes the scene outwards as if a ball of a share of the core's volume were
  inserted at its centre (radius r reads from r^2 / cbrt(r^3 + R^3)), fading to nothing at the skull; the map is
  monotone along each ray, so it does not fold.
"""
from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
from scipy import ndimage

from mri_poison.data.phantom_v1 import smooth_noise
from mri_poison.data.phantom_v2.anatomy import C

GROWTH_MM = 2.5  # voxel size of the growth grid
RENDER_MM = 2.5  # target voxel size of the render grid (case voxels are split to about this)
REACH_MM = 55.0  # half-side of the box the tumour may occupy
TUMOUR_OUT = ("oedema", "non_enhancing", "enhancing", "necrosis", "cyst", "haemorrhage", "calcification")
LABEL_OF = {"oedema": 2, "non_enhancing": 1, "enhancing": 3, "necrosis": 1, "cyst": 1, "haemorrhage": 1,
            "calcification": 1}


def draw(rng: np.random.Generator, cfg, spacing: float) -> dict:
  """One case's tumour parameters ([ours]; sizes in mm, in the range of BraTS gliomas)."""
  lgg = rng.uniform() < float(cfg.lgg_fraction)
  front = rng.uniform(3.0, 6.0) if lgg else rng.uniform(1.5, 3.5)
  return dict(
      lgg=bool(lgg),
      core_radius=float(rng.uniform(10.0, 24.0)),  # equivalent-sphere radius of u > core_level
      front_mm=float(max(front, 0.35 * spacing)),  # never thinner than a third of a case voxel
      grey_ratio=float(rng.uniform(0.05, 0.2)),  # D_grey / D_white
      core_level=float(rng.uniform(0.3, 0.5)),
      necrosis_level=float(rng.uniform(0.93, 0.99)),
      necrotic=bool(not lgg and rng.uniform() < 0.85),
      enhancing_share=float(rng.uniform(0.55, 0.95)),  # of the rim, before the field's irregularity
      infiltration_level=float(rng.uniform(0.03, 0.12)),
      oedema_reach=float(rng.uniform(3.0, 9.0) if lgg else rng.uniform(6.0, 25.0)),  # mm along white matter
      grey_cost=float(rng.uniform(3.0, 6.0)),  # geodesic cost per mm in grey matter / white matter
      multifocal=bool(rng.uniform() < float(cfg.multifocal_fraction)),
      cyst=bool(rng.uniform() < float(cfg.cyst_fraction)),
      haemorrhage=bool(rng.uniform() < float(cfg.haemorrhage_fraction)),
      calcification=bool(rng.uniform() < float(cfg.calcification_fraction)),
      mass_share=float(rng.uniform(0.2, 0.6) * float(cfg.mass_effect)),
  )


_SEED_TRIES = 4096


def _seed_voxel(rng, maps, params, spacing, supratentorial, near=None):
  """A white-matter point deep enough for the core, supratentorial, outside the ventricles, in (fractional) case
  voxels. Drawn as the first of a fixed number of uniform points of the field of view that qualifies, so a
  seed gives the same tumour position on any grid of the same head."""
  depth = maps[..., C["icv_sd"]]
  ok = ((maps[..., C["wm"]] > 0.6) & (maps[..., C["ventricle_sd"]] < -4.0) &
        (depth > 0.6 * params["core_radius"] + 6.0) & supratentorial)
  shape = np.asarray(ok.shape)
  points = rng.uniform(0.0, 1.0, (_SEED_TRIES, 3)) * shape - 0.5  # voxel centres at integers
  idx = np.clip(np.rint(points).astype(int), 0, shape - 1)
  good = ok[tuple(idx.T)]
  if near is not None:
    dist = np.linalg.norm((points - near) * spacing, axis=1)
    good &= (dist > 15.0) & (dist < 40.0)
  if good.any():
    return points[np.argmax(good)]
  cand = np.argwhere(maps[..., C["wm"]] > 0.3) if near is None else np.array([near])
  if not len(cand):
    cand = np.argwhere(depth >= depth.max())
  return cand[rng.integers(len(cand))].astype(np.float64)


def _ramp(field: np.ndarray, level: float, h: float) -> np.ndarray:
  """Fraction of each voxel where `field` > `level`, for a field varying linearly across the voxel."""
  grad = np.sqrt(sum(g ** 2 for g in np.gradient(field, h))) * h
  return np.clip((field - level) / np.maximum(grad, 1e-6) + 0.5, 0.0, 1.0)


def _blobs(shape, h, centres, radii) -> np.ndarray:
  """Fraction map of the union of balls (centres in voxels, radii in mm), with soft edges."""
  grid = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij"), -1)
  d = np.full(shape, np.inf, np.float32)
  for c, r in zip(centres, radii):
    d = np.minimum(d, np.linalg.norm((grid - c) * h, axis=-1) - r)
  return np.clip(0.5 - d / h, 0.0, 1.0)


def grow(rng: np.random.Generator, maps: np.ndarray, tcoords: np.ndarray, spacing: float, cfg) -> dict:
  """Tumour tissues as fractions on the case grid: {"fractions": (X, Y, Z, len(TUMOUR_OUT)), "params": ...,
  "texture": (X, Y, Z, 2) smooth fields in [-1, 1] inside the tumour, "gd": (X, Y, Z) enhancement scale}.

  Two grids besides the case grid: the growth grid (GROWTH_MM voxels over a box of 2 REACH_MM around the
  seed), where u and the oedema distance are solved, and the render grid (the case voxels of that box split
  k ways per axis, ~RENDER_MM), where the compartments are drawn from those fields and then averaged back.
  """
  shape = np.asarray(maps.shape[:3])
  p = draw(rng, cfg, spacing)
  z = tcoords[..., 2]
  supratentorial = z > float(z[maps[..., C["icv_sd"]] > 0].mean()) - 15.0  # adult gliomas: mostly cerebral
  seed = _seed_voxel(rng, maps, p, spacing, supratentorial)
  hg = GROWTH_MM
  ng = int(np.ceil(2 * REACH_MM / hg))
  origin = seed * spacing - hg * (ng - 1) / 2.0  # mm (case-voxel frame) of growth voxel 0
  gshape = (ng,) * 3
  gpos = [origin[a] + hg * np.arange(ng) for a in range(3)]  # growth voxel centres, mm
  wm, gm = (_read(maps[..., C[n]], [g / spacing for g in gpos]) for n in ("wm", "gm"))
  # Diffusivity varies along tracts and with local tissue structure: a smooth log-normal factor gives the
  # irregular, lobulated shapes of real gliomas instead of a ball.
  hetero = np.exp(smooth_noise(rng, gshape, 1, cells=int(ng * hg // 12))[0])
  diff = p["front_mm"] ** 2 * (wm + p["grey_ratio"] * gm) * hetero
  seeds, amps = [seed], [0.5]
  if p["multifocal"]:
    seeds.append(_seed_voxel(rng, maps, p, spacing, supratentorial, near=seed))
    amps.append(0.05)  # a later, smaller focus
  grid = np.stack(np.meshgrid(*gpos, indexing="ij"), -1)
  u0 = np.zeros(gshape, np.float32)
  for s_vox, a in zip(seeds, amps):
    u0 += a * np.exp(-0.5 * (np.linalg.norm(grid - s_vox * spacing, axis=-1) / 3.0) ** 2)
  target = 4.0 / 3.0 * np.pi * p["core_radius"] ** 3 / hg ** 3
  dt = min(0.9 * hg ** 2 / (6.0 * float(diff.max()) + 1e-6), 0.5)
  with jax.default_device(jax.local_devices(backend="cpu")[0]):
    u, steps = _fisher_kolmogorov(jnp.asarray(diff, jnp.float32), jnp.asarray(u0), jnp.float32(dt / hg ** 2),
                                  jnp.float32(dt), jnp.float32(p["core_level"]), jnp.float32(target),
                                  jnp.int32(3 * (p["core_radius"] / (2 * p["front_mm"]) + 10) / dt + 50))
    u = np.asarray(u)
    core = (u > p["core_level"]).astype(np.float32)
    cost = np.where(wm + gm > 0.3, (wm + p["grey_cost"] * gm) / np.maximum(wm + gm, 1e-6), np.inf)
    n_iter = int(np.ceil(1.5 * (p["oedema_reach"] + 2 * hg) / hg)) + 2
    dist = np.asarray(_geodesic(jnp.asarray(core), jnp.asarray(cost * hg, jnp.float32), jnp.int32(n_iter)))
  # Beyond the relaxed front the distance is "far"; a finite cap keeps the level-set ramp from seeing a jump.
  dist = np.minimum(dist, 2.0 * p["oedema_reach"] + 4.0 * hg)
  tex = smooth_noise(rng, gshape, 3, cells=int(ng * hg // 10))
  p.update(seed=seed.tolist(), steps=int(steps), growth_voxel_mm=hg)

  # Render grid: the case voxels of the box, k x k x k sub-voxels each.
  k = max(1, int(round(spacing / RENDER_MM)))
  h = spacing / k
  nb = np.minimum(shape, int(np.ceil(2 * REACH_MM / spacing)))
  lo = np.clip(np.rint(seed).astype(int) - nb // 2, 0, shape - nb)
  box = tuple(slice(a, a + n) for a, n in zip(lo, nb))
  rpos = [(lo[a] + (np.arange(nb[a] * k) + 0.5) / k - 0.5) * spacing for a in range(3)]  # mm
  to_growth = [(r - origin[a]) / hg for a, r in enumerate(rpos)]
  u_r, dist_r = _read(u, to_growth, cval=0.0), _read(dist, to_growth, cval=float(dist.max()))
  tex_r = [_read(t, to_growth) for t in tex]
  parenchyma = np.clip(sum(_read(maps[..., C[n]], [r / spacing for r in rpos]) for n in ("wm", "gm")), 0.0, 1.0)
  fshape = u_r.shape

  tc = _ramp(u_r, p["core_level"], h) * parenchyma
  nec = _ramp(u_r + 0.04 * tex_r[0], p["necrosis_level"], h) * tc if p["necrotic"] else np.zeros_like(tc)
  rim = tc - nec
  leak = 0.5 + 0.5 * np.tanh(tex_r[1])  # smooth field in (0, 1): where the contrast leaks
  et = np.zeros_like(rim) if p["lgg"] else rim * _ramp(leak, 1.0 - p["enhancing_share"], h)
  net = rim - et
  oedema_all = np.maximum(_ramp(u_r, p["infiltration_level"], h), _ramp(-dist_r, -p["oedema_reach"], h))
  oedema = np.clip(oedema_all * parenchyma - tc, 0.0, 1.0)
  parts = {"oedema": oedema, "non_enhancing": net, "enhancing": et, "necrosis": nec}
  inside = np.argwhere(tc > 0.5)
  extra = {}
  if p["cyst"] and len(inside):
    extra["cyst"] = _blobs(fshape, h, [inside[rng.integers(len(inside))]],
                           [rng.uniform(0.3, 0.6) * p["core_radius"]])
  if p["haemorrhage"] and len(inside):
    n = rng.integers(1, 4)
    extra["haemorrhage"] = _blobs(fshape, h, inside[rng.integers(len(inside), size=n)], rng.uniform(2.0, 5.0, n))
  if p["calcification"] and len(inside):
    n = rng.integers(1, 5)
    extra["calcification"] = _blobs(fshape, h, inside[rng.integers(len(inside), size=n)],
                                    rng.uniform(1.0, 2.5, n))
  core_parts = ("non_enhancing", "enhancing", "necrosis")
  for name, frac in extra.items():  # each takes its room from the core compartments, in proportion
    core_sum = sum(parts[n] for n in core_parts)
    taken = np.minimum(frac * tc, core_sum)
    for n in core_parts:
      parts[n] = parts[n] - taken * parts[n] / np.maximum(core_sum, 1e-6)
    parts[name] = taken
  stack = np.stack([parts.get(n, np.zeros_like(tc)) for n in TUMOUR_OUT]
                   + [tex_r[2] * (tc + oedema), tex_r[0] * (tc + oedema), leak], -1)
  out = np.zeros(tuple(shape) + (stack.shape[-1],), np.float32)
  out[box] = _block_mean(stack, k)
  return {"fractions": out[..., :len(TUMOUR_OUT)], "texture": np.clip(out[..., -3:-1], -3.0, 3.0) / 3.0,
          "gd": out[..., -1], "params": p}


def _read(a: np.ndarray, axes_positions, cval: float = 0.0) -> np.ndarray:
  """`a` read linearly on the grid spanned by per-axis fractional voxel positions (outside: `cval`)."""
  coords = np.meshgrid(*[np.asarray(x, np.float64) for x in axes_positions], indexing="ij")
  return ndimage.map_coordinates(a, coords, order=1, mode="constant", cval=cval).astype(np.float32)


def _block_mean(a: np.ndarray, k: int) -> np.ndarray:
  if k == 1:
    return a
  s = a.shape
  return a.reshape(s[0] // k, k, s[1] // k, k, s[2] // k, k, *s[3:]).mean(axis=(1, 3, 5))


# ------------------------------------------------------------------------------------------------ solvers


def _face_coefficients(diff):
  """Harmonic mean of D on the faces between neighbours along each axis (0 where either side has D = 0)."""
  faces = []
  for axis in range(3):
    a = jax.lax.slice_in_dim(diff, 0, diff.shape[axis] - 1, axis=axis)
    b = jax.lax.slice_in_dim(diff, 1, diff.shape[axis], axis=axis)
    faces.append(2.0 * a * b / jnp.maximum(a + b, 1e-12))
  return faces


@jax.jit
def _fisher_kolmogorov(diff, u0, dt_over_h2, dt, core_level, target_voxels, max_steps):
  faces = _face_coefficients(diff)

  def step(u):
    div = jnp.zeros_like(u)
    for axis, d in enumerate(faces):
      flux = d * jnp.diff(u, axis=axis)  # from voxel i to i + 1
      pad_hi = [(0, 0)] * 3
      pad_lo = [(0, 0)] * 3
      pad_hi[axis], pad_lo[axis] = (0, 1), (1, 0)
      div = div + jnp.pad(flux, pad_hi) - jnp.pad(flux, pad_lo)
    return jnp.clip(u + dt_over_h2 * div + dt * u * (1.0 - u), 0.0, 1.0)

  def cond(state):
    u, n = state
    return (jnp.sum(u > core_level) < target_voxels) & (n < max_steps)

  return jax.lax.while_loop(cond, lambda s: (step(s[0]), s[1] + 1), (u0, jnp.int32(0)))


_OFFSETS = [o for o in itertools.product((-1, 0, 1), repeat=3) if any(o)]


@jax.jit
def _geodesic(source, cost, n_iter):
  """Distance from `source` > 0.5 where a step to a 26-neighbour costs the mean `cost` of both ends times the
  step's length; `n_iter` min-plus relaxations (enough for paths of up to n_iter voxel steps)."""
  big = jnp.float32(1e9)
  cost = jnp.minimum(cost, big)
  n = source.shape
  window = lambda a, o: a[tuple(slice(1 + oi, 1 + oi + ni) for oi, ni in zip(o, n))]
  cost_pad = jnp.pad(cost, 1, constant_values=big)
  steps = [0.5 * (cost + window(cost_pad, o)) * float(np.sqrt(sum(map(abs, o)))) for o in _OFFSETS]

  def body(_, d):
    d_pad = jnp.pad(d, 1, constant_values=big)
    best = d
    for o, step in zip(_OFFSETS, steps):
      best = jnp.minimum(best, window(d_pad, o) + step)
    return best

  return jax.lax.fori_loop(0, n_iter, body, jnp.where(source > 0.5, 0.0, big))


# ------------------------------------------------------------------------------------------------ mass effect


def mass_effect_coords(tumour: dict, maps: np.ndarray, spacing: float) -> tuple[np.ndarray, float]:
  """(X, Y, Z, 3) voxel coordinates each voxel reads after the tumour pushed its surroundings, and the push
  radius in mm (0: no mass effect)."""
  shape = maps.shape[:3]
  grid = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij"), -1)
  fr = tumour["fractions"]
  core = sum(fr[..., TUMOUR_OUT.index(n)] for n in ("non_enhancing", "enhancing", "necrosis", "cyst",
                                                     "haemorrhage", "calcification"))
  volume = float(core.sum()) * spacing ** 3
  push = (tumour["params"]["mass_share"] * volume * 3.0 / (4.0 * np.pi)) ** (1.0 / 3.0)
  if push <= 0 or volume <= 0:
    return grid, 0.0
  centre = (grid * core[..., None]).sum((0, 1, 2)) / core.sum()
  rel = (grid - centre) * spacing
  r = np.linalg.norm(rel, axis=-1)
  r_src = r ** 2 / np.cbrt(r ** 3 + push ** 3)
  depth = np.clip(maps[..., C["icv_sd"]] / 15.0, 0.0, 1.0)
  fade = depth * depth * (3.0 - 2.0 * depth)  # smoothstep: nothing moves at the skull
  scale = 1.0 - fade * (1.0 - r_src / np.maximum(r, 1e-6))
  return (centre + rel * scale[..., None] / spacing).astype(np.float32), float(push)
