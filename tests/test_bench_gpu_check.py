"""experiments/bench/gpu_check.py: the dry run of every GPU job, and the budget / cap / skip logic."""
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(out_dir, *flags, timeout=900):
  t = time.monotonic()
  proc = subprocess.run([sys.executable, "-m", "experiments.bench.gpu_check", "--dry_run", f"--out_dir={out_dir}",
                         *flags], cwd=REPO, capture_output=True, text=True, timeout=timeout)
  with open(os.path.join(out_dir, "gpu_check.json")) as f:
    return proc, json.load(f), time.monotonic() - t


def test_dry_run_within_its_budget(tmp_path):
  """Two jobs run to the end (the full dry run, 14 jobs, is ~6 min of compiles: `python -m
  experiments.bench.gpu_check --dry_run`), and a job that does not fit a budget is skipped saying why: the
  command returns within its budget either way."""
  # unet128 and pgd take ~25 s each on 2 loaded cores (their compiles); 120 s leaves each its whole 60 s cap, so a
  # loaded machine slows them without stopping them.
  budget = 120.0
  proc, summary, wall = _run(tmp_path, f"--budget_s={budget}", "--only=unet128,pgd")
  assert wall <= budget + 8, wall  # + interpreter start-up and the final write
  jobs = {j["name"]: j for j in summary["jobs"]}
  assert len(jobs) == 2
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  for name, job in jobs.items():
    assert job["status"] == "ok", (name, job.get("reason"), job.get("stderr_tail"))
    assert 0 < job["wall_s"] <= job["cap_s"] + 1 and job["cap_s"] <= budget
  # The study smoke (~100 s cold) under a 12 s budget (8 s of it kept for cleanup): skipped saying why, exit 0.
  tight, short, short_wall = _run(tmp_path / "tight", "--budget_s=12", "--only=study_unlearnable")
  (study,) = short["jobs"]
  assert tight.returncode == 0 and short_wall <= 12 + 8
  assert study["status"] == "skipped" and "left of the budget" in study["reason"]
  assert jobs["unet128"]["result"]["step_ms"] > 0 and jobs["unet128"]["result"]["peak"]["host_max_rss_bytes"] > 0
  assert jobs["pgd"]["result"]["pgd_ms"] > 0 and jobs["pgd"]["result"]["steps"] == 10
  ratios = summary["ratios"]
  assert set(ratios) >= {"unet_step_vs_torch_compile_128", "pgd10_speedup_vs_torchattacks", "sweep_speedup_2d",
                         "sweep_speedup_3d", "vmapped_vs_sequential"}
  assert ratios["vmapped_vs_sequential"]["met"] is None  # the poisoning job did not run
  assert ratios["vmapped_vs_sequential"]["target"] == 2.0 and ratios["sweep_speedup_2d"]["target"] == 1.5
  assert ratios["unet_step_vs_torch_compile_128"]["met"] is None  # the peer did not run: said why
  assert "peer128" in ratios["unet_step_vs_torch_compile_128"]["note"]
  md = (tmp_path / "gpu_check.md").read_text()
  assert "| 1 | unet128 | ok |" in md
  assert "# gpu_check" not in __import__("experiments.bench.gpu_check", fromlist=["x"]).results_section(summary)
  assert not [p for p in os.listdir(tmp_path) if ".tmp" in p]  # atomic writes left nothing behind
