r"""Every GPU claim of the project measured by one command that fits a short GPU loan (issue 23).

One GPU, at most --budget_s (default 480 s = 8 min) wall time including every compilation. Each measurement
("job") runs in its own subprocess, so its peak-memory figures are its own and a crash, OOM or hang of one job
cannot take the others down. A job's time cap is min(its cap, what is left of the budget); a job that needs
more than is left is skipped with a line saying so; a job past its cap is killed (its whole process group) and
reported as "timeout". The command never runs past its budget.

Parts (the issue's numbering) and the targets they are checked against:
  1 U-Net train step, BasicUNet layout (32,32,64,128,256,32), batch 2, bf16, at 128^3 and 64^3, with and
    without model.remat, peak GPU memory of each; beside the peer ../shared/bench/peer_unet3d.py (MONAI eager
    and torch.compile) in its own subprocess.           target: JAX step <= 0.5x torch.compile at 128^3
    Also the 128^3 step with the CPU's depth-folded conv (unet128_folded), so that `model.conv_impl=auto`
    keeping XLA's native conv on the GPU is a measured choice.
  2 PGD-10 at 128^3 batch 2 (bf16), beside torchattacks.PGD on the MONAI model (the peer script times it).
                                                        target: >= 5x faster than torchattacks (bf16 autocast)
  3 eps sweep (4 eps, i-FGSM-5) in one call vs one call per eps, 2D 192^2 batch 8 and 3D 64^3 batch 2.
                                                        target: >= 1.5x in both
  4 study 1's six-model poisoning step, vmapped vs mapped (lax.map) vs sequential (poison.py:brats sizes).
                                                        target: vmapped >= 2x sequential
  5 a few training steps of each study's `brats` variant on the embedded phantom at the full grid
    (gpu_studies.py): no OOM, steps/s.
  6 sliding-window inference of a 240x240x155 volume (window 128^3, overlap 0.5) and a sliding-window PGD-10
    on it.
Jobs run in priority order (what the targets need first), not in part order: see `jobs()`.

Output: --out_dir (default experiments/bench/results/gpu_check/) gets gpu_check.json (environment, per job
status, cap, wall time, numbers, stderr tail when not ok; the ratios against the targets) and gpu_check.md (the
same as tables), both rewritten atomically after every job, so a loan cut short still leaves what was measured;
logs/<job>.{out,err} keep each subprocess's output.

The GPU run: `bash experiments/bench/gpu_prepare.sh` here fills .gpu_wheels/ (41 MiB, 44 wheels for cp312 and
the peer script); then one device `run` with carry [".gpu_wheels"] and timeout_s 600 (the project is run from
the repository root, not installed: the jobs get it on PYTHONPATH):
  pip install -q --no-index --no-deps .gpu_wheels/*.whl && \
  python -m experiments.bench.gpu_check --peer=.gpu_wheels/peer_unet3d.py --out_dir=$OUT/gpu_check
Then paste `python -m experiments.bench.gpu_check --render_results=<files_at>/gpu_check/gpu_check.json` into
experiments/bench/RESULTS.md.

CPU:
  python -m experiments.bench.gpu_check --dry_run --out_dir=/tmp/gpu_dry      # tiny sizes, ~6 min cold (compiles)
  python -m experiments.bench.gpu_check --rehearsal --out_dir=/tmp/gpu_reh   # small sizes, 8 min budget
"""
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

from absl import app, flags

from experiments import launch_utils
from mri_poison import io_utils

