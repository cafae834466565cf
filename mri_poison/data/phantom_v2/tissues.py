"""Tissue parameters, MR signal equations and per-case protocols of the v2 phantom.

Every voxel holds volume fractions of the tissues below; a sequence's signal is the fraction-weighted sum of
each tissue's signal (partial volume mixes magnetisation, not relaxation times), so a tissue needs PD, T1, T2,
its gadolinium concentration after contrast and a CT number.

Sources (3 T, rounded; the tumour values are choices of ours inside the ranges reported for gliomas):
- grey / white matter T1 and T2: Wansapura et al., JMRI 9:531 (1999) (WM 832 / 80 ms, GM 1331 / 110 ms) and
  Stanisz et al., MRM 54:507 (2005) (WM 1084 / 69 ms, GM 1820 / 99 ms, blood 1932 / 275 ms); we take values
  between the two. CSF T1 ~4.3 s (Rooney et al., MRM 57:308 (2007), about 4.4 s); CSF T2 ~2 s.
- proton density as water content relative to CSF (WM ~0.7, GM ~0.8), the usual simulator convention
  (BrainWeb, Kwan et al., IEEE TMI 18:1085 (1999)).
- gadolinium relaxivity r1 ~4.5 /mM/s at 3 T (gadobutrol / gadoterate range, Rohrer et al., Invest Radiol
  40:715 (2005)); blood-pool concentration ~1.5 mM minutes after 0.1 mmol/kg; tissue without a blood-brain
  barrier (enhancing tumour, choroid plexus, dura) a fraction of that [ours].
- CT numbers: textbook HU (WM ~28, GM ~38, CSF ~5, vasogenic oedema hypodense ~18, acute haemorrhage ~65,
  calcification hundreds, bone > 700); tumour near-isodense [ours within the usual ranges].
"""
from __future__ import annotations

import dataclasses

import numpy as np

# Tissues of the fraction maps (channel order of `fractions` everywhere in the v2 phantom).
TISSUES = ("gm", "wm", "csf", "oedema", "non_enhancing", "enhancing", "necrosis", "cyst", "haemorrhage",
           "calcification", "vessel", "sinus", "choroid", "dura", "wm_lesion", "csf_inflow", "fat", "bone", "air")
T = {name: i for i, name in enumerate(TISSUES)}
N_TISSUES = len(TISSUES)
# Contract label of each tumour tissue (everything else is 0): necrotic / non-enhancing core 1, oedema 2, ET 3.
TUMOUR_LABEL = {"non_enhancing": 1, "necrosis": 1, "cyst": 1, "haemorrhage": 1, "oedema": 2, "enhancing": 3}
TUMOUR_TISSUES = tuple(TUMOUR_LABEL)

# name: (PD, T1 ms, T2 ms, Gd mM after contrast, HU, flowing blood)
_TABLE = {
    "gm":            (0.80, 1450.0,  105.0, 0.00,   38.0, False),
    "wm":            (0.70,  900.0,   75.0, 0.00,   28.0, False),
    "csf":           (1.00, 4300.0, 2000.0, 0.00,    5.0, False),
    "oedema":        (0.86, 1500.0,  150.0, 0.02,   18.0, False),  # vasogenic: long T2, hypodense on CT
    "non_enhancing": (0.84, 1550.0,  125.0, 0.03,   32.0, False),
    "enhancing":     (0.84, 1500.0,  115.0, 0.35,   36.0, False),  # Gd scaled per case and per voxel
    "necrosis":      (0.92, 2400.0,  220.0, 0.00,   14.0, False),
    "cyst":          (0.98, 3600.0,  900.0, 0.00,    8.0, False),
    "haemorrhage":   (0.80,  450.0,   50.0, 0.00,   65.0, False),  # subacute intracellular methaemoglobin
    "calcification": (0.20,  900.0,   20.0, 0.00,  350.0, False),
    "vessel":        (0.85, 1900.0,  150.0, 1.50,   45.0, True),
    "sinus":         (0.85, 1900.0,  150.0, 1.50,   48.0, True),
    "choroid":       (0.85, 1200.0,  110.0, 0.80,   36.0, False),
    "dura":          (0.60, 1000.0,   60.0, 0.40,   50.0, False),
    "wm_lesion":     (0.74, 1150.0,  115.0, 0.00,   22.0, False),  # periventricular caps, deep WM lesions
    "csf_inflow":    (1.00, 4300.0, 2000.0, 0.00,    5.0, False),  # CSF whose spins escaped the inversion
    "fat":           (0.95,  380.0,  110.0, 0.00, -100.0, False),
    "bone":          (0.05,  300.0,    2.0, 0.00, 1200.0, False),
    "air":           (0.00, 1000.0,    1.0, 0.00, -1000.0, False),
}
assert tuple(_TABLE) == TISSUES
R1_GD = 4.5e-3  # gadolinium relaxivity, /mM/ms


