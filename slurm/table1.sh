#!/usr/bin/env bash
# usage: bash slurm/table1.sh [--after-pack JOBID] [--runs-root DIR] [--seed N] [--dry-run]
#                             [conf/extra.yaml ...] [key=value ...]
# Submits the paper's Table I as SLURM jobs: four slurm/train.sbatch runs (DCASE baseline CNN,
# ResNet-50 + NLL, + focal loss, + focal loss + mixup; conf/experiment/*.yaml) on the same data
# and seed, and a fifth job that waits for all four (afterok) and runs
# `python -m asc_dist.table1 collect` into RUNS_ROOT/table1.md. Prints the job ids.
#   --after-pack JOBID  start training only after this (pack) job succeeded (afterok)
#   --runs-root DIR     run dirs RUNS_ROOT/table1-<row> (default runs; relative to the repo)
#   --seed N            train.seed of every row (default 0)
#   --dry-run           print the sbatch commands instead of submitting them
# YAML files are merged before each experiment file (default conf/data/tut2018.yaml),
# key=value overrides after it (e.g. data.shards=/scratch/shards/tut2018 wandb.mode=online).
#   ASC_SBATCH_ARGS        sbatch options for all five jobs (e.g. "--partition=gpu --account=me")
#   ASC_TRAIN_SBATCH_ARGS  sbatch options for the training jobs (e.g. "--gpus-per-node=4
#                          --cpus-per-task=32 --time=06:00:00")
# Resubmitting resumes unfinished rows and leaves finished ones as they are (resume=auto).
set -euo pipefail
usage() { awk 'NR > 1 && !/^#/ {exit} NR > 1 {sub(/^# ?/, ""); print}' "$0"; }
source "$(dirname "${BASH_SOURCE[0]}")/../launch/lib.sh"

after="" runs_root=runs seed=0 dry=0 yamls=() overrides=()
while [ $# -gt 0 ]; do
  case $1 in
    -h | --help) usage; exit 0 ;;
    --after-pack) [ $# -ge 2 ] || { echo "error: --after-pack needs a job id" >&2; exit 2; }
                  after=$2; shift ;;
    --after-pack=*) after=${1#*=} ;;
    --runs-root) [ $# -ge 2 ] || { echo "error: --runs-root needs a folder" >&2; exit 2; }
                 runs_root=$2; shift ;;
    --runs-root=*) runs_root=${1#*=} ;;
    --seed) [ $# -ge 2 ] || { echo "error: --seed needs a number" >&2; exit 2; }
            seed=$2; shift ;;
    --seed=*) seed=${1#*=} ;;
    --dry-run) dry=1 ;;
    -*) echo "error: unknown option $1 (see --help)" >&2; exit 2 ;;
    *=*) overrides+=("$1") ;;
    *) yamls+=("$1") ;;
  esac
  shift
done
[ -z "$after" ] || [[ $after =~ ^[0-9]+$ ]] || { echo "error: --after-pack '$after' is not a job id" >&2; exit 2; }
[[ $seed =~ ^[0-9]+$ ]] || { echo "error: --seed '$seed' is not a number" >&2; exit 2; }
[ ${#yamls[@]} -gt 0 ] || yamls=(conf/data/tut2018.yaml)
cd "$ASC_ROOT"  # the jobs' submit dir: train.sbatch finds the repo there; relative paths start here
for y in "${yamls[@]}"; do [ -f "$y" ] || { echo "error: config file '$y' not found (relative to $ASC_ROOT)" >&2; exit 2; }; done
PY=$(asc_python) || exit 1

read -r -a all_args <<< "${ASC_SBATCH_ARGS:-}"
read -r -a train_sbatch <<< "${ASC_TRAIN_SBATCH_ARGS:-}"
# Row key (conf/experiment/<key>.yaml) and run name, as asc_dist.table1.ROWS.
rows=(baseline:table1-baseline nll:table1-nll focal:table1-focal focal_mixup:table1-focal-mixup)

exec 3>&1  # the terminal, while submit's stdout is captured
submit() {  # prints the job id; with --dry-run, shows the command and returns a placeholder id
  local name=$1 cmd; shift
  if [ "$dry" = 1 ]; then
    cmd=$(printf '%q ' sbatch "$@"); echo "${cmd% }" >&3
    echo "<$name>"
  else
    local out; out=$(sbatch --parsable "$@") || { echo "error: sbatch failed for $name" >&2; return 1; }
    echo "${out%%;*}"
  fi
}

ids=() run_dirs=()
for row in "${rows[@]}"; do
  key=${row%%:*} name=${row#*:}
  run_dir="$runs_root/$name"
  dep=(); [ -n "$after" ] && dep=(--dependency="afterok:$after")
  id=$(submit "$name" --job-name="$name" "${dep[@]}" "${all_args[@]}" "${train_sbatch[@]}" \
       slurm/train.sbatch "${yamls[@]}" "conf/experiment/$key.yaml" \
       "name=$name" "run_dir=$run_dir" "train.seed=$seed" "${overrides[@]}") || exit 1
  [ "$dry" = 1 ] || echo "$name: job $id" >&2
  ids+=("$id"); run_dirs+=("$run_dir")
done

deps=$(IFS=:; echo "${ids[*]}")
collect="$(printf '%q ' cd "$ASC_ROOT")&& $(printf '%q ' env PYTHONPATH="$ASC_ROOT" "$PY" -m asc_dist.table1 collect \
  --runs "${run_dirs[@]}" --out "$runs_root/table1.md")"
collect=${collect% }
id=$(submit table1-collect --job-name=table1-collect --dependency="afterok:$deps" --kill-on-invalid-dep=yes \
     --nodes=1 --ntasks=1 --cpus-per-task=1 --time=00:30:00 --output=slurm-%x-%j.out \
     "${all_args[@]}" --wrap="$collect") || exit 1
if [ "$dry" = 0 ]; then
  echo "table1-collect: job $id -> $runs_root/table1.md" >&2
  echo "${ids[*]} $id"
fi
