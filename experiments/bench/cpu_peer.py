r"""CPU side by side: the 3D U-Net train step and PGD-10, as shipped before the CPU fast path, now, and in PyTorch.

  python -m experiments.bench.cpu_peer --out=runs/bench/cpu_peer            # 32^3, both layouts, 2 rounds
  python -m experiments.bench.cpu_peer --edges=32,48 --layouts=small --rounds=3

Every measurement runs in its own worker process, and the contenders of one (layout, size) are run in turn,
round after round (A, B, C, A, B, C, ...), so a load that comes and goes hits them alike; each round gives one
paired ratio per contender. Contenders:
  jax_xla      the project's step with XLA's own 3D conv (`model.conv_impl=xla`; what shipped before)
  jax_auto     the project's step as configured by default (`auto`: depth-folded conv on CPU)
  torch_eager  MONAI's BasicUNet building blocks (TwoConv / Down / UpCat) in the same layout, PyTorch eager
               (oneDNN), Adam, per-voxel cross-entropy; `--torch_compile` adds torch.compile
and for PGD-10 (L-inf, random start, CE on every voxel): the rolled `lax.scan` with XLA's conv (before), the
default (`auto`: folded conv, loop unrolled on CPU), and torchattacks.PGD on the torch model.
GFLOP/s: XLA's cost analysis of the JAX step (XLA conv form) divided by each contender's time, beside a 2048^2 float32 matmul on the same
machine (its practical ceiling). torch, monai and torchattacks are optional (`pip install torch==2.13.0`: the
CPU wheel; monai and torchattacks with --no-deps); without them the torch rows say so and the rest runs.
Writes <out>/cpu_peer.json and <out>/cpu_peer.md.
"""
import json
import os
import statistics
import subprocess
import sys
import time

from absl import flags

from experiments import launch_utils
from experiments.bench import timing
from mri_poison import io_utils

LAYOUTS = {"basic": (32, 32, 64, 128, 256, 32), "small": (16, 32, 64, 128)}
CHANNELS, CLASSES, BATCH = 4, 4, 2

_EDGES = flags.DEFINE_list("edges", ["32"], "Cubic patch edges.")
_LAYOUTS = flags.DEFINE_list("layouts", ["basic", "small"], f"U-Net layouts: {sorted(LAYOUTS)}.")
_ROUNDS = flags.DEFINE_integer("rounds", 2, "Rounds of (every contender once).")
_TRAIN_STEPS = flags.DEFINE_integer("train_steps", 5, "Timed train steps per worker (after 2 warm-up steps).")
_PGD_REPEATS = flags.DEFINE_integer("pgd_repeats", 2, "Timed PGD-10 attacks per worker (after one warm-up).")
_PARTS = flags.DEFINE_list("parts", ["step", "pgd"], "What to time: step, pgd.")
_TORCH_COMPILE = flags.DEFINE_bool("torch_compile", False, "Also time torch.compile (slow to compile on CPU).")
_OUT = flags.DEFINE_string("out", "runs/bench/cpu_peer", "Output folder.")
_WORKER = flags.DEFINE_string("worker", "", "Internal: run one measurement (JSON spec) and print its JSON.")

_MARK = "RESULT "


# ---------------------------------------------------------------------------------------------- workers


def _jax_step(spec):
  import jax
  from experiments.bench import unet
  from experiments.configs import unet as cfg_lib
  config = cfg_lib.get_config("phantom3d")
  config.model.features = tuple(spec["features"])
  config.model.conv_impl = spec["conv_impl"]
  out = unet.measure_train_step(config, size=spec["size"], batch=BATCH, steps=spec["steps"], report=lambda s: None)
  import jax.numpy as jnp
  a = jnp.ones((2048, 2048), jnp.float32)
  matmul = jax.jit(lambda a: a @ a)
  ceiling = 2 * 2048 ** 3 / timing.median_time(lambda: matmul(a), 5) / 1e9
  return {"ms": out["step_ms"], "compile_s": out["compile_s"], "gflop": out["gflop"], "ceiling_gflops": ceiling}


def _jax_pgd(spec):
  import jax
  from experiments.bench import attacks
  from mri_poison.attacks import gradient, losses
  from mri_poison.models.unet import UNet
  _, variables, x, labels, _ = attacks.problem(3, spec["size"], BATCH, features=spec["features"],
                                               channels=CHANNELS)
  model = UNet(features=tuple(spec["features"]), out_channels=CLASSES, conv_impl=spec["conv_impl"])
  loss_fn = losses.cross_entropy(model.apply, variables, labels)
  if spec["unroll"] != "auto":  # the loop form that shipped before: one rolled lax.scan
    import importlib
    optimize_module = importlib.import_module("mri_poison.attacks.optimize")
    rolled = optimize_module.scan_unroll
    optimize_module.scan_unroll = lambda steps, unroll="auto": rolled(steps, 1)
  run = lambda: gradient.pgd(loss_fn, x, eps=8 / 255, step_size=2 / 255, steps=10, key=jax.random.key(3))
  t = time.perf_counter()
  jax.block_until_ready(run())
  first = time.perf_counter() - t
  return {"ms": 1e3 * timing.median_time(run, spec["repeats"]), "first_s": first}


