"""Atomic file output: a failed run never leaves a half-written file that looks complete."""
from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import os
import tempfile
from typing import Any, Iterable, Mapping


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
  """Yields a temporary path beside `path`; renames it onto `path` only if the block succeeds."""
  path = os.fspath(path)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  base = os.path.basename(path)
  fd, tmp = tempfile.mkstemp(prefix=f".{base}.", suffix=".tmp" + _ext(base), dir=os.path.dirname(os.path.abspath(path)))
  os.close(fd)
  try:
    yield tmp
    # mkstemp makes the file 0600; give it the permissions a plain open() would have.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.remove(tmp)
    raise


def _ext(name: str) -> str:
  # Keep the real extension last so writers that infer a format from it (nibabel, matplotlib) still work.
  for ext in (".nii.gz", ".nii", ".png", ".pdf", ".json", ".csv", ".md", ".jsonl"):
    if name.endswith(ext):
      return ext
  return ""


def write_text(path, text: str) -> None:
  with atomic_path(path) as tmp, open(tmp, "w") as f:
    f.write(text)


def write_json(path, obj: Any) -> None:
  write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def write_csv(path, rows: Iterable[Mapping[str, Any]], fieldnames: list[str] | None = None) -> None:
  rows = list(rows)
  if fieldnames is None:
    fieldnames = list(dict.fromkeys(k for r in rows for k in r))
  with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=fieldnames)
    w.writeheader()
    w.writerows(rows)


def read_csv(path) -> list[dict[str, Any]]:
  """The rows `write_csv` wrote, with their values typed again: int, float (nan and inf included), bool or str.

  An empty field is a key the row did not have (DictWriter fills those with ""), so it is left out.
  """
  with open(path, newline="") as f:
    return [{k: _typed(v) for k, v in row.items() if v != ""} for row in csv.DictReader(f)]


def _typed(text: str):
  if text in ("True", "False"):
    return text == "True"
  for kind in (int, float):
    try:
      return kind(text)
    except ValueError:
      pass
  return text


def append_jsonl(path, obj: Mapping[str, Any]) -> None:
  """Appends one line; a crash mid-write leaves at most a truncated last line, which readers skip."""
  with open(path, "a") as f:
    f.write(json.dumps(obj, default=_json_default) + "\n")


def file_sha256(path) -> str:
  """Hex SHA-256 of a file's bytes, read in 1 MiB blocks."""
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def _json_default(o):
  import numpy as np
  if isinstance(o, np.generic):
    return o.item()
  if hasattr(o, "tolist"):
    return o.tolist()
  raise TypeError(f"not JSON serialisable: {type(o)}")
