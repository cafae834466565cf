"""Multi-process jobs (jax.distributed on 127.0.0.1, one CPU device per process) equal one process.

Training:

Three jobs of a tiny 2D U-Net on 8 phantom cases, global batch 4, all through `loop.train_model`:
  one:    1 process, 4 steps, then resumed in the same process to 6 steps.
  two:    2 processes, 4 steps (checkpoints at 2 and 4).
  resume: 1 process resumes `two`'s workdir to 6 steps (a 2-process checkpoint on another process count).
Each worker records the record indices of the rows it fed to every step and which workdir files it wrote.
Evaluation: study 2's evaluation cells of one victim, on 1 process and on 2 (batches shared out).
"""
import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Params after 4 (and 6) Adam steps: the 2-process gradient is the 1-process one summed in another order, so
# they differ in float32 rounding only: measured max |diff| 3e-8 on weights of size ~0.005-1. Excluded: the
# bias of a conv that feeds an instance norm. The norm subtracts it again, so its true gradient is exactly 0
# and Adam scales the float rounding noise of that 0 up to lr-sized steps (measured |diff| up to 2e-3), in 1
# process and 2 alike; it does not change the network's output.
PARAMS_ATOL = 1e-6


def _config(steps):
  from experiments.configs.unet import get_config
  config = get_config("runlocal")
  config.data.update(dict(batch_size=4, patch_shape=(16, 16), read_threads=1, prefetch=1))
  config.model.features = (4, 8)
  config.train.update(dict(steps=steps, schedule_steps=6, ckpt_every=2, keep_checkpoints=3, log_every=1,
                           warmup_steps=2, eval_every=0))
  return config


def _cases():
  from mri_poison.data.phantom import make_case
  return [make_case(seed, shape=(16, 16, 16)) for seed in range(8)]


def _worker(workdir, steps, out):
  """One process of a job: trains to each step count in `steps` on `workdir`; writes `out`-<process>.npz/json."""
  from experiments import launch_utils
  launch_utils.init_processes(multiprocess=int(os.environ.get("JAX_NUM_PROCESSES", "1")) > 1)
  import jax
  from mri_poison import io_utils
  from mri_poison.train import loop
  from mri_poison.train import mesh as mesh_lib
  from mri_poison.train import metrics_log
  seen, wrote = [], []
  shard_batch = mesh_lib.shard_batch

  def recording_shard_batch(batch, mesh):
    seen.append(np.asarray(batch["index"]).tolist())
    return shard_batch(batch, mesh)

  def recording(fn, name):
    def wrapped(path, *args, **kwargs):
      wrote.append(os.path.relpath(os.fspath(path), workdir))
      return fn(path, *args, **kwargs)
    setattr(io_utils, name, wrapped)

  for name in ("write_json", "write_csv", "write_text", "append_jsonl"):
    recording(getattr(io_utils, name), name)
  tb_writer = metrics_log._tensorboard_writer
  metrics_log._tensorboard_writer = lambda d, p: wrote.append("tensorboard") or tb_writer(d, p)
  mesh_lib.shard_batch = recording_shard_batch
  result = {"process": jax.process_index(), "count": jax.process_count(), "params": {}}
  for n in steps:
    params = loop.train_model(_config(n), workdir, cases=_cases())
    result["params"][str(n)] = {jax.tree_util.keystr(k): np.asarray(v).tolist()
                                for k, v in jax.tree_util.tree_leaves_with_path(params)}
  from mri_poison.train.trainer import process_sum
  p = jax.process_index()
  summed = process_sum({"counts": np.array([p + 1, 10]), "sum": np.float32(p + 0.5)})
  result.update(seen=seen, wrote=sorted(set(wrote)),
                summed={k: np.asarray(v).tolist() for k, v in summed.items()})
  with open(f"{out}-{jax.process_index()}.json", "w") as f:
    json.dump(result, f)


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _start(n, *args, worker="_worker"):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu",
             PYTHONPATH=os.pathsep.join([REPO, os.path.join(REPO, "tests")]))
  code = f"import test_multihost as t; t.{worker}(*{tuple(str(a) if isinstance(a, os.PathLike) else a for a in args)!r})"
  port = _free_port()
  procs = []
  for i in range(n):
    if n > 1:
      env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=str(n), JAX_PROCESS_ID=str(i))
    procs.append(subprocess.Popen([sys.executable, "-c", code], env=dict(env), cwd=REPO, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True))
  return procs


