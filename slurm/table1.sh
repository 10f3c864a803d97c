#!/usr/bin/env bash
# usage: bash slurm/table1.sh [--after-pack JOBID] [--runs-root DIR] [--seeds 0,1,2,3,4] [--only rows]
#                             [--dry-run] [conf/extra.yaml ...] [key=value ...]
# Submits the paper's Table I as SLURM jobs: one slurm/train.sbatch job per (row, seed), the rows
# and their arguments taken from `python -m asc_dist.table1 plan` (the same trainings as
# `table1 run`), and one more job that waits for all of them (afterok) and runs
# `python -m asc_dist.table1 collect` into RUNS_ROOT/table1.md (.json, .png). Prints the job ids.
#   --after-pack JOBID  start training only after this (pack) job succeeded (afterok)
#   --runs-root DIR     run dirs RUNS_ROOT/table1-<row>-seed<k> (default runs; relative to the repo)
#   --seeds LIST        train.seed values, comma-separated (default 0,1,2,3,4)
#   --only ROWS         comma list of rows (baseline,seresnet,nll,focal,focal_mixup; default all)
#   --dry-run           print the sbatch commands instead of submitting them
# YAML files are merged before each experiment file (default conf/data/tut2018.yaml),
# key=value overrides after it (e.g. data.shards=/scratch/shards/tut2018 wandb.mode=online).
#   ASC_SBATCH_ARGS        sbatch options for all jobs (e.g. "--partition=gpu --account=me")
#   ASC_TRAIN_SBATCH_ARGS  sbatch options for the training jobs (e.g. "--gpus-per-node=1
#                          --cpus-per-task=16 --time=02:00:00")
# Resubmitting resumes unfinished runs and leaves finished ones as they are (resume=auto).
set -euo pipefail
usage() { awk 'NR > 1 && !/^#/ {exit} NR > 1 {sub(/^# ?/, ""); print}' "$0"; }
source "$(dirname "${BASH_SOURCE[0]}")/../launch/lib.sh"

after="" runs_root=runs seeds=0,1,2,3,4 only="" dry=0 yamls=() overrides=()
while [ $# -gt 0 ]; do
  case $1 in
    -h | --help) usage; exit 0 ;;
    --after-pack | --runs-root | --seeds | --only)
      [ $# -ge 2 ] || { echo "error: $1 needs a value" >&2; exit 2; }
      case $1 in --after-pack) after=$2 ;; --runs-root) runs_root=$2 ;; --seeds) seeds=$2 ;; --only) only=$2 ;; esac
      shift ;;
    --after-pack=*) after=${1#*=} ;;
    --runs-root=*) runs_root=${1#*=} ;;
    --seeds=*) seeds=${1#*=} ;;
    --only=*) only=${1#*=} ;;
    --dry-run) dry=1 ;;
    -*) echo "error: unknown option $1 (see --help)" >&2; exit 2 ;;
    *=*) overrides+=("$1") ;;
    *) yamls+=("$1") ;;
  esac
  shift
done
[ -z "$after" ] || [[ $after =~ ^[0-9]+$ ]] || { echo "error: --after-pack '$after' is not a job id" >&2; exit 2; }
[ ${#yamls[@]} -gt 0 ] || yamls=(conf/data/tut2018.yaml)
cd "$ASC_ROOT"  # the jobs' submit dir: train.sbatch finds the repo there; relative paths start here
PY=$(asc_python) || exit 1
plan_args=(--seeds "$seeds" --runs-root "$runs_root")
[ -z "$only" ] || plan_args+=(--only "$only")
plan=$("$PY" -m asc_dist.table1 plan "${plan_args[@]}" "${yamls[@]}" "${overrides[@]}") || exit 2

read -r -a all_args <<< "${ASC_SBATCH_ARGS:-}"
read -r -a train_sbatch <<< "${ASC_TRAIN_SBATCH_ARGS:-}"

exec 3>&1  # the terminal, while asc_submit's stdout is captured
submit() { ASC_DRY_RUN=$dry asc_submit "$@"; }

ids=()
dep=(); [ -n "$after" ] && dep=(--dependency="afterok:$after")
while IFS=$'\t' read -r -a job; do  # name, run dir, trainer arguments
  id=$(submit "${job[0]}" --job-name="${job[0]}" "${dep[@]}" "${all_args[@]}" "${train_sbatch[@]}" \
       slurm/train.sbatch "${job[@]:2}") || exit 1
  [ "$dry" = 1 ] || echo "${job[0]}: job $id" >&2
  ids+=("$id")
done <<< "$plan"

deps=$(IFS=:; echo "${ids[*]}")
collect="$(printf '%q ' cd "$ASC_ROOT")&& $(printf '%q ' env PYTHONPATH="$ASC_ROOT" "$PY" -m asc_dist.table1 collect \
  --runs "$runs_root" --out "$runs_root/table1.md")"
collect=${collect% }
id=$(submit table1-collect --job-name=table1-collect --dependency="afterok:$deps" --kill-on-invalid-dep=yes \
     --nodes=1 --ntasks=1 --cpus-per-task=1 --time=00:30:00 --output=slurm-%x-%j.out \
     "${all_args[@]}" --wrap="$collect") || exit 1
if [ "$dry" = 0 ]; then
  echo "table1-collect: job $id -> $runs_root/table1.md" >&2
  echo "${ids[*]} $id"
fi