_BUDGET = flags.DEFINE_float("budget_s", 480.0, "Wall-time budget of the whole command, compilation included.")
_OUT = flags.DEFINE_string("out_dir", "experiments/bench/results/gpu_check", "Where the JSON, Markdown, logs go.")
_DRY = flags.DEFINE_bool("dry_run", False, "Tiny sizes, float32: the CI check that every job still runs.")
_REHEARSAL = flags.DEFINE_bool("rehearsal", False, "Small CPU sizes: each job's timing and the caps, on CPU.")
_ONLY = flags.DEFINE_list("only", [], "Run only these jobs (names as in the JSON), e.g. unet128,pgd.")
_PEER = flags.DEFINE_string("peer", "", "peer_unet3d.py; empty: .gpu_wheels/ or ../shared/bench/ if there.")
_WORKER = flags.DEFINE_string("worker", "", "Internal: run one job from this JSON spec and exit.")
_RENDER = flags.DEFINE_string("render_results", "", "Print the RESULTS.md GPU section from this JSON and exit.")

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_T0 = time.monotonic()
BASIC_UNET = (32, 32, 64, 128, 256, 32)
TINY = (4, 4, 8, 8, 8, 4)
SMALL = (8, 8, 16, 32, 64, 8)
SLACK_S = 8.0  # kept back from the budget: killing a job's process group and writing the files
MIB = 2 ** 20

# Sizes per mode. "gpu" is the issue's; "rehearsal" and "dry_run" shrink every edge, width and count but run
# the same functions. unet.sizes = (the 128^3 stand-in, the 64^3 stand-in).
PROFILES = {
    "gpu": dict(dtype="bfloat16", unet=dict(sizes=(128, 64), features=BASIC_UNET, batch=2, steps=10),
                peer=dict(steps=10), pgd=dict(size=128, batch=2, features=BASIC_UNET, steps=10, repeats=3),
                sweep=dict(size2d=192, batch2d=8, size3d=64, batch3d=2, features=BASIC_UNET, n_eps=4, steps=5,
                           repeats=3),
                poison=dict(models=6, steps=10, patch=None, batch=None, features=None),
                study=dict(steps=5, n_cases=2, edge=None, features=None, threads=None),
                sliding=dict(spatial=(240, 240, 155), window=128, overlap=0.5, batch=2, features=BASIC_UNET,
                             steps=10)),
    "rehearsal": dict(dtype="float32", unet=dict(sizes=(48, 32), features=SMALL, batch=2, steps=3),
                      peer=dict(steps=3), pgd=dict(size=32, batch=2, features=SMALL, steps=10, repeats=2),
                      sweep=dict(size2d=64, batch2d=4, size3d=32, batch3d=2, features=SMALL, n_eps=4, steps=5,
                                 repeats=2),
                      poison=dict(models=6, steps=3, patch=(32, 32), batch=4, features=(8, 16, 32, 64)),
                      study=dict(steps=3, n_cases=2, edge=32, features=SMALL, threads=2),
                      sliding=dict(spatial=(96, 96, 64), window=32, overlap=0.5, batch=2, features=SMALL,
                                   steps=3)),
    "dry_run": dict(dtype="float32", unet=dict(sizes=(32, 16), features=TINY, batch=2, steps=2),
                    peer=dict(steps=2), pgd=dict(size=16, batch=2, features=TINY, steps=10, repeats=1),
                    sweep=dict(size2d=16, batch2d=2, size3d=16, batch3d=2, features=TINY, n_eps=4, steps=2,
                               repeats=1),
                    poison=dict(models=6, steps=2, patch=(16, 16), batch=2, features=(4, 8, 8, 8)),
                    study=dict(steps=2, n_cases=2, edge=16, features=TINY, threads=1),
                    sliding=dict(spatial=(40, 40, 24), window=16, overlap=0.5, batch=2, features=TINY, steps=2)),
}
# (cap, need) seconds per job and mode: need = the least time left for which starting the job is worth it.
CAPS = {"gpu": dict(unet128=(60, 25), unet64=(40, 15), peer128=(150, 60), peer64=(90, 40), pgd=(60, 20),
                    sweep=(75, 25), poison=(60, 20), sliding=(90, 30), study=(90, 40)),
        "rehearsal": dict(unet128=(60, 15), unet64=(40, 10), peer128=(60, 10), peer64=(60, 10), pgd=(40, 10),
                          sweep=(60, 15), poison=(90, 15), sliding=(60, 15), study=(90, 30)),
        # CPU compiles are slow (the mapped layout's lax.map program alone takes ~30 s on 2 cores)
        "dry_run": dict(unet128=(60, 4), unet64=(60, 4), peer128=(60, 2), peer64=(60, 2), pgd=(60, 4),
                        sweep=(90, 4), poison=(120, 4), sliding=(90, 4), study=(120, 8))}