def _torch_unet(features):
  """MONAI BasicUNet's blocks in the given layout (5 levels + final width = BasicUNet itself)."""
  import torch
  from monai.networks.nets import basic_unet as bu
  if len(features) == 6:  # BasicUNet itself
    return bu.BasicUNet(spatial_dims=3, in_channels=CHANNELS, out_channels=CLASSES, features=features, dropout=0.0)
  act, norm = ("LeakyReLU", {"negative_slope": 0.1, "inplace": True}), ("instance", {"affine": True})

  class Net(torch.nn.Module):
    def __init__(self):
      super().__init__()
      f = features
      self.conv_0 = bu.TwoConv(3, CHANNELS, f[0], act, norm, True, 0.0)
      self.downs = torch.nn.ModuleList(bu.Down(3, f[i], f[i + 1], act, norm, True, 0.0) for i in range(len(f) - 1))
      self.ups = torch.nn.ModuleList(
          bu.UpCat(3, f[i + 1], f[i], f[i], act, norm, True, 0.0, "deconv", halves=i > 0)
          for i in reversed(range(len(f) - 1)))
      self.final = torch.nn.Conv3d(f[0], CLASSES, 1)

    def forward(self, x):
      skips = [self.conv_0(x)]
      for down in self.downs:
        skips.append(down(skips[-1]))
      h = skips.pop()
      for up in self.ups:
        h = up(h, skips.pop())
      return self.final(h)
  return Net()


def _torch_step(spec):
  import torch
  import torch.nn.functional as F
  torch.manual_seed(0)
  model = _torch_unet(tuple(spec["features"]))
  if spec.get("compile"):
    model = torch.compile(model)
  opt = torch.optim.Adam(model.parameters(), 1e-3)
  s = spec["size"]
  x, y = torch.randn(BATCH, CHANNELS, s, s, s), torch.randint(0, CLASSES, (BATCH, s, s, s))

  def step():
    opt.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    opt.step()
  t = time.perf_counter()
  step()
  first = time.perf_counter() - t
  step()  # a second warm-up, as the JAX side has
  return {"ms": 1e3 * timing.median_time(step, spec["steps"]), "first_s": first}


def _torch_pgd(spec):
  import torch
  import torchattacks
  torch.manual_seed(0)
  model = _torch_unet(tuple(spec["features"])).eval()
  s = spec["size"]
  x, y = torch.rand(BATCH, CHANNELS, s, s, s), torch.randint(0, CLASSES, (BATCH, s, s, s))
  attack = torchattacks.PGD(model, eps=8 / 255, alpha=2 / 255, steps=10, random_start=True)
  attack(x, y)  # warm-up
  return {"ms": 1e3 * timing.median_time(lambda: attack(x, y), spec["repeats"])}


WORKERS = {"jax_step": _jax_step, "jax_pgd": _jax_pgd, "torch_step": _torch_step, "torch_pgd": _torch_pgd}


# ---------------------------------------------------------------------------------------------- driver


def torch_missing() -> str:
  """'' when torch, monai and torchattacks import; else which are missing (the peer rows are skipped)."""
  import importlib.util
  missing = [m for m in ("torch", "monai", "torchattacks") if importlib.util.find_spec(m) is None]
  return ", ".join(missing)


def contenders(part: str, layout: str, size: int, peer: bool) -> list[tuple[str, dict]]:
  base = dict(features=LAYOUTS[layout], size=size, steps=_TRAIN_STEPS.value, repeats=_PGD_REPEATS.value)
  if part == "step":
    out = [("jax_xla", dict(base, kind="jax_step", conv_impl="xla")),
           ("jax_auto", dict(base, kind="jax_step", conv_impl="auto"))]
    if peer:
      out.append(("torch_eager", dict(base, kind="torch_step")))
      if _TORCH_COMPILE.value:
        out.append(("torch_compile", dict(base, kind="torch_step", compile=True)))
    return out
  out = [("jax_rolled_xla", dict(base, kind="jax_pgd", conv_impl="xla", unroll="rolled")),
         ("jax_auto", dict(base, kind="jax_pgd", conv_impl="auto", unroll="auto"))]
  if peer:
    out.append(("torchattacks", dict(base, kind="torch_pgd")))
  return out