def _wait(procs):
  for p in procs:
    out, _ = p.communicate(timeout=240)
    assert p.returncode == 0, out[-4000:]


def _load(out, n):
  return [json.load(open(f"{out}-{i}.json")) for i in range(n)]


def _assert_params_close(a, b):
  assert a.keys() == b.keys()
  cancelled = {k for k in a if k.endswith("['Conv_0']['bias']")
               and k.replace("['Conv_0']['bias']", "['InstanceNorm_0']['scale']") in a}
  assert len(cancelled) == 6  # the other 22 leaves are compared
  for k in sorted(a.keys() - cancelled):
    np.testing.assert_allclose(np.asarray(a[k]), np.asarray(b[k]), rtol=0, atol=PARAMS_ATOL, err_msg=k)


def test_two_processes_train_like_one_and_resume_on_one(tmp_path):
  t0 = time.perf_counter()
  one_procs = _start(1, tmp_path / "one", [4, 6], tmp_path / "one")
  two_procs = _start(2, tmp_path / "two", [4], tmp_path / "two")
  _wait(two_procs)
  _wait(one_procs)
  resume_procs = _start(1, tmp_path / "two", [6], tmp_path / "resume")
  (one,), two = _load(tmp_path / "one", 1), _load(tmp_path / "two", 2)
  assert [r["process"] for r in two] == [0, 1] and all(r["count"] == 2 for r in two)

  # The same global batch at every step, each process holding its half: rows [2p, 2p+2) of it.
  assert len(one["seen"]) == 6 and all(len(r["seen"]) == 4 for r in two)
  for step in range(4):
    halves = [r["seen"][step] for r in two]
    assert [len(h) for h in halves] == [2, 2]
    assert halves[0] + halves[1] == one["seen"][step]
    assert not set(halves[0]) & set(halves[1])  # disjoint cases at each step
  assert {i for r in two for s in r["seen"] for i in s} == set(range(8))

  # Same params as the 1-process run after 4 steps.
  _assert_params_close(two[0]["params"]["4"], one["params"]["4"])
  _assert_params_close(two[1]["params"]["4"], two[0]["params"]["4"])

  # Per-process sums and counts reduce to the same totals on every process.
  assert [r["summed"] for r in two] == [{"counts": [3, 20], "sum": 2.0}] * 2
  assert one["summed"] == {"counts": [1, 10], "sum": 0.5}

  # The data position: one JSON by process 0, counting global batches.
  saved = json.load(open(tmp_path / "two" / "checkpoints" / "4" / "data" / "global_state.json"))
  assert saved == {"iterator": {"next_index": 4}, "process_count": 2}

  # Process 0 wrote the workdir files; process 1 wrote none (checkpoints aside, which orbax coordinates).
  assert {"config.json", "manifest.json", "metrics.jsonl", "tensorboard"} <= set(two[0]["wrote"])
  assert two[1]["wrote"] == []
  rows = [json.loads(line) for line in open(tmp_path / "two" / "metrics.jsonl")]
  assert [r["step"] for r in rows] == [1, 2, 3, 4]
  one_rows = [json.loads(line) for line in open(tmp_path / "one" / "metrics.jsonl")][:4]
  np.testing.assert_allclose([r["loss"] for r in rows], [r["loss"] for r in one_rows], rtol=1e-6)
  assert len(os.listdir(tmp_path / "two" / "tensorboard")) == 1

  # The 2-process checkpoint resumes in 1 process: the data stream continues at global batch 5.
  _wait(resume_procs)
  (resumed,) = _load(tmp_path / "resume", 1)
  assert resumed["seen"] == one["seen"][4:]
  _assert_params_close(resumed["params"]["6"], one["params"]["6"])
  assert time.perf_counter() - t0 < 120  # ~30 s on 2 cores