PARTS = {1: "U-Net train step (BasicUNet, batch 2) beside MONAI", 2: "PGD-10 at 128^3 beside torchattacks",
         3: "eps sweep: one call vs separate calls", 4: "six-model poisoning step: vmapped / mapped / sequential",
         5: "study smokes (brats variants, phantom)", 6: "sliding window 240x240x155: inference and PGD"}
STUDIES = ("robustify", "poison", "deform", "unlearnable")


def jobs(mode: str) -> list[dict]:
  """The jobs in run order: the 128^3 U-Net and its peer, then the other targets, then the rest."""
  p, caps = PROFILES[mode], CAPS[mode]
  big, small = p["unet"]["sizes"]
  unet = lambda size, remat, cap, conv_impl="auto": dict(
      part=1, kind="unet", cap=cap, args=dict(**p["unet"], size=size, remat=remat, dtype=p["dtype"],
                                              conv_impl=conv_impl))
  out = [dict(name="unet128", **unet(big, False, "unet128")),
         # The CPU's depth-folded conv timed on the GPU too, so that `conv_impl=auto` is a measured choice there.
         dict(name="unet128_folded", **unet(big, False, "unet128", "folded")),
         dict(name="unet128_remat", **unet(big, True, "unet128")),
         dict(name="peer128", part=1, kind="peer", cap="peer128", args=dict(size=big, batch=2, **p["peer"])),
         dict(name="pgd", part=2, kind="pgd", cap="pgd", args=dict(**p["pgd"], dtype=p["dtype"])),
         dict(name="sweep", part=3, kind="sweep", cap="sweep", args=dict(**p["sweep"], dtype=p["dtype"])),
         dict(name="poison", part=4, kind="poison", cap="poison", args=dict(**p["poison"], dtype=p["dtype"])),
         dict(name="sliding", part=6, kind="sliding", cap="sliding", args=dict(**p["sliding"], dtype=p["dtype"]))]
  # The studies keep their own dtype (bfloat16) on the GPU; CPU runs use float32.
  study_dtype = None if mode == "gpu" else p["dtype"]
  out += [dict(name=f"study_{s}", part=5, kind="study", cap="study",
               args=dict(study=s, dtype=study_dtype, **p["study"]))
          for s in STUDIES]
  out += [dict(name="unet64", **unet(small, False, "unet64")), dict(name="unet64_remat", **unet(small, True, "unet64")),
          dict(name="peer64", part=1, kind="peer", cap="peer64", args=dict(size=small, batch=2, **p["peer"]))]
  for j in out:
    j["cap_s"], j["need_s"] = (float(x) for x in caps[j.pop("cap")])
  return out


# ----------------------------------------------------------------------------------------------- workers
# Each runs inside its own subprocess (`--worker`), imports jax there, and returns a JSON-able dict.

def _report(line: str):
  print(line, flush=True)


def _device() -> str:
  import jax
  d = jax.devices()[0]
  return f"{d.platform}: {d.device_kind}"


def _work_unet(a: dict) -> dict:
  from experiments.bench import unet
  from experiments.configs import unet as cfg_lib
  config = cfg_lib.get_config("brats3d,basic_unet")
  config.model.features = tuple(a["features"])
  config.model.conv_impl = a["conv_impl"]
  out = unet.measure_train_step(config, size=a["size"], batch=a["batch"], steps=a["steps"], dtype=a["dtype"],
                                remat=a["remat"], report=_report)
  del out["state"], out["model"]
  return out


def _work_pgd(a: dict) -> dict:
  from experiments.bench import attacks
  _, _, x, _, loss_fn = attacks.problem(3, a["size"], a["batch"], features=a["features"], dtype=a["dtype"])
  return attacks.measure_pgd(loss_fn, x, steps=a["steps"], repeats=a["repeats"], report=_report,
                             tag=f"3D {a['size']}^3 batch {a['batch']} {a['dtype']}")


