#!/usr/bin/env bash
# Fills .gpu_wheels/ (git-ignored) with the wheels the GPU image lacks, for the GPU image's Python, plus the
# peer script; run it HERE (this machine has the package index), then carry .gpu_wheels to the GPU machine.
#
#   bash experiments/bench/gpu_prepare.sh            # PY=312 (cp312, manylinux x86_64) by default
#   PY=311 bash experiments/bench/gpu_prepare.sh
#
# The GPU image has jax (+jaxlib, CUDA plugin, ml_dtypes, opt_einsum, scipy), flax, optax, orbax (+tensorstore,
# msgpack, etils, protobuf, rich), numpy and torch: those are not fetched, so the folder stays under the 64 MiB a
# device `run` may carry. Everything is fetched with --no-deps (monai and torchattacks would pull torch).
# The device command is in experiments/bench/gpu_check.py's docstring.
set -euo pipefail
PY="${PY:-312}"
DEST="${DEST:-.gpu_wheels}"
PEER="${PEER:-$(dirname "$0")/../../../shared/bench/peer_unet3d.py}"
cd "$(dirname "$0")/../.."
mkdir -p "$DEST"
# What the project imports at run time: pyproject.toml's dependencies (+ chex, einops) and their dependencies,
# pinned to the versions installed in THIS venv (the ones the tests passed with), minus what the image has.
# pyarrow (~40 MiB) is left out (tfds' array_record path does not use it), and so is nilearn with scikit-learn
# and pandas (~40 MiB with theirs): they would take the folder past 64 MiB, so on the GPU the phantom draws
# its procedural head instead of MNI152 (gpu_studies does that when nilearn is missing, and says so).
PINS=$(python - <<'PYEOF'
import importlib.metadata as md, re
from packaging.requirements import Requirement
IMAGE = {"jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy", "scipy", "ml-dtypes", "opt-einsum",
         "tensorstore", "msgpack", "torch", "setuptools", "typing-extensions", "jinja2", "markupsafe", "filelock",
         "fsspec", "sympy", "networkx", "mpmath", "treescope", "rich", "pyyaml", "protobuf", "nest-asyncio",
         "humanize", "simplejson", "aiofiles", "etils", "zipp", "importlib-resources", "markdown-it-py", "mdurl",
         "pygments", "pyarrow"}
ROOTS = ["grain", "nibabel", "ml-collections", "absl-py", "tensorboardX", "array-record", "tensorflow-datasets",
         "matplotlib", "chex", "einops"]
norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()
seen, stack = {}, list(ROOTS)
while stack:
  name = norm(stack.pop())
  if name in seen or name in IMAGE:
    continue
  dist = md.distribution(name)
  seen[name] = dist.version
  for r in dist.requires or []:
    req = Requirement(r)
    if not req.marker or req.marker.evaluate({"extra": ""}):
      stack.append(req.name)
print(" ".join(f"{n}=={v}" for n, v in sorted(seen.items())))
PYEOF
)
TARGET=(--only-binary=:all: --implementation cp --python-version "$PY" --abi "cp$PY" --abi abi3 --abi none
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
        --platform any)
for pin in $PINS monai torchattacks; do  # --no-deps: the closure is already listed; monai/torchattacks need torch
  if ! python -m pip download -q --no-deps "${TARGET[@]}" -d "$DEST" "$pin" 2>/dev/null; then
    python -m pip wheel -q --no-deps -w "$DEST" "$pin"  # sdist only (e.g. promise): pure Python, built here
  fi
done
# Drop what the image has (and what would only shadow it).
for pat in 'jax-*' 'jaxlib-*' 'jax_cuda*' 'flax-*' 'optax-*' 'orbax*' 'numpy-*' 'scipy-*' 'ml_dtypes-*' \
           'opt_einsum-*' 'tensorstore-*' 'msgpack-*' 'torch-*' 'nvidia_*' 'triton-*' 'sympy-*' 'networkx-*' \
           'mpmath-*' 'jinja2-*' 'MarkupSafe-*' 'markupsafe-*' 'filelock-*' 'fsspec-*' 'setuptools-*'; do
  rm -f "$DEST"/$pat
done
if [[ -f "$PEER" ]]; then
  cp "$PEER" "$DEST/peer_unet3d.py"
else
  echo "note: $PEER not found; the peer jobs will be skipped unless --peer points at it" >&2
fi
echo "wheels for cp$PY in $DEST:"
du -h "$DEST"/* | sort -h
du -sh "$DEST"
total=$(du -sm "$DEST" | cut -f1)
if (( total > 60 )); then
  echo "WARNING: $DEST is ${total} MiB: a device run carries at most 64 MiB in all" >&2
  exit 1
fi
