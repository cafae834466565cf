"""The re-render check every study's tests share: a finished workdir copied without what the report must not need,
report.md deleted and rendered again from the result files alone gives the same text, and a deleted result file
is named in the error."""
import os
import shutil

import pytest


def check(render, finished: str, copy: str, *, leave_out, missing: str, rerender=None) -> None:
  """`render(workdir)` on a copy of `finished` made without `leave_out` (a shutil.copytree ignore); `rerender`
  (default: `render`) is what writes report.md again, e.g. the command line."""
  shutil.copytree(finished, copy, ignore=leave_out)
  os.remove(os.path.join(copy, "report.md"))
  if rerender is None:
    assert render(copy) == os.path.join(copy, "report.md")
  else:
    rerender(copy)
  with open(os.path.join(copy, "report.md")) as again, open(os.path.join(finished, "report.md")) as written:
    assert again.read() == written.read()
  os.remove(os.path.join(copy, "results", missing))
  with pytest.raises(FileNotFoundError, match=missing):
    render(copy)