def run_worker(spec: dict, env: dict) -> dict:
  proc = subprocess.run([sys.executable, "-m", "experiments.bench.cpu_peer", f"--worker={json.dumps(spec)}"],
                        capture_output=True, text=True, env=env, check=False)
  lines = [l for l in proc.stdout.splitlines() if l.startswith(_MARK)]
  if proc.returncode or not lines:
    return {"error": (proc.stderr or proc.stdout)[-800:]}
  return json.loads(lines[-1][len(_MARK):])


def main(argv):
  del argv
  if _WORKER.value:
    spec = json.loads(_WORKER.value)
    print(_MARK + json.dumps(WORKERS[spec["kind"]](spec)), flush=True)
    return
  env_info = timing.environment()
  print(timing.describe(env_info), flush=True)
  missing = torch_missing()
  if missing:
    print(f"PyTorch peer skipped: {missing} not installed (pip install torch==2.13.0; monai and torchattacks "
          "wheels with --no-deps).", flush=True)
  env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=os.path.abspath(os.path.join(_OUT.value, "jax_cache")),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="1")
  rows = []
  for part in _PARTS.value:
    for layout in _LAYOUTS.value:
      for size in map(int, _EDGES.value):
        entries = contenders(part, layout, size, peer=not missing)
        times = {name: [] for name, _ in entries}
        extra = {}
        for r in range(_ROUNDS.value):
          for name, spec in entries:
            t = time.perf_counter()
            res = run_worker(spec, env)
            if "error" in res:
              print(f"  {part} {layout} {size}^3 {name}: FAILED {res['error']}", flush=True)
              continue
            times[name].append(res["ms"])
            extra[name] = res
            print(f"  round {r + 1}/{_ROUNDS.value} {part} {layout} {size}^3 {name}: {res['ms']:.0f} ms "
                  f"(worker {time.perf_counter() - t:.0f} s)", flush=True)
        rows.append(_summarise(part, layout, size, times, extra))
  result = {"environment": env_info, "peer_missing": missing, "rows": rows,
            "settings": dict(batch=BATCH, channels=CHANNELS, classes=CLASSES, rounds=_ROUNDS.value,
                             steps=_TRAIN_STEPS.value, pgd_repeats=_PGD_REPEATS.value)}
  io_utils.write_json(os.path.join(_OUT.value, "cpu_peer.json"), result)
  md = render(result)
  io_utils.write_text(os.path.join(_OUT.value, "cpu_peer.md"), md)
  print(md)


def _summarise(part, layout, size, times, extra):
  """Medians per contender and paired ratios (per round) of each against the new JAX path."""
  out = {"part": part, "layout": layout, "size": size, "median_ms": {}, "ratio_to_jax_auto": {}, "n_rounds": {}}
  ours = times.get("jax_auto", [])
  for name, ts in times.items():
    if not ts:
      continue
    out["median_ms"][name] = statistics.median(ts)
    out["n_rounds"][name] = len(ts)
    pairs = [o / t for o, t in zip(ours, ts)]
    if pairs and name != "jax_auto":
      out["ratio_to_jax_auto"][name] = statistics.median(pairs)  # JAX (new) time / contender's time
  if part == "step" and "jax_xla" in extra:
    # FLOPs of the plain program (the folded one counts the same convolutions plus its copies).
    e = extra["jax_xla"]
    out["gflop"] = e["gflop"]
    out["ceiling_gflops"] = e["ceiling_gflops"]
    out["achieved_gflops"] = {n: e["gflop"] / (ms / 1e3) for n, ms in out["median_ms"].items()}
  return out


def render(result) -> str:
  env = result["environment"]
  lines = [f"CPU peer benchmark, {env['date']}: {env['cpu']}; "
           + ", ".join(f"{k} {v}" for k, v in env["versions"].items()), ""]
  if result["peer_missing"]:
    lines += [f"PyTorch peer not run: {result['peer_missing']} not installed.", ""]
  lines += ["| part | layout | size | contender | median ms | new JAX / contender (paired) | GFLOP/s |",
            "|---|---|---|---|---|---|---|"]
  for row in result["rows"]:
    for name, ms in row["median_ms"].items():
      ratio = row["ratio_to_jax_auto"].get(name)
      gf = row.get("achieved_gflops", {}).get(name)
      lines.append(f"| {row['part']} | {row['layout']} | {row['size']}^3 | {name} | {ms:.0f} | "
                   f"{'' if ratio is None else f'{ratio:.2f}x'} | {'' if gf is None else f'{gf:.0f}'} |")
  ceilings = [r["ceiling_gflops"] for r in result["rows"] if "ceiling_gflops" in r]
  if ceilings:
    lines += ["", f"float32 matmul ceiling (2048^2, same worker): {statistics.median(ceilings):.0f} GFLOP/s; "
              "step GFLOP from XLA's cost analysis."]
  return "\n".join(lines) + "\n"


if __name__ == "__main__":
  launch_utils.run_plain(main)
