r"""The main job: all four studies at one scale, one workdir, one report.md.

Run (from the repository root; re-running the same command reuses finished stages, models and results):
  python -m experiments.reproduce --workdir runs/reproduce
  python -m experiments.reproduce --config experiments/configs/reproduce.py:test --workdir /tmp/reproduce_test
  python -m experiments.reproduce --config experiments/configs/reproduce.py:brats --workdir runs/reproduce_brats \
      --config.data_root=/data/BraTS2021
Any study setting can be overridden under its stage name, e.g. --config.poison.sweep.seeds=0,1
--config.robustify.attack.steps=10; --config.stages=poison,deform runs a subset; --config.force=True redoes all.
Outputs: workdir/report.md (start there), workdir/<stage>/ (each study's own workdir and report).

Variants:
  phantom  (default) CPU, about 18 min on 2 cores (two stages at a time): each study's `runlocal` variant on the
           embedded phantom, with n = 20 held-out cases in every study (32 in study 1, so that >= 20 contain ET).
  test     CPU, about 4 minutes (218 s on 2 cores): every study at toy size (the pipeline test and the end-to-end
           tests of studies 2 and 3 read this run; numbers mean little).
  brats    GPU: every study's `brats` variant on the BraTS folder at --config.data_root (full size, hours).
  ceiling  CPU bench (experiments/bench/ceiling.py, about 12 min on 2 cores): the main job's data and victims,
           each victim trained CEILING_FACTOR x longer, attacks and protections cut to one cheap cell: how much
           of the task the main job's victims learnt (each stage's gate table beside the main job's, RESULTS.md).
Each stage's settings are its study's (experiments/configs/<study>.py); defaults chosen here are marked there.
"""
import ml_collections

from experiments.configs import base_config
from experiments.configs import deform as deform_config
from experiments.configs import poison as poison_config
from experiments.configs import robustify as robustify_config
from experiments.configs import unlearnable as unlearnable_config

VARIANTS = ("phantom", "test", "brats", "ceiling")
CEILING_FACTOR = 4  # the ceiling variant trains every study's clean victim this many times the main job's steps
# Stage name -> the study's config module (experiments/configs/<...>.py) and its launcher.
STUDY_CONFIGS = {"robustify": robustify_config, "poison": poison_config, "deform": deform_config,
                 "unlearnable": unlearnable_config}
STUDY_VARIANT = {"phantom": "runlocal", "test": "runlocal", "brats": "brats", "ceiling": "runlocal"}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = base_config(arg, VARIANTS)  # seed: the main job's own; each study keeps its config's (listed in the report)
  variant = config.variant
  config.stages = ("robustify", "poison", "deform", "unlearnable")  # run order
  config.force = False  # True: delete each stage's folder and compute everything again
  config.concurrent_stages = 0  # stages run at once, each in its own process; 0: 2 on a CPU-only machine, else 1
  config.data_root = ""  # BraTS folder for the brats variant (copied into every stage's data.root)
  for name, module in STUDY_CONFIGS.items():
    config[name] = module.get_config(STUDY_VARIANT[variant])
  if variant in ("phantom", "ceiling"):
    _main_job_sizes(config)
  if variant == "ceiling":
    _ceiling_sizes(config, CEILING_FACTOR)
  if variant == "test":
    _toy_sizes(config)
  if variant == "brats":
    root = config.get_ref("data_root")
    for name in STUDY_CONFIGS:
      config[name].data.root = root  # --config.data_root=... reaches every study
  return config


def _main_job_sizes(config) -> None:
  """Each study's `runlocal` settings (training sets included) with n = 20 held-out cases [ours]."""
  # The same 10 training cases as runlocal (32^3 volumes, 300 + 100 steps, 3 eps): WT and TC learnt. ET needs
  # the longer `phantom` variant of study 2 (RESULTS.md, 2026-12-07 study 2 at 32^3).
  config.robustify.data.update(dict(n_cases=30, n_val=20))
  # 12 training cases; 32 validation cases so that >= 20 contain ET (23 here), the cases study 1's tests use.
  config.poison.data.update(dict(n_cases=44, n_val=32))
  config.deform.data.update(dict(n_cases=32, n_val=20))  # 12
  u = config.unlearnable
  u.data.update(dict(n_cases=26, n_val=20))  # 6
  # Nine victims: every protection at 4/255 with standard training, the class pattern at 16/255 and a second
  # training seed of the clean and UMed victims. At 4/255 no protection works on this data (RESULTS.md), so the
  # counter-measures (the `countered` variant, 16/255), partial protection and the phase map (its own variant)
  # are left to their variants.
  u.counter.update(dict(regimes=("standard",), methods=()))
  u.protect.fractions = (1.0,)