def _eval_config():
  from experiments.configs.robustify import get_config
  config = get_config("runlocal")
  config.data.update(dict(phantom_shape=(24, 24, 24), shape=(16, 16, 16), patch_shape=(16, 16, 16)))  # the tests' 16^3
  config.model.features = (4, 8)
  config.attack.update(dict(attacks=("fgsm", "pgd"), eps=(0.5,), steps=2, batch=1))
  return config


def _eval_worker(out):
  """One process of an evaluation job: a random-init victim's cells on 3 cases, one per batch -> out-<p>.json."""
  from experiments import launch_utils
  launch_utils.init_processes(multiprocess=int(os.environ.get("JAX_NUM_PROCESSES", "1")) > 1)
  import jax
  from mri_poison.data.phantom import make_case
  from mri_poison import cellstore
  from mri_poison.studies.robustify import evaluation
  from mri_poison.studies.robustify import study
  from mri_poison.train import state as state_lib
  config = _eval_config()
  data = study._stack([make_case(100 + seed, shape=(16, 16, 16)) for seed in range(3)])
  params = state_lib.make_model(config.model).init(jax.random.PRNGKey(0), data["image"][:1])["params"]
  sums, seen = [float(x.sum()) for x in data["image"]], []
  perceptibility = evaluation._perceptibility  # called on the clean volumes of every attacked batch

  def recording(x, x_adv):
    seen.extend(sums.index(float(v.sum())) for v in np.asarray(x))
    return perceptibility(x, x_adv)

  evaluation._perceptibility = recording
  p, key = jax.process_index(), jax.random.PRNGKey(3)
  table = cellstore.CellTable(f"{out}-cells-{p}.csv")
  done = evaluation.evaluate_victim(table, "undefended", params, data, config, key,
                                    sources={"own": {"params": params, "key": key, "digest": "source",
                                                     "apply_fn": evaluation.deployed_apply_fn(config)}})
  gathered = cellstore.allgather_json({"process": p, "text": "x" * (1000 * p), "values": [0.1, float("nan")]})
  with open(f"{out}-{p}.json", "w") as f:
    json.dump({"seen": sorted(set(seen)), "cells": len(done), "rows": table.rows(), "gathered": gathered}, f)


def test_two_processes_share_out_evaluation_cells(tmp_path):
  one_procs = _start(1, tmp_path / "one", worker="_eval_worker")
  two_procs = _start(2, tmp_path / "two", worker="_eval_worker")
  _wait(two_procs)
  _wait(one_procs)
  (one,), two = _load(tmp_path / "one", 1), _load(tmp_path / "two", 2)
  # 3 batches of one case: batches 0 and 2 on process 0, batch 1 on process 1.
  assert one["seen"] == [0, 1, 2]
  assert two[0]["seen"] == [0, 2] and two[1]["seen"] == [1]
  # Clean + (fgsm, pgd, random sign) at one eps, every value on both processes, equal to 1 process.
  assert one["cells"] == two[0]["cells"] == two[1]["cells"] == 4
  drop = lambda rows: [{k: v for k, v in r.items() if k != "value"} for r in rows]
  values = lambda rows: np.asarray([r["value"] for r in rows], np.float64)
  assert len(one["rows"]) > 4 * 3 * 6
  for r in two:
    assert drop(r["rows"]) == drop(one["rows"])
    np.testing.assert_array_equal(values(r["rows"]), values(one["rows"]))  # bit-exact, NaN where NaN
  assert os.path.exists(tmp_path / "two-cells-0.csv") and not os.path.exists(tmp_path / "two-cells-1.csv")
  # allgather_json: unequal sizes, NaN kept, the same list on every process.
  for r in two:
    assert [g["process"] for g in r["gathered"]] == [0, 1] and len(r["gathered"][1]["text"]) == 1000
    assert r["gathered"][0]["values"][0] == 0.1 and np.isnan(r["gathered"][1]["values"][1])


