"""Report figures (matplotlib, Agg backend, written atomically): Dice vs eps, an example adversarial slice."""
from __future__ import annotations

import math
import os
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.colors as mcolors  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker as mticker  # noqa: E402
import numpy as np  # noqa: E402

from mri_poison import io_utils  # noqa: E402

# Label colours: background transparent, 1 necrotic core, 2 oedema, 3 enhancing tumour.
LABEL_COLOURS = ((0, 0, 0, 0), (0.85, 0.1, 0.1, 1), (0.1, 0.75, 0.2, 1), (1.0, 0.85, 0.0, 1))


def save_figure(fig, path: str | os.PathLike, dpi: int = 120) -> str:
  """Saves `fig` to `path` atomically (format from the extension) and closes it."""
  path = os.fspath(path)
  try:
    with io_utils.atomic_path(path) as tmp:
      fig.savefig(tmp, dpi=dpi, bbox_inches="tight")
  finally:
    plt.close(fig)
  return path


def dice_vs_eps(curves: Mapping[str, Mapping[str, tuple[Sequence[float], Sequence[float]]]], path, *,
                ci: Mapping[str, Mapping[str, tuple[Sequence[float], Sequence[float]]]] | None = None,
                ylabel: str = "mean Dice (WT, TC, ET)", xlabel: str = "eps (z-score units, L-inf)",
                title: str | None = None) -> str:
  """One panel per key of `curves` (e.g. a model), one line per inner key (e.g. an attack):
  curves[panel][line] = (eps, dice), eps = 0 being the clean point. `ci` (same nesting, (low, high) per eps)
  draws a shaded band (e.g. a bootstrap 95 % CI of the mean). The x axis is linear up to the smallest positive
  eps and logarithmic above (symlog), so eps = 0 and a geometric grid both show.
  """
  panels = list(curves)
  if not panels:
    raise ValueError("dice_vs_eps needs at least one panel")
  cols = min(3, len(panels))
  rows = math.ceil(len(panels) / cols)
  fig, axes = plt.subplots(rows, cols, figsize=(4.4 * cols, 3.5 * rows), squeeze=False, sharey=True)
  lines = list(dict.fromkeys(m for p in panels for m in curves[p]))
  colours = {m: plt.get_cmap("tab10")(i % 10) for i, m in enumerate(lines)}
  for ax, panel in zip(axes.ravel(), panels):
    for line, (eps, dice) in curves[panel].items():
      order = np.argsort(np.asarray(eps, float))
      eps, dice = np.asarray(eps, float)[order], np.asarray(dice, float)[order]
      ax.plot(eps, dice, "o-", color=colours[line], label=line, markersize=3.5)
      if ci is not None and line in ci.get(panel, {}):
        low, high = (np.asarray(v, float)[order] for v in ci[panel][line])
        ax.fill_between(eps, low, high, color=colours[line], alpha=0.12, linewidth=0)
    positive = sorted({float(e) for m in curves[panel].values() for e in m[0] if float(e) > 0})
    if positive:
      ax.set_xscale("symlog", linthresh=positive[0])
      ax.set_xticks([0.0] + positive)
      ax.xaxis.set_major_formatter(mticker.FuncFormatter(lambda v, _: f"{v:g}"))
      ax.xaxis.set_minor_locator(mticker.NullLocator())
      ax.tick_params(axis="x", labelrotation=45, labelsize=7)
    ax.set_title(panel)
    ax.set_xlabel(xlabel)
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
  for ax in axes.ravel()[len(panels):]:
    ax.axis("off")
  for ax in axes[:, 0]:
    ax.set_ylabel(ylabel)
  axes.ravel()[0].legend(fontsize=7)
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  return save_figure(fig, path)


def label_cmap():
  return mcolors.ListedColormap(LABEL_COLOURS)