def _ceiling_sizes(config, factor: int) -> None:
  """The main job's data and clean victims trained `factor` x longer (same schedule shape); everything after the
  victim is cut to one cheap cell, so that a stage's cost is its victim's training and its gate table."""
  r = config.robustify
  r.train.update(dict(steps=factor * int(r.train.steps), ckpt_every=factor * int(r.train.ckpt_every)))
  r.distill.steps = r.adversarial.train_steps = 1  # the defences are not what this variant measures
  r.attack.update(dict(attacks=("fgsm",), eps=(0.2,)))
  r.eval.update(dict(reference_eps=0.2, example_eps=0.2))

  p = config.poison
  p.train.update(dict(steps=factor * int(p.train.steps), ckpt_every=factor * int(p.train.ckpt_every)))
  p.sweep.update(dict(ks=(0, 5), modes=("replace",)))  # k = 0 is the victim; k = 5 keeps the sweep's shape

  d = config.deform
  d.arm2d.train.update(dict(steps=factor * int(d.arm2d.train.steps)))
  d.generator.enabled = False
  d.defence.arms = ()
  d.attack.update(dict(deltas=(0.1,), gradient_attacks=()))

  u = config.unlearnable
  u.train.update(dict(steps=factor * int(u.train.steps), ckpt_every=factor * int(u.train.ckpt_every)))
  u.protect.update(dict(methods=("none", "random"), partial_method="random", sweep_eps=()))
  u.replicates.methods = ()


def _toy_sizes(config) -> None:
  """Every study as small as it still runs end to end (the pipeline test; its numbers mean nothing)."""
  r = config.robustify
  # The study's own tests read this run (tests/conftest.py), so it is as small as a study whose models still learn
  # something: two levels, 40 steps (clean mean Dice 0.38-0.42 on the 3 validation cases), every runlocal attack.
  r.data.update(dict(n_cases=7, n_val=3, phantom_shape=(24, 24, 24), shape=(16, 16, 16), patch_shape=(16, 16, 16)))
  r.model.features = (8, 16)
  r.train.update(dict(steps=40, ckpt_every=40, log_every=20))
  r.distill.steps = r.adversarial.train_steps = 0  # half of train.steps
  r.attack.update(dict(eps=(0.1, 0.5), steps=2, batch=3))
  r.eval.update(dict(reference_eps=0.5, example_eps=0.5))

  p = config.poison
  p.data.update(dict(n_cases=8, n_val=4, phantom_shape=(24, 24, 24), shape=(16, 16, 16), patch_shape=(16, 16)))
  p.gan.train.update(dict(steps=4, log_every=2, ckpt_every=4))
  p.model.features = (4, 8)
  p.train.update(dict(steps=6, warmup_steps=1, log_every=3, ckpt_every=6))
  p.sweep.update(dict(ks=(0, 5), modes=("replace",), seeds=(0,)))
  p.detect.update(dict(steps=4, n_boot=50))
  p.eval.update(dict(n_boot=100, n_figure_cases=1))

  d = config.deform  # also read by the study's own test (tests/test_studies_deform.py)
  d.data.update(dict(n_cases=10, n_val=4))
  d.arm2d.model.features = (8, 16)
  d.arm2d.train.update(dict(steps=12, log_every=100, ckpt_every=100))
  d.arm2d.generator_steps = 6
  d.generator.extra_cases = 2
  d.deform.steps = 8
  d.attack.update(dict(deltas=(0.1,), eps=(0.3,), gradient_attacks=("pgd",), gradient_steps=2))
  d.defence.arms = ()  # the defence's transform is tested in tests/test_attacks_deform.py
  d.eval.update(dict(example_delta=0.1, n_volumes=1))

  u = config.unlearnable
  u.data.update(dict(n_cases=6, n_val=2, phantom_shape=(24, 24, 24), shape=(16, 16, 16), patch_shape=(16, 16)))
  for m in (u.model, u.surrogate):
    m.features = (4, 8)
  u.train.update(dict(steps=6, warmup_steps=1, log_every=3, ckpt_every=6))
  u.protect.methods = ("none", "random", "classpattern", "umed")  # classpattern: the positive control
  u.protect.minmin.update(dict(steps=2, train_steps=2, pgd_steps=2))
  u.protect.umed.update(dict(steps=4, surrogate_warmup=0))
  u.protect.update(dict(fractions=(1.0,), sweep_eps=()))
  u.replicates.methods = ()
  u.counter.update(dict(regimes=("standard", "purify"), methods=("umed",)))
  u.eval.write_cases = 1