def _work_sweep(a: dict) -> dict:
  from experiments.bench import attacks
  out = {}
  for ndim, size, batch in ((2, a["size2d"], a["batch2d"]), (3, a["size3d"], a["batch3d"])):
    _, _, x, _, loss_fn = attacks.problem(ndim, size, batch, features=a["features"], dtype=a["dtype"])
    out[f"{ndim}d"] = dict(size=size, batch=batch, **attacks.measure_sweep(
        loss_fn, x, n_eps=a["n_eps"], steps=a["steps"], repeats=a["repeats"], report=_report,
        tag=f"{ndim}D {size}^{ndim} batch {batch} {a['dtype']}"))
  return out


def _work_poison(a: dict) -> dict:
  from experiments.bench import poison_sweep
  from experiments.configs import poison as cfg_lib
  config = cfg_lib.get_config("brats")
  config.model.dtype = a["dtype"]
  if a["patch"]:
    config.data.patch_shape = tuple(a["patch"])
  if a["batch"]:
    config.data.batch_size = int(a["batch"])
  if a["features"]:
    config.model.features = tuple(a["features"])
  return poison_sweep.measure(config, models=a["models"], steps=a["steps"], report=_report)


def _work_study(a: dict) -> dict:
  import shutil
  from experiments.bench import gpu_studies
  workdir = tempfile.mkdtemp(prefix=f"gpu_check_{a['study']}_")
  try:  # checkpoints of full-size models: not kept
    return getattr(gpu_studies, a["study"])(workdir, steps=a["steps"], n_cases=a["n_cases"], edge=a["edge"],
                                            features=a["features"], threads=a["threads"], dtype=a["dtype"],
                                            report=_report)
  finally:
    shutil.rmtree(workdir, ignore_errors=True)


def _work_sliding(a: dict) -> dict:
  from experiments.bench import attacks, timing
  apply_fn, params, x, labels, _ = attacks.problem(3, a["window"], 1, features=a["features"], dtype=a["dtype"],
                                                   spatial=a["spatial"])
  window = (int(a["window"]),) * 3
  infer = timing.measure_sliding_window(apply_fn, params, x[0], window=window, overlap=a["overlap"],
                                        batch=a["batch"], repeats=2, report=_report)
  attack = attacks.measure_sliding_window_attack(apply_fn, params, x, labels, window=window, overlap=a["overlap"],
                                                 batch=a["batch"], steps=a["steps"], repeats=1, report=_report)
  return {"inference": infer, "attack": attack, "spatial": list(a["spatial"]), "window": list(window)}


WORKERS = dict(unet=_work_unet, pgd=_work_pgd, sweep=_work_sweep, poison=_work_poison, study=_work_study,
               sliding=_work_sliding)


def worker_main(spec: dict) -> None:
  from experiments.bench import timing
  result = WORKERS[spec["kind"]](spec["args"])
  result.update(device=_device(), peak=timing.peak_memory())
  io_utils.write_json(spec["result"], result)


# --------------------------------------------------------------------------------------------- the peer
# peer_unet3d.py is run as it is (it is not ours): this wrapper adds its CUDA check and torch's peak memory.
_PEER_WRAPPER = r"""
import json, os, runpy, sys
import torch
if not torch.cuda.is_available():
  print("SKIP: torch sees no CUDA GPU (the peer times CUDA only)", flush=True)
  sys.exit(3)
runpy.run_path(sys.argv[1], run_name="__main__")
print("PEAK " + json.dumps({"torch_max_memory_allocated_bytes": torch.cuda.max_memory_allocated()}), flush=True)
"""
_SKIP_RC = 3


def peer_path() -> str:
  for path in ([_PEER.value] if _PEER.value else
               [os.path.join(_REPO, ".gpu_wheels", "peer_unet3d.py"),
                os.path.join(os.path.dirname(_REPO), "shared", "bench", "peer_unet3d.py")]):
    if os.path.isfile(path):
      return os.path.abspath(path)
  if _PEER.value:
    raise app.UsageError(f"--peer={_PEER.value}: no such file")
  return ""


def _peer_missing() -> str:
  import importlib.util
  for name in ("torch", "monai", "torchattacks"):
    if importlib.util.find_spec(name) is None:
      return f"{name} not installed"
  return "" if peer_path() else "peer_unet3d.py not found (--peer)"