def example_slice(image, adversarial, label, pred_clean, pred_adv, path, *, channel: int = -1,
                  slice_index: int | None = None, channel_name: str = "", amplify: float = 10.0,
                  title: str | None = None) -> str:
  """Axial slice (last spatial axis): clean, adversarial, perturbation x`amplify`, ground truth, both predictions.

  image/adversarial (X, Y, Z, C); label/pred_* (X, Y, Z) ints. `slice_index` defaults to the slice with the
  most tumour in `label`.
  """
  image, adversarial = np.asarray(image, np.float32), np.asarray(adversarial, np.float32)
  label, pred_clean, pred_adv = (np.asarray(a) for a in (label, pred_clean, pred_adv))
  if image.shape != adversarial.shape or image.ndim != 4:
    raise ValueError(f"image {image.shape} and adversarial {adversarial.shape} must be the same (X, Y, Z, C)")
  for name, a in (("label", label), ("pred_clean", pred_clean), ("pred_adv", pred_adv)):
    if a.shape != image.shape[:3]:
      raise ValueError(f"{name} {a.shape} must be the image grid {image.shape[:3]}")
  if slice_index is None:
    slice_index = int(np.argmax((label > 0).sum(axis=(0, 1)))) if label.any() else image.shape[2] // 2
  z = int(slice_index)
  clean_s, adv_s = image[:, :, z, channel].T, adversarial[:, :, z, channel].T
  delta = (adversarial - image)[:, :, z, channel].T * amplify
  lo, hi = np.percentile(image[..., channel], [1, 99])
  vmax = float(np.max(np.abs(delta))) or 1.0
  panels = [("clean" + (f" ({channel_name})" if channel_name else ""), clean_s, "gray", (lo, hi)),
            ("adversarial", adv_s, "gray", (lo, hi)),
            (f"perturbation x{amplify:g}", delta, "RdBu_r", (-vmax, vmax)),
            ("ground truth", label[:, :, z].T, None, None),
            ("prediction (clean)", pred_clean[:, :, z].T, None, None),
            ("prediction (adversarial)", pred_adv[:, :, z].T, None, None)]
  fig, axes = plt.subplots(1, len(panels), figsize=(2.6 * len(panels), 3.0))
  for ax, (name, data, cmap, lims) in zip(axes, panels):
    if cmap is None:  # label map over the clean image
      ax.imshow(clean_s, cmap="gray", vmin=lo, vmax=hi, origin="lower")
      ax.imshow(data, cmap=label_cmap(), vmin=0, vmax=3, origin="lower", interpolation="nearest", alpha=0.7)
    else:
      im = ax.imshow(data, cmap=cmap, vmin=lims[0], vmax=lims[1], origin="lower")
      if cmap == "RdBu_r":
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
    ax.set_title(name, fontsize=9)
    ax.axis("off")
  if title:
    fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  return save_figure(fig, path)


def line_panels(curves: Mapping[str, Mapping[str, tuple[Sequence[float], Sequence[float]]]], path, *,
                xlabel: str, ylabel: str, title: str | None = None) -> str:
  """One panel per key of `curves`, one line per inner key: curves[panel][line] = (x, y); linear axes, free y
  (e.g. a loss along an attack's iterations)."""
  panels = list(curves)
  if not panels:
    raise ValueError("line_panels needs at least one panel")
  cols = min(3, len(panels))
  rows = math.ceil(len(panels) / cols)
  fig, axes = plt.subplots(rows, cols, figsize=(4.4 * cols, 3.5 * rows), squeeze=False)
  lines = list(dict.fromkeys(m for p in panels for m in curves[p]))
  colours = {m: plt.get_cmap("tab10")(i % 10) for i, m in enumerate(lines)}
  for ax, panel in zip(axes.ravel(), panels):
    for line, (x, y) in curves[panel].items():
      ax.plot(np.asarray(x, float), np.asarray(y, float), "o-", color=colours[line], label=line, markersize=3.5)
    ax.set_title(panel)
    ax.set_xlabel(xlabel)
    ax.grid(alpha=0.3)
  for ax in axes.ravel()[len(panels):]:
    ax.axis("off")
  for ax in axes[:, 0]:
    ax.set_ylabel(ylabel)
  for ax in axes.ravel()[:len(panels)]:  # each panel may have its own lines
    ax.legend(fontsize=7)
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  return save_figure(fig, path)
