"""Imports point down the layers (docs/architecture.md, Layering), checked on the source with ast.

Every import counts: at module top, inside functions (lazy imports), relative ones, and
`importlib.import_module("literal")`. Layers, lowest first; a unit may import its own modules and anything in
a lower layer. Units of one layer are peers: one may import the other, but not both ways.

  base             mri_poison (the package root), io_utils, progress, registry: utilities that know nothing of MRI
  ops              pure array helpers (warps, morphology, texture); the phantom warps anatomy with them
  data             Case, loaders, preprocessing, phantom, TFDS builders, grain pipeline
  models           Flax modules
  losses / metrics one set of losses; Dice/HD95 and statistics
  report           tables, figures, NIfTI export, markdown. It imports io_utils and metrics (its paired tests
                   and summaries) and nothing that trains or attacks, so it sits right above losses/metrics, and
                   every layer above (a trainer's or an attack's own summary tables included) may use it.
  train / attacks  the trainer and the attack loop
  defenses / poison
  cellstore        the evaluation-cell store (digests, cells, shares, multi-process batches) every study keeps its
                   results in
  studies          one package per study + common
  experiments      launchers, configs, benchmarks
"""
import ast
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("mri_poison", "experiments")
LAYERS = (
    ("base", ("mri_poison", "mri_poison.io_utils", "mri_poison.progress", "mri_poison.registry")),
    ("ops", ("mri_poison.ops",)),
    ("data", ("mri_poison.data",)),
    ("models", ("mri_poison.models",)),
    ("losses/metrics", ("mri_poison.losses", "mri_poison.metrics")),
    ("report", ("mri_poison.report",)),
    ("train/attacks", ("mri_poison.train", "mri_poison.attacks")),
    ("defenses/poison", ("mri_poison.defenses", "mri_poison.poison")),
    ("cellstore", ("mri_poison.cellstore",)),
    ("studies", ("mri_poison.studies",)),
    ("experiments", ("experiments",)),
)
_ROOT_ONLY = {"mri_poison"}  # the package root is its own unit; its submodules belong to the other units


def unit_of(module: str) -> tuple[int, str] | None:
  """(layer index, unit) of a dotted module name: the longest listed unit that is it or contains it."""
  best = None
  for index, (_, units) in enumerate(LAYERS):
    for unit in units:
      if module == unit or (unit not in _ROOT_ONLY and module.startswith(unit + ".")):
        if best is None or len(unit) > len(best[1]):
          best = (index, unit)
  return best


def module_name(path: str) -> str:
  rel = os.path.relpath(path, ROOT)[:-len(".py")].split(os.sep)
  return ".".join(rel[:-1] if rel[-1] == "__init__" else rel)


def _exists(module: str, files: set[str]) -> bool:
  parts = module.split(".")
  return os.path.join(*parts) + ".py" in files or os.path.join(*parts, "__init__.py") in files


