"""The main job: every study at one scale, in one workdir, summarised in one report.md.

`run(config, workdir)` runs the stages named in `config.stages` (each a study's own `run` on its sub-config
`config.<stage>`, in `<workdir>/<stage>/`), records each stage's outcome in `<workdir>/stages/<stage>.json`,
and writes `<workdir>/report.md`: an overview (stage status, times, headline numbers), the data, every
study's own report (its protocol, tables, figures, the paper's numbers labelled as such, sanity checks and
findings) and the run manifest.

A finished stage whose sub-config is unchanged is reused without running it; a changed or interrupted one is
run again, and the study itself reuses its trained models and evaluation cells and resumes a killed training
from its checkpoint. `config.force=True` deletes each stage's folder first. A stage that fails is recorded
with its error and the others still run. `render(workdir)` writes every report again from the files alone.
"""
from mri_poison.studies.reproduce.pipeline import STAGES, StageFailed, render, run, stage_runner  # noqa: F401