def test_legacy_per_process_data_states(tmp_path):
  """Checkpoints from before the global stream: a 1-process one resumes, a 2-process one says why not."""
  import grain
  import orbax.checkpoint as ocp
  from mri_poison.data import pipeline
  from mri_poison.train import checkpoint as ckpt
  cases, data_cfg = _cases(), _config(4).data
  it = pipeline.train_iterator(cases, data_cfg, seed=0)
  [next(it) for _ in range(3)]
  with ocp.Checkpointer(grain.checkpoint.CheckpointHandler()) as checkpointer:  # the old "data" item
    checkpointer.save(tmp_path / "checkpoints" / "3" / "data", args=grain.checkpoint.CheckpointSave(it))
  assert "process_0-of-1.json" in os.listdir(tmp_path / "checkpoints" / "3" / "data")
  expected = next(it)
  manager = ckpt.make_manager(str(tmp_path / "checkpoints"), ckpt_every=1)
  fresh = pipeline.train_iterator(cases, data_cfg, seed=0)
  ckpt.restore_data(manager, 3, fresh)
  np.testing.assert_array_equal(next(fresh)["index"], expected["index"])
  folder = tmp_path / "checkpoints" / "5" / "data"
  folder.mkdir(parents=True)
  for i in range(2):
    (folder / f"process_{i}-of-2.json").write_text(json.dumps({"next_index": 5}))
  with pytest.raises(ckpt.DataStateError, match="saved per process by 2 processes.*fresh --workdir"):
    ckpt.restore_data(manager, 5, fresh)
  with pytest.raises(ckpt.DataStateError, match="no data-iterator state"):
    ckpt.restore_data(manager, 7, fresh)
  manager.close()


@pytest.mark.parametrize("env, expected", [
    ({"JAX_COORDINATOR_ADDRESS": "127.0.0.1:1234", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"},
     {"coordinator_address": "127.0.0.1:1234", "num_processes": 2, "process_id": 1,
      "coordinator_bind_address": "127.0.0.1:1234"}),
    ({"JAX_COORDINATOR_ADDRESS": "10.0.0.2:99", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"},
     {"coordinator_address": "10.0.0.2:99", "num_processes": 4, "process_id": 3}),
    # srun: jax's SlurmCluster reads everything itself.
    ({"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "gpu[1-2]", "SLURM_NTASKS": "8", "SLURM_PROCID": "5",
      "SLURM_LOCALID": "1"}, {}),
    # Tasks not started by srun: filled from the job's node list.
    ({"SLURM_JOB_ID": "4097", "SLURM_JOB_NODELIST": "gpu[003-005,9],cpu1", "SLURM_NTASKS": "4",
      "SLURM_PROCID": "2"}, {"coordinator_address": "gpu003:61441", "num_processes": 4, "process_id": 2}),
    ({"TPU_WORKER_ID": "0"}, {}),  # TPU VMs: jax detects them
])
def test_distributed_args(env, expected):
  from experiments import launch_utils
  assert launch_utils.distributed_args(env) == expected


def test_distributed_args_name_what_is_missing():
  from experiments import launch_utils
  with pytest.raises(ValueError, match="JAX_COORDINATOR_ADDRESS"):
    launch_utils.distributed_args({"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"})
  assert launch_utils.multiprocess_requested({"MRI_POISON_MULTIPROCESS": "1"})
  assert not launch_utils.multiprocess_requested({})