def imports(path: str, text: str, files: set[str]) -> list[tuple[int, str]]:
  """(line, imported module) of every import of a project module in the file, lazy ones included."""
  name = module_name(path)
  package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
  out = []
  for node in ast.walk(ast.parse(text, filename=path)):
    if isinstance(node, ast.Import):
      out += [(node.lineno, a.name) for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      if node.level:
        base = package.split(".")
        base = base[:len(base) - (node.level - 1)]
        module = ".".join(base + ([node.module] if node.module else []))
      else:
        module = node.module or ""
      for a in node.names:  # `from pkg import mod` imports the submodule when there is one
        sub = f"{module}.{a.name}"
        out.append((node.lineno, sub if _exists(sub, files) else module))
    elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
          and isinstance(node.args[0].value, str)
          and ((isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
               or (isinstance(node.func, ast.Name) and node.func.id in ("import_module", "__import__")))):
      out.append((node.lineno, node.args[0].value))
  return [(line, m) for line, m in out if m.split(".")[0] in PACKAGES]


def violations(sources: dict[str, str]) -> list[str]:
  """Every import that points up the layers, every module in no layer, every two-way import between peers."""
  files = {os.path.relpath(p, ROOT) for p in sources}
  problems, peer_edges = [], {}
  for path, text in sorted(sources.items()):
    name = module_name(path)
    here = unit_of(name)
    rel = os.path.relpath(path, ROOT)
    if here is None:
      problems.append(f"{rel}: module {name} is in no layer; add its package to LAYERS in tests/test_layering.py")
      continue
    for line, target in imports(path, text, files):
      there = unit_of(target)
      if there is None:
        problems.append(f"{rel}:{line} imports {target}, which is in no layer (a removed or misspelt module?)")
      elif there[0] > here[0]:
        problems.append(f"{rel}:{line} imports {target}: {LAYERS[here[0]][0]} ({here[1]}) must not import "
                        f"{LAYERS[there[0]][0]} ({there[1]}); imports point down: "
                        + " < ".join(layer for layer, _ in LAYERS))
      elif there[0] == here[0] and there[1] != here[1]:
        peer_edges.setdefault((here[1], there[1]), f"{rel}:{line} imports {target}")
  for (a, b), where in sorted(peer_edges.items()):
    if a < b and (b, a) in peer_edges:
      problems.append(f"peers {a} and {b} import each other ({where}; {peer_edges[(b, a)]}); one must not")
  return problems


def project_sources() -> dict[str, str]:
  out = {}
  for package in PACKAGES:
    for folder, dirs, names in os.walk(os.path.join(ROOT, package)):
      dirs[:] = [d for d in dirs if not d.startswith((".", "__"))]
      for n in names:
        if n.endswith(".py"):
          path = os.path.join(folder, n)
          with open(path) as f:
            out[path] = f.read()
  return out


def test_imports_point_down_the_layers():
  sources = project_sources()
  assert len(sources) > 20 and any(p.endswith(os.path.join("studies", "common.py")) for p in sources)
  problems = violations(sources)
  assert not problems, "imports against the layering:\n  " + "\n  ".join(problems)


def _fake(files: dict[str, str]) -> dict[str, str]:
  return {os.path.join(ROOT, *p.split("/")): text for p, text in files.items()}


@pytest.mark.parametrize("text, culprit", [
    ("def f():\n  from mri_poison.train import loop\n", "mri_poison.train.loop"),  # lazy, upward
    ("import mri_poison.studies.common as c\n", "mri_poison.studies.common"),
    ("from .. import report\n", "mri_poison.report"),  # relative
    ("import importlib\nm = importlib.import_module('experiments.train')\n", "experiments.train"),
])
def test_an_upward_import_is_named(text, culprit):
  sources = _fake({"mri_poison/data/x.py": text, "mri_poison/train/loop.py": "", "mri_poison/report/__init__.py": "",
                   "mri_poison/studies/common.py": "", "experiments/train.py": ""})
  problems = violations(sources)
  assert len(problems) == 1 and re.search(rf"data/x\.py:\d+ imports {re.escape(culprit)}: data", problems[0]), problems


def test_what_is_allowed_and_what_is_unplaced():
  allowed = _fake({
      "mri_poison/studies/robustify/study.py": "from mri_poison.studies import common\nfrom . import evaluation\n"
                                               "from mri_poison.report import tables\nimport numpy\n",
      "mri_poison/studies/robustify/evaluation.py": "from mri_poison.train import state\n",
      "mri_poison/studies/common.py": "", "mri_poison/report/tables.py": "from mri_poison import metrics\n",
      "mri_poison/metrics.py": "", "mri_poison/train/state.py": "from mri_poison.models.unet import UNet\n",
      "mri_poison/models/unet.py": "",
  })
  assert violations(allowed) == []
  assert "in no layer" in violations(_fake({"mri_poison/newthing.py": ""}))[0]
  assert "in no layer" in violations(_fake({"mri_poison/data/x.py": "import mri_poison.robustify\n"}))[0]
  peers = violations(_fake({"mri_poison/train/a.py": "from mri_poison.attacks import b\n",
                            "mri_poison/attacks/b.py": "from mri_poison.train import a\n"}))
  assert len(peers) == 1 and "import each other" in peers[0]