# ------------------------------------------------------------------------------------------- scheduling

def _tail(path: str, n: int = 2000) -> str:
  try:
    with open(path, errors="replace") as f:
      return f.read()[-n:]
  except OSError:
    return ""


def run_job(job: dict, cap_s: float, out_dir: str) -> dict:
  """Runs one job in its own session (process group) with a hard `cap_s`; returns status and numbers."""
  logs = os.path.join(out_dir, "logs")
  os.makedirs(logs, exist_ok=True)
  out_path, err_path = (os.path.join(logs, f"{job['name']}.{x}") for x in ("out", "err"))
  result_path = os.path.join(logs, f"{job['name']}.result.json")
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (_REPO, os.environ.get("PYTHONPATH")) if p))
  if job["kind"] == "peer":
    peer_out = os.path.join(logs, f"{job['name']}_peer")
    os.makedirs(peer_out, exist_ok=True)
    a = job["args"]
    env.update(B=str(a["batch"]), S=str(a["size"]), STEPS=str(a["steps"]), OUT=peer_out, COMPILE="1")
    cmd = [sys.executable, "-c", _PEER_WRAPPER, peer_path()]
  else:
    spec = dict(kind=job["kind"], args=job["args"], result=result_path)
    cmd = [sys.executable, "-m", "experiments.bench.gpu_check", f"--worker={json.dumps(spec)}"]
  if os.path.exists(result_path):
    os.remove(result_path)
  t = time.monotonic()
  with open(out_path, "w") as out, open(err_path, "w") as err:
    proc = subprocess.Popen(cmd, cwd=_REPO, env=env, stdout=out, stderr=err, start_new_session=True)
    try:
      rc = proc.wait(timeout=cap_s)
    except subprocess.TimeoutExpired:
      rc = None
      _kill_group(proc)
    except BaseException:  # Ctrl-C / SIGTERM of this command: the job has its own session, end it too
      _kill_group(proc)
      raise
  rec = dict(wall_s=time.monotonic() - t, cap_s=cap_s)
  stdout = _tail(out_path, 100_000)
  if rc is None:
    rec.update(status="timeout", reason=f"killed at its cap of {cap_s:.0f} s")
  elif job["kind"] == "peer" and rc == _SKIP_RC:
    rec.update(status="skipped", reason=stdout.split("SKIP: ", 1)[-1].strip())
  elif rc != 0:
    rec.update(status="failed", reason=f"exit code {rc}")
  else:
    rec["status"] = "ok"
  if job["kind"] == "peer":
    rec["result"] = _peer_result(peer_out, stdout)
  elif os.path.exists(result_path):
    with open(result_path) as f:
      rec["result"] = json.load(f)
  if rec["status"] == "ok" and not rec.get("result"):
    rec.update(status="failed", reason="exited 0 without a result")
  if rec["status"] != "ok":
    rec["stderr_tail"] = _tail(err_path)
  rec["lines"] = [l for l in stdout.splitlines() if l.strip() and not l.startswith(("PEAK ", "{", "}", ' "'))][-12:]
  return rec


def _kill_group(proc) -> None:
  """SIGTERM to the job's whole process group (torch.compile and grain start children), SIGKILL after 3 s."""
  for sig, wait in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 5.0)):
    try:
      os.killpg(proc.pid, sig)
    except ProcessLookupError:
      return
    try:
      proc.wait(timeout=wait)
      return
    except subprocess.TimeoutExpired:
      continue


def _peer_result(peer_out: str, stdout: str) -> dict:
  out = {}
  for name in os.listdir(peer_out) if os.path.isdir(peer_out) else ():
    if name.startswith("peer_") and name.endswith(".json"):
      with open(os.path.join(peer_out, name)) as f:
        out.update(json.load(f))
  for line in stdout.splitlines():
    if line.startswith("PEAK "):
      out.update(json.loads(line[5:]))
  return out