@dataclasses.dataclass(frozen=True)
class TissueParams:
  """Arrays over TISSUES."""
  pd: np.ndarray
  t1: np.ndarray  # ms
  t2: np.ndarray  # ms
  gd: np.ndarray  # mM after contrast
  hu: np.ndarray
  flowing: np.ndarray  # bool: flow void on spin-echo sequences


def tissue_params(tumour_contrast: float = 1.0) -> TissueParams:
  """The table, with every tumour tissue's deviation from white matter scaled by `tumour_contrast`.

  1 is the table; 0 makes the tumour look like white matter on every channel (no gadolinium either), so the
  scale is one knob for how much intensity evidence the tumour carries.
  """
  cols = [np.array([_TABLE[n][i] for n in TISSUES], np.float64) for i in range(5)]
  pd, t1, t2, gd, hu = cols
  s = float(tumour_contrast)
  wm = T["wm"]
  for name in TUMOUR_TISSUES:
    i = T[name]
    pd[i], t1[i], t2[i] = (pd[wm] + s * (pd[i] - pd[wm]), t1[wm] + s * (t1[i] - t1[wm]),
                           t2[wm] + s * (t2[i] - t2[wm]))
    hu[i], gd[i] = hu[wm] + s * (hu[i] - hu[wm]), s * gd[i]
  return TissueParams(pd, t1, t2, gd, hu, np.array([_TABLE[n][5] for n in TISSUES]))


def jitter_relaxation(params: TissueParams, rng: np.random.Generator, sd: float) -> TissueParams:
  """One subject's relaxation times: T1 and T2 of every tissue times exp(N(0, sd)), 2 sd for tumour tissues
  (oedema water content and cellularity vary far more between patients than normal tissue does) [ours].

  CSF is left alone so that each protocol's inversion time still nulls it, as a real FLAIR is tuned to do."""
  scale = np.where(np.isin(np.arange(len(TISSUES)), [T[n] for n in TUMOUR_TISSUES]), 2.0 * sd, sd)
  scale[[T["csf"], T["csf_inflow"]]] = 0.0
  t1 = params.t1 * np.exp(scale * rng.standard_normal(len(TISSUES)))
  t2 = params.t2 * np.exp(scale * rng.standard_normal(len(TISSUES)))
  return dataclasses.replace(params, t1=t1, t2=t2)


# --------------------------------------------------------------------------------------- signal equations


def spin_echo(pd, t1, t2, tr, te):
  """Spin echo / fast spin echo magnitude: PD (1 - exp(-TR/T1)) exp(-TE/T2)."""
  return pd * (1.0 - np.exp(-tr / t1)) * np.exp(-te / t2)


def spoiled_gradient_echo(pd, t1, t2star, tr, te, flip_deg):
  """Spoiled gradient echo (3D T1, e.g. post-contrast): PD sin a (1 - E1) / (1 - cos a E1) exp(-TE/T2*)."""
  a = np.deg2rad(flip_deg)
  e1 = np.exp(-tr / t1)
  return pd * np.sin(a) * (1.0 - e1) / (1.0 - np.cos(a) * e1) * np.exp(-te / t2star)


