"""The one progress line of every long job (training, evaluation grids, studies): done/total, rate, ETA.

The ETA uses the steady-state rate: the clock starts at the first update, so the first unit (which pays for
compilation) does not inflate the estimate. Until a second update arrives the ETA is shown as "?".
"""
from __future__ import annotations

import datetime
import time
from typing import Callable, Mapping

import numpy as np
from absl import logging


def hms(seconds: float) -> str:
  if not np.isfinite(seconds):
    return "?"
  return str(datetime.timedelta(seconds=int(round(seconds))))


class Progress:
  """`update(done, ...)` logs "<name> <done>/<total> <unit>  <rate> <unit>/s  ETA h:mm:ss  <metrics>".

  `done` is absolute (a step number); `advance(amount)` adds to it. `total` may be changed (a study that
  finds cached work lowers it). The value returned is the rate since the previous update, for metric logs.
  """

  def __init__(self, total: float, *, name: str = "", unit: str = "steps", done: float = 0.0,
               log: Callable[..., None] = logging.info, clock: Callable[[], float] = time.perf_counter):
    self.total, self.done = float(total), float(done)
    self.name, self.unit, self._log, self._clock = name, unit, log, clock
    self._start = None  # (time, done) at the first update: steady-state reference
    self._last = (clock(), self.done)

  def advance(self, amount: float = 1.0, *, label: str = "", metrics: Mapping[str, float] | None = None) -> float:
    return self.update(self.done + float(amount), label=label, metrics=metrics)

  def update(self, done: float, *, label: str = "", metrics: Mapping[str, float] | None = None) -> float:
    now = self._clock()
    t_last, d_last = self._last
    recent = (done - d_last) / max(now - t_last, 1e-9)
    self._last, self.done = (now, float(done)), float(done)
    if self._start is None:
      self._start, eta = (now, float(done)), float("nan")
    else:
      t0, d0 = self._start
      steady = (done - d0) / max(now - t0, 1e-9)
      eta = (self.total - done) / steady if steady > 0 else float("nan")
    text = " ".join(f"{k}={v:.4g}" for k, v in (metrics or {}).items() if isinstance(v, (int, float)))
    head = f"{self.name} " if self.name else ""
    tail = f" {label}" if label else ""
    self._log("%s%g/%g %s  %.3g %s/s  ETA %s%s  %s", head, done, self.total, self.unit, recent, self.unit, hms(eta),
              tail, text)
    return recent

  def eta_seconds(self) -> float:
    if self._start is None:
      return float("nan")
    t0, d0 = self._start
    t1, d1 = self._last
    steady = (d1 - d0) / max(t1 - t0, 1e-9)
    return (self.total - d1) / steady if steady > 0 else float("nan")
