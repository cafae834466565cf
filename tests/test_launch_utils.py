"""Launchers: --help lists the variants, --print_config shows comments, errors are one line (exit codes), a
full disk too."""
import errno
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def launch(*args):
  env = {k: v for k, v in os.environ.items() if k != "MRI_POISON_TRACEBACK"}
  return subprocess.run([sys.executable, "-m", "experiments.train", *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=300)


def test_help_lists_variants_and_exits_zero():
  out = launch("--help")
  assert out.returncode == 0, out.stderr[-2000:]
  assert "variants (file.py:variant): runlocal, phantom2d, phantom3d, brats3d" in out.stdout


def test_print_config_shows_values_with_comments_and_exits_zero():
  out = launch("--config", "experiments/configs/unet.py:phantom2d", "--print_config", "--config.train.steps=7")
  assert out.returncode == 0, out.stderr[-2000:]
  lines = out.stdout.splitlines()
  assert "train.steps = 7" in lines
  assert any(l.startswith("data.batch_size = 8  # global batch") for l in lines)


def test_a_misspelt_field_is_one_line_naming_the_fix(tmp_path):
  out = launch("--workdir", str(tmp_path), "--config.train.stepz=3")
  assert out.returncode == 1
  err = [l for l in out.stderr.splitlines() if l.strip()]
  assert len(err) == 1 and 'Did you mean "steps" instead of "stepz"?' in err[0] and "\\n" not in err[0], err
  assert not os.listdir(tmp_path)  # nothing written


def test_an_unknown_section_gets_the_closest_fields():
  from experiments import launch_utils
  hint = launch_utils.unknown_override_hint(["--config.data.root=/x", "--config.seed=1"],
                                            "experiments/configs/reproduce.py")
  assert hint.startswith("--config.data.root names no field of experiments/configs/reproduce.py; did you mean "
                         "--config.data_root or ") and "seed" not in hint
  assert launch_utils.unknown_override_hint(["--config.zzz=1"], "experiments/configs/unet.py:runlocal").endswith(
      "(--print_config lists them)")
  assert launch_utils.unknown_override_hint(["--config.train.steps=1"], "experiments/configs/unet.py") == ""


def test_main_job_print_config_keeps_each_studys_comments():
  out = subprocess.run([sys.executable, "-m", "experiments.reproduce", "--print_config"], cwd=REPO,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  lines = out.stdout.splitlines()
  assert any(l.startswith("stages = ('robustify', 'poison', 'deform', 'unlearnable')") for l in lines)
  assert any(l.startswith("robustify.attack.eps = ") and "z-score" in l for l in lines)
  assert any(l.startswith("poison.sweep.ks = ") and "synthetic shares" in l for l in lines)


_FILLS_THE_DISK = """
from absl import flags
from experiments import launch_utils
flags.DEFINE_string("workdir", "", "")

def main(argv):
  try:
    with open("/dev/full", "w") as f:  # every write: ENOSPC, as on a full disk
      f.write("checkpoint bytes")
      f.flush()
  except OSError as e:  # a checkpoint library wraps it in its own error with a multi-line message
    raise ValueError("save failed\\n  Traceback (most recent call last): ...\\n" + str(e)) from e

launch_utils.run_plain(main)
"""


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full to make a real ENOSPC")
def test_a_full_disk_is_one_line_naming_the_folder(tmp_path):
  env = {k: v for k, v in os.environ.items() if k != "MRI_POISON_TRACEBACK"}
  out = subprocess.run([sys.executable, "-c", _FILLS_THE_DISK, f"--workdir={tmp_path}/run"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=120)
  assert out.returncode == 1
  err = [l for l in out.stderr.splitlines() if l.strip()]
  assert len(err) == 1 and err[0].startswith(f"error: the disk is full writing {tmp_path}/run (") and \
      "MiB free there" in err[0], err
  from experiments import launch_utils
  assert launch_utils._disk_full(ValueError("write: [Errno 28] No space left on device")) == (True, None)
  assert launch_utils._disk_full(OSError(errno.EDQUOT, "quota", "/x/ckpt")) == (True, "/x/ckpt")
  assert launch_utils._disk_full(OSError(errno.ENOENT, "gone", "/x")) == (False, None)


def test_commands_without_a_config_file_show_help_and_exit_zero():
  out = subprocess.run([sys.executable, "-m", "experiments.make_phantom", "--help"], cwd=REPO, capture_output=True,
                       text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  assert "--out" in out.stdout and "Flags:" in out.stdout


def test_field_comments_are_keyed_by_section_and_only_for_assignments(tmp_path):
  from experiments import launch_utils
  source = tmp_path / "config.py"
  source.write_text(
      "import ml_collections\n"
      "def get_config(variant):\n"
      "  config = ml_collections.ConfigDict()\n"
      "  config.train = ml_collections.ConfigDict(dict(\n"
      "      steps=100,  # train steps\n"
      "      lr=1e-3, warmup=5))  # warm-up steps\n"
      "  config.steps = 3  # top-level steps\n"
      "  config.attack.update(dict(steps=2,  # attack steps\n"
      "                            eps=0.1))\n"
      "  if variant == 'x':  # a condition, not a field\n"
      "    config.seed = 0\n"
      "  return ml_collections.ConfigDict(dict(batch_size=8))  # global batch\n")
  assert launch_utils.field_comments(str(source)) == {
      "train.steps": "train steps", "train.warmup": "warm-up steps", "steps": "top-level steps",
      "attack.steps": "attack steps", "batch_size": "global batch"}