def check(mode: str, budget_s: float, out_dir: str, only=(), report=print) -> dict:
  """Runs the jobs of `mode` within `budget_s` seconds from process start; returns (and writes) the summary."""
  from experiments.bench import timing
  summary = dict(mode=mode, budget_s=budget_s, environment=timing.environment(), profile=PROFILES[mode],
                 parts={str(k): v for k, v in PARTS.items()}, jobs=[])
  report(f"gpu_check {mode}: budget {budget_s:.0f} s; {timing.describe(summary['environment'])}")
  selected = [j for j in jobs(mode) if not only or j["name"] in only]
  unknown = set(only) - {j["name"] for j in jobs(mode)}
  if unknown:
    raise app.UsageError(f"--only: unknown jobs {sorted(unknown)}; expected some of {[j['name'] for j in jobs(mode)]}")
  for job in selected:
    elapsed = time.monotonic() - _T0
    left = budget_s - elapsed - SLACK_S
    head = f"[{elapsed:6.1f} s, {max(left, 0):5.0f} s left] part {job['part']} {job['name']}"
    rec = dict(name=job["name"], part=job["part"], kind=job["kind"], args=job["args"], cap_s=job["cap_s"])
    missing = _peer_missing() if job["kind"] == "peer" else ""
    if missing:
      rec.update(status="skipped", reason=missing)
    elif left < job["need_s"]:
      rec.update(status="skipped", reason=f"needs >= {job['need_s']:.0f} s, {max(left, 0):.0f} s left of the budget")
    else:
      cap = min(job["cap_s"], left)
      report(f"{head}: running, cap {cap:.0f} s")
      rec.update(run_job(job, cap, out_dir))
      for line in rec.pop("lines"):
        report(f"    {line}")
    report(f"{head}: {rec['status']}" + (f" ({rec['reason']})" if rec.get("reason") else "")
           + (f" in {rec['wall_s']:.1f} s" if "wall_s" in rec else ""))
    summary["jobs"].append(rec)
    _finish(summary, out_dir)
  summary = _finish(summary, out_dir)
  report(f"gpu_check done in {summary['elapsed_s']:.1f} s: " + ", ".join(
      f"{s} {n}" for s, n in summary["status_counts"].items()) + f"; {os.path.join(out_dir, 'gpu_check.json')}")
  return summary


def _finish(summary: dict, out_dir: str) -> dict:
  summary["elapsed_s"] = time.monotonic() - _T0
  summary["status_counts"] = {s: sum(j["status"] == s for j in summary["jobs"])
                              for s in ("ok", "skipped", "timeout", "failed")}
  summary["ratios"] = ratios(summary)
  io_utils.write_json(os.path.join(out_dir, "gpu_check.json"), summary)
  io_utils.write_text(os.path.join(out_dir, "gpu_check.md"), markdown(summary))
  return summary


# ------------------------------------------------------------------------------------- ratios, rendering

TARGETS = {  # name: (what, target, "<=" or ">=")
    "unet_step_vs_torch_compile_128": ("JAX U-Net step / torch.compile step, bf16, 128^3", 0.5, "<="),
    "pgd10_speedup_vs_torchattacks": ("torchattacks PGD-10 (bf16 autocast) / JAX PGD-10, 128^3", 5.0, ">="),
    "sweep_speedup_2d": ("separate calls / one sweep call, 2D", 1.5, ">="),
    "sweep_speedup_3d": ("separate calls / one sweep call, 3D 64^3", 1.5, ">="),
    "vmapped_vs_sequential": ("six sequential steps / one vmapped six-model step", 2.0, ">="),
    "mapped_vs_sequential": ("six sequential steps / one mapped (lax.map) step (not a target)", None, ">="),
}


def _result(summary, name):
  job = next((j for j in summary["jobs"] if j["name"] == name), None)
  if job is None:
    return None, f"{name} not run"
  if job["status"] != "ok" and not (job["kind"] == "peer" and job.get("result")):
    return None, f"{name} {job['status']}" + (f": {job['reason']}" if job.get("reason") else "")
  return job.get("result") or {}, ""


