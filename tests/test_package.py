"""Importing the package: the classic threefry whichever comes first, jax or mri_poison; no jax for io_utils."""
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _python(code: str, **env) -> str:
  environ = {k: v for k, v in os.environ.items() if k != "JAX_THREEFRY_PARTITIONABLE"}
  return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=dict(environ, **env), capture_output=True,
                        text=True, check=True).stdout.split()


@pytest.mark.parametrize("first", ["mri_poison.io_utils", "jax"])
def test_the_classic_threefry_whatever_is_imported_first(first):
  out = _python(f"import sys, {first}; print('jax' in sys.modules); import mri_poison, jax; "
                "print(jax.config.jax_threefry_partitionable)")
  assert out == [str(first == "jax"), "False"]


def test_an_explicit_environment_setting_wins():
  out = _python("import mri_poison, jax; print(jax.config.jax_threefry_partitionable)",
                JAX_THREEFRY_PARTITIONABLE="1")
  assert out == ["True"]
