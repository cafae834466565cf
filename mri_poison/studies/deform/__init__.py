"""Study 3: learned deformation-and-appearance attack on a segmenter (Chen et al., SASHIMI 2019, reconstructed).

`run(config, workdir)` trains (or reuses, from workdir/models/*) per arm ("2d": one slice per held-out case,
"3d": whole volumes) an undefended U-Net, optionally a U-Net trained with the deformation-augmentation defence
(`defenses.deform_augment`), and a generator G(x, Delta) -> control points (`models.deform`) against the
undefended one; then evaluates on the held-out cases, as evaluation cells in results/cells.csv: the per-case
attack at each target drop Delta, its budget-limited worst case, random fields of the same budgets, the
generator, and study 2's i-FGSM / PGD; writes per-case and summary tables, paired comparisons (Holm over the
declared primary family), figures, NIfTI volumes and report.md. A rerun reuses models and cells.

`render(workdir)` writes report.md of a finished workdir again from its result files alone (what `run` does last).

Modules: training (arms, held-out data, models), evaluation (cells, statistics), report, study (`run`, `render`).
"""
from mri_poison.studies.deform.study import RESUMABLE_KEYS, check, render, run

__all__ = ["RESUMABLE_KEYS", "check", "render", "run"]
