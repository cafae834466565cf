"""Assembling report.md: a small builder of markdown blocks, written atomically."""
from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

from mri_poison import io_utils
from mri_poison.report import tables


class Report:
  """Append blocks, then `write(path)`; image paths are made relative to the report's folder."""

  def __init__(self, title: str):
    self._blocks: list[str] = [f"# {title}\n"]

  def heading(self, text: str, level: int = 2) -> "Report":
    self._blocks.append(f"{'#' * level} {text}\n")
    return self

  def paragraph(self, text: str) -> "Report":
    self._blocks.append(text.strip() + "\n")
    return self

  def bullets(self, items: Sequence[str]) -> "Report":
    self._blocks.append("".join(f"- {i}\n" for i in items))
    return self

  def table(self, rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None,
            caption: str | None = None, **kw) -> "Report":
    text = tables.markdown_table(rows, columns, **kw) if rows else "_(no rows)_\n"
    self._blocks.append((f"{caption}\n\n" if caption else "") + text)
    return self

  def image(self, path: str, alt: str, base_dir: str | None = None) -> "Report":
    if base_dir is not None:
      path = os.path.relpath(path, base_dir)
    self._blocks.append(f"![{alt}]({path})\n")
    return self

  def code(self, text: str, lang: str = "") -> "Report":
    self._blocks.append(f"```{lang}\n{text.rstrip()}\n```\n")
    return self

  def text(self) -> str:
    return "\n".join(self._blocks)

  def write(self, path: str | os.PathLike) -> str:
    io_utils.write_text(path, self.text())
    return os.fspath(path)
