"""launch/ scripts, run against stand-ins for sbatch and srun that record their arguments."""
import os
import subprocess

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _fake_bin(tmp_path):
  """A bin folder whose sbatch / srun append their arguments (one per line, then "--end--") to calls.txt."""
  bin_dir, log = tmp_path / "bin", tmp_path / "calls.txt"
  bin_dir.mkdir()
  for name in ("sbatch", "srun"):
    (bin_dir / name).write_text(
        "#!/usr/bin/env bash\n"
        f'{{ echo {name}; printf "%s\\n" "$@"; echo --end--; }} >> {log}\n'
        f'echo $(( 100 + $(grep -c -x {name} {log}) ))\n')
    (bin_dir / name).chmod(0o755)
  return bin_dir, log


def _calls(log):
  calls, current = [], None
  for line in log.read_text().splitlines():
    if current is None:
      current = [line]
    elif line == "--end--":
      calls.append(current)
      current = None
    else:
      current.append(line)
  return calls


def test_cells_submits_train_then_the_array_then_the_report(tmp_path):
  bin_dir, log = _fake_bin(tmp_path)
  flags = ["--config", "experiments/configs/robustify.py:brats", "--workdir", "/shared/runs/r w"]
  out = subprocess.run(["bash", "launch/cells.sh", "3", "experiments/robustify.py", *flags], cwd=REPO, text=True,
                       capture_output=True, env=dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}"))
  assert out.returncode == 0, out.stderr
  assert out.stdout.strip() == "submitted: train 101, cells 102 (array of 3), report 103"
  train, cells, report = _calls(log)
  script = ["launch/slurm.sbatch", "experiments/robustify.py", *flags]
  assert train == ["sbatch", "--parsable", "--job-name=mri_poison_train", *script, "--config.eval.cells=none"]
  assert cells == ["sbatch", "--parsable", "--job-name=mri_poison_cells", "--dependency=afterok:101", "--array=0-2",
                   *script, "--config.eval.cells={task}"]
  assert report == ["sbatch", "--parsable", "--job-name=mri_poison_report", "--dependency=afterok:102", *script]
  bad = subprocess.run(["bash", "launch/cells.sh", "0", "experiments/robustify.py"], cwd=REPO, text=True,
                       capture_output=True)
  assert bad.returncode == 2 and "usage" in bad.stderr


def test_slurm_sbatch_fills_in_the_array_task(tmp_path):
  bin_dir, log = _fake_bin(tmp_path)
  env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", PYTHON="py")
  args = ["bash", "launch/slurm.sbatch", "experiments/robustify.py", "--workdir", "/w", "--config.eval.cells={task}"]
  for array, expected in [({}, "{task}"), ({"SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_COUNT": "5"}, "2/5")]:
    out = subprocess.run(args, cwd=REPO, text=True, capture_output=True, env=dict(env, **array))
    assert out.returncode == 0, out.stderr
    assert _calls(log)[-1] == ["srun", "--kill-on-bad-exit=1", "py", "-m", "experiments.robustify", "--workdir", "/w",
                               f"--config.eval.cells={expected}"]