def inversion_recovery(pd, t1, t2, tr, te, ti):
  """Magnitude inversion recovery (FLAIR): PD |1 - 2 exp(-TI/T1) + exp(-TR/T1)| exp(-TE/T2)."""
  return pd * np.abs(1.0 - 2.0 * np.exp(-ti / t1) + np.exp(-tr / t1)) * np.exp(-te / t2)


def null_inversion_time(t1, tr):
  """TI at which tissue of longitudinal relaxation `t1` has no signal: T1 ln(2 / (1 + exp(-TR/T1)))."""
  return t1 * np.log(2.0 / (1.0 + np.exp(-tr / t1)))


# ------------------------------------------------------------------------------------------------ protocols

# Per sequence: how it is acquired (ranges are drawn per case) [ours, typical clinical glioma protocols; the
# BraTS collections mix 1.5 and 3 T, 2D and 3D acquisitions]. "thick": slice thickness in mm of 2D sequences,
# resampled to isotropic voxels as the BraTS pipeline does; T1-Ce is a 3D gradient echo, the reference the
# other sequences are registered to.
PROTOCOLS = {
    "t1": dict(kind="spin_echo", tr=(450.0, 700.0), te=(8.0, 15.0), thick=(1.0, 5.0), snr=(15.0, 35.0)),
    "t1ce": dict(kind="gradient_echo", tr=(6.0, 10.0), te=(2.5, 4.5), flip=(10.0, 20.0), thick=(1.0, 1.0),
                 snr=(12.0, 30.0)),
    "t2": dict(kind="spin_echo", tr=(3000.0, 6000.0), te=(80.0, 120.0), thick=(3.0, 5.0), snr=(15.0, 35.0)),
    "flair": dict(kind="inversion_recovery", tr=(8000.0, 11000.0), te=(90.0, 140.0), ti_jitter=0.05,
                  thick=(3.0, 5.0), snr=(12.0, 30.0)),
}


def draw_protocol(rng: np.random.Generator, modality: str) -> dict:
  """One case's acquisition parameters of `modality` (uniform in the PROTOCOLS ranges)."""
  spec = PROTOCOLS[modality]
  p = {k: float(rng.uniform(*v)) for k, v in spec.items() if isinstance(v, tuple)}
  p["kind"] = spec["kind"]
  if spec["kind"] == "inversion_recovery":
    csf_t1 = _TABLE["csf"][1]
    p["ti"] = float(null_inversion_time(csf_t1, p["tr"]) * (1.0 + rng.uniform(-1, 1) * spec["ti_jitter"]))
  return p


def tissue_signal(params: TissueParams, protocol: dict, *, contrast: bool, gd_scale=1.0) -> np.ndarray:
  """Signal of every tissue (array over TISSUES) under `protocol`; `contrast`: after gadolinium.

  `gd_scale` multiplies the gadolinium concentration (an array broadcasting against TISSUES, or a number).
  Flowing blood leaves the slice between the 90 and 180 degree pulses of spin-echo sequences (flow void); a
  3D gradient echo shows it bright instead.
  """
  t1 = params.t1
  if contrast:
    t1 = 1.0 / (1.0 / t1 + R1_GD * params.gd * gd_scale)
  kind = protocol["kind"]
  if kind == "spin_echo":
    s = spin_echo(params.pd, t1, params.t2, protocol["tr"], protocol["te"])
  elif kind == "gradient_echo":
    s = spoiled_gradient_echo(params.pd, t1, 0.6 * params.t2, protocol["tr"], protocol["te"], protocol["flip"])
  elif kind == "inversion_recovery":
    s = inversion_recovery(params.pd, t1, params.t2, protocol["tr"], protocol["te"], protocol["ti"])
  else:
    raise ValueError(f"unknown sequence kind {kind!r}")
  if kind == "inversion_recovery":
    # Inflowing CSF was outside the slab at the inversion: it relaxes as if never inverted, so it is bright.
    inflow = 0.25 * spin_echo(params.pd, t1, params.t2, protocol["tr"], protocol["te"])
    s = np.where(np.arange(N_TISSUES) == T["csf_inflow"], inflow, s)
  if kind != "gradient_echo":
    s = np.where(params.flowing, 0.1 * s, s)
  return s