def ratios(summary: dict) -> dict:
  """Each target's ratio from the jobs' numbers: {value, target, op, met (None when not measurable), note}."""
  def ratio(num, den):
    return num / den if num and den else None
  values, notes = {}, {}
  unet, why_u = _result(summary, "unet128")
  peer, why_p = _result(summary, "peer128")
  pgd, why_g = _result(summary, "pgd")
  sweep, why_s = _result(summary, "sweep")
  poison, why_m = _result(summary, "poison")
  compile_s = (peer or {}).get("torch_compile_bf16_train_step_s")
  values["unet_step_vs_torch_compile_128"] = ratio(unet and unet.get("step_ms"), compile_s and 1e3 * compile_s)
  notes["unet_step_vs_torch_compile_128"] = why_u or why_p or ("" if compile_s else "peer has no torch.compile time")
  ta = (peer or {}).get("torchattacks_pgd10_bf16_s")
  values["pgd10_speedup_vs_torchattacks"] = ratio(ta and 1e3 * ta, pgd and pgd.get("pgd_ms"))
  notes["pgd10_speedup_vs_torchattacks"] = why_g or why_p
  for d in ("2d", "3d"):
    values[f"sweep_speedup_{d}"] = ((sweep or {}).get(d) or {}).get("speedup")
    notes[f"sweep_speedup_{d}"] = why_s
  for layout in ("vmapped", "mapped"):
    values[f"{layout}_vs_sequential"] = (poison or {}).get(f"{layout}_speedup")
    notes[f"{layout}_vs_sequential"] = why_m
  out = {}
  for name, (what, target, op) in TARGETS.items():
    v = values[name]
    met = None if v is None or target is None else (v <= target if op == "<=" else v >= target)
    out[name] = dict(what=what, value=v, target=target, op=op, met=met, note=notes[name] if v is None else "")
  return out


def _mib(x):
  return f"{x / MIB:.0f} MiB" if x else "n/a"


def _peak(r: dict) -> str:
  p = r.get("peak") or {}
  if p.get("device_peak_bytes"):
    return f"peak GPU {_mib(p['device_peak_bytes'])}"
  return f"peak RSS {_mib(p.get('host_max_rss_bytes'))}" if p else ""


def headline(job: dict) -> str:
  """The job's numbers in one cell."""
  r = job.get("result") or {}
  if not r:
    return ""
  k = job["kind"]
  if k == "unet":
    return (f"{r['step_ms']:.1f} ms/step, compile {r['compile_s']:.1f} s, {r['params'] / 1e6:.2f}M params, "
            f"{_peak(r)}, XLA temp {_mib((r.get('memory') or {}).get('temp_size_in_bytes'))}")
  if k == "peer":
    keys = (("eager bf16", "torch_bf16_amp_train_step_s"), ("torch.compile bf16", "torch_compile_bf16_train_step_s"),
            ("torchattacks PGD-10 bf16", "torchattacks_pgd10_bf16_s"), ("fp32", "torchattacks_pgd10_fp32_s"))
    cells = [f"{n} {1e3 * r[key]:.1f} ms" for n, key in keys if r.get(key)]
    if r.get("torch_max_memory_allocated_bytes"):
      cells.append(f"torch peak {_mib(r['torch_max_memory_allocated_bytes'])} (all its configs)")
    return ", ".join(cells) + (f"; {r['torch_compile_error'][:80]}" if r.get("torch_compile_error") else "")
  if k == "pgd":
    return f"PGD-{r['steps']} {r['pgd_ms']:.1f} ms/batch, first call {r['pgd_first_s']:.1f} s, {_peak(r)}"
  if k == "sweep":
    return "; ".join(f"{d.upper()} {s['size']}^{d[0]} b{s['batch']}: sweep {s['sweep_ms']:.1f} ms vs separate "
                     f"{s['separate_ms']:.1f} ms = {s['speedup']:.2f}x" for d, s in r.items() if isinstance(s, dict)
                     and "speedup" in s)
  if k == "poison":
    cells = [f"{n} {r[n + '_ms']:.1f} ms" for n in ("vmapped", "mapped", "sequential") if n + "_ms" in r]
    sp = [f"{n} {r[n + '_speedup']:.2f}x" for n in ("vmapped", "mapped") if n + "_speedup" in r]
    return ", ".join(cells) + f" (vs sequential: {', '.join(sp)}); {r.get('grouped_convs')} grouped convs; {_peak(r)}"
  if k == "study":
    stages = {n: s for n, s in r.items() if isinstance(s, dict) and "steps" in s}
    return "; ".join(f"{n} {s['steps']} steps, first {s.get('first_step_s', float('nan')):.1f} s, "
                     + (f"{s['steps_per_s']:.2f} steps/s" if s.get("steps_per_s") else "no rate")
                     for n, s in stages.items()) + f"; {_peak(r)}"
  if k == "sliding":
    i, a = r["inference"], r["attack"]
    return (f"{'x'.join(map(str, r['spatial']))}, window {r['window'][0]}^3: inference {i['ms']:.0f} ms "
            f"({i['windows']} windows), PGD-{a['steps']} {a['pgd_ms'] / 1e3:.2f} s (first {a['pgd_first_s']:.1f} s); "
            f"{_peak(r)}")
  return ""


