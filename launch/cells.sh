#!/usr/bin/env bash
# A study's evaluation cells over a SLURM array, in three dependent jobs (robustify; any launcher whose config
# has eval.cells):
#   1. train:  the study's models                       (--config.eval.cells=none)
#   2. cells:  K array tasks, task i computes share i/K  (--config.eval.cells=i/K, into results/shards/)
#   3. report: folds the shares into results/cells.csv, computes whatever a failed task left, writes the report
# Each job is launch/slurm.sbatch (set its nodes/GPUs with SBATCH_* variables or #SBATCH lines). Usage, from
# the repository root:
#   launch/cells.sh 8 experiments/robustify.py --config experiments/configs/robustify.py:brats \
#       --config.data.root=/data/BraTS2021 --workdir /shared/runs/robustify
# The report job runs only once every task has succeeded. A failed task i is re-run alone with an explicit share,
# then the report: sbatch launch/slurm.sbatch ... --config.eval.cells=i/K, then sbatch launch/slurm.sbatch ...
set -euo pipefail
if [[ $# -lt 2 || ! $1 =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: $0 K experiments/LAUNCHER.py [launcher flags]   (K >= 1 array tasks)" >&2
  exit 2
fi
k=$1; shift
here=$(dirname "$0")
train=$(sbatch --parsable --job-name=mri_poison_train "$here/slurm.sbatch" "$@" --config.eval.cells=none)
cells=$(sbatch --parsable --job-name=mri_poison_cells --dependency="afterok:$train" --array="0-$((k - 1))" \
    "$here/slurm.sbatch" "$@" "--config.eval.cells={task}")
report=$(sbatch --parsable --job-name=mri_poison_report --dependency="afterok:$cells" "$here/slurm.sbatch" "$@")
echo "submitted: train $train, cells $cells (array of $k), report $report"