def _fmt(x):
  return "n/a" if x is None else f"{x:.2f}"


def markdown(summary: dict) -> str:
  from experiments.bench import timing
  lines = [f"# gpu_check ({summary['mode']})", "", timing.describe(summary["environment"]), "",
           f"Budget {summary['budget_s']:.0f} s, elapsed {summary.get('elapsed_s', 0):.1f} s.", "",
           "| part | job | status | wall s / cap s | numbers |", "|---|---|---|---|---|"]
  for j in summary["jobs"]:
    status = j["status"] + (f": {j['reason']}" if j.get("reason") else "")
    wall = f"{j['wall_s']:.1f} / {j['cap_s']:.0f}" if "wall_s" in j else f"- / {j['cap_s']:.0f}"
    lines.append(f"| {j['part']} | {j['name']} | {status} | {wall} | {headline(j)} |")
  lines += ["", "| ratio | value | target | met |", "|---|---|---|---|"]
  for r in summary["ratios"].values():
    target = f"{r['op']} {r['target']}" if r["target"] is not None else "-"
    met = {True: "yes", False: "NO", None: "n/a"}[r["met"]] + (f" ({r['note']})" if r.get("note") else "")
    lines.append(f"| {r['what']} | {_fmt(r['value'])} | {target} | {met} |")
  return "\n".join(lines) + "\n"


def results_section(summary: dict) -> str:
  """The "GPU check" section of experiments/bench/RESULTS.md written from one gpu_check.json."""
  env = summary["environment"]
  gpu = "; ".join(f"{g['name']} (driver {g['driver']}, {g['memory']})" for g in env["gpus"]) or "no GPU"
  table = markdown(summary).split("\n", 4)[4]  # drop the title and environment lines: they are restated here
  return (f"### GPU check run of {env['date'][:10]} ({summary['mode']})\n\n"
          f"`python -m experiments.bench.gpu_check` on {gpu}; {timing_versions(env)}.\n\n" + table)


def timing_versions(env: dict) -> str:
  return ", ".join(f"{k} {v}" for k, v in env["versions"].items())


def main(argv):
  del argv
  if _WORKER.value:
    worker_main(json.loads(_WORKER.value))
    return
  if _RENDER.value:
    with open(_RENDER.value) as f:
      print(results_section(json.load(f)))
    return
  if _DRY.value and _REHEARSAL.value:
    raise app.UsageError("--dry_run and --rehearsal: give at most one")
  if _BUDGET.value <= SLACK_S:
    raise app.UsageError(f"--budget_s={_BUDGET.value}: must exceed the {SLACK_S:.0f} s kept for cleanup")
  signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # -> SystemExit in run_job, which ends the job
  mode = "dry_run" if _DRY.value else "rehearsal" if _REHEARSAL.value else "gpu"
  summary = check(mode, float(_BUDGET.value), _OUT.value, only=tuple(_ONLY.value))
  # Exit 1 only when a job failed: a skip (no time, no peer) or a job stopped at its cap (a loaded or slow
  # machine) is reported with its reason and is not an error of the code.
  sys.exit(1 if summary["status_counts"]["failed"] else 0)


if __name__ == "__main__":
  launch_utils.run_plain(main)
