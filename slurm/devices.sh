#!/usr/bin/env bash
# usage: bash slurm/devices.sh GENERAL --out DEVSET [--devices a,b,c,s1,s2,s3] [--after JOBID]
#                              [--dry-run] [conf/extra.yaml ...] [key=value ...]
# Submits DCASE 2025's device-specific fine-tuning as SLURM jobs: one array task per training
# device (slurm/train.sbatch running `python -m asc_dist.devices finetune GENERAL --out DEVSET
# --devices LIST --array-task ...`, which picks the device at SLURM_ARRAY_TASK_ID), each with
# the nodes and GPUs ASC_TRAIN_SBATCH_ARGS gives it, preemption and requeue as any training job;
# then one job that waits for the whole array (afterok) and runs `python -m asc_dist.devices
# assemble DEVSET` (it refuses while a member is unfinished). Prints the two job ids.
#   GENERAL             the general model: a checkpoint .pt or a run dir (shared storage)
#   --out DEVSET        the device set's folder (shared storage; one run dir per device inside)
#   --devices LIST      training devices, comma-separated (default a,b,c,s1,s2,s3)
#   --after JOBID       start only after this (the general model's training) job succeeded
#   --dry-run           print the sbatch commands instead of submitting them
# YAML files and key=value overrides go to every device's run (e.g.
# conf/experiment/dcase2025_device.yaml wandb.mode=online).
#   ASC_SBATCH_ARGS        sbatch options for all jobs (e.g. "--partition=gpu --account=me")
#   ASC_TRAIN_SBATCH_ARGS  sbatch options for the array (e.g. "--gpus-per-node=1 --time=01:00:00")
# Resubmitting resumes unfinished devices and skips finished ones.
set -euo pipefail
usage() { awk 'NR > 1 && !/^#/ {exit} NR > 1 {sub(/^# ?/, ""); print}' "$0"; }
source "$(dirname "${BASH_SOURCE[0]}")/../launch/lib.sh"

general="" out="" devices=a,b,c,s1,s2,s3 after="" dry=0 args=()
while [ $# -gt 0 ]; do
  case $1 in
    -h | --help) usage; exit 0 ;;
    --out | --devices | --after)
      [ $# -ge 2 ] || { echo "error: $1 needs a value" >&2; exit 2; }
      case $1 in --out) out=$2 ;; --devices) devices=$2 ;; --after) after=$2 ;; esac
      shift ;;
    --out=*) out=${1#*=} ;;
    --devices=*) devices=${1#*=} ;;
    --after=*) after=${1#*=} ;;
    --dry-run) dry=1 ;;
    -*) echo "error: unknown option $1 (see --help)" >&2; exit 2 ;;
    *) if [ -z "$general" ]; then general=$1; else args+=("$1"); fi ;;
  esac
  shift
done
[ -n "$general" ] || { echo "error: GENERAL (the general model's checkpoint or run dir) is missing" >&2; exit 2; }
[ -n "$out" ] || { echo "error: --out DEVSET is missing" >&2; exit 2; }
[ -z "$after" ] || [[ $after =~ ^[0-9]+$ ]] || { echo "error: --after '$after' is not a job id" >&2; exit 2; }
[[ $devices =~ ^[a-z0-9]+(,[a-z0-9]+)*$ ]] || { echo "error: --devices '$devices' is not a comma list of device ids" >&2; exit 2; }
IFS=, read -r -a list <<< "$devices"
cd "$ASC_ROOT"  # the jobs' submit dir: train.sbatch finds the repo there; relative paths start here
PY=$(asc_python) || exit 1

read -r -a all_args <<< "${ASC_SBATCH_ARGS:-}"
read -r -a train_sbatch <<< "${ASC_TRAIN_SBATCH_ARGS:-}"

exec 3>&1  # the terminal, while asc_submit's stdout is captured
submit() { ASC_DRY_RUN=$dry asc_submit "$@"; }

name=$(basename "$out")
dep=(); [ -n "$after" ] && dep=(--dependency="afterok:$after")
array=$(submit "$name-devices" --job-name="$name-devices" --array="0-$((${#list[@]} - 1))" \
        --output="slurm-%x-%A_%a.out" --export=ALL,ASC_MODULE=asc_dist.devices "${dep[@]}" \
        "${all_args[@]}" "${train_sbatch[@]}" slurm/train.sbatch finetune "$general" --out "$out" \
        --devices "$devices" --array-task "${args[@]}") || exit 1
[ "$dry" = 1 ] || echo "$name-devices: array job $array (${devices})" >&2
assemble="$(printf '%q ' cd "$ASC_ROOT")&& $(printf '%q ' env PYTHONPATH="$ASC_ROOT" "$PY" -m asc_dist.devices assemble "$out")"
assemble=${assemble% }
id=$(submit "$name-assemble" --job-name="$name-assemble" --dependency="afterok:$array" \
     --kill-on-invalid-dep=yes --nodes=1 --ntasks=1 --cpus-per-task=1 --time=00:30:00 \
     --output=slurm-%x-%j.out "${all_args[@]}" --wrap="$assemble") || exit 1
if [ "$dry" = 0 ]; then
  echo "$name-assemble: job $id -> $out/devices.json" >&2
  echo "$array $id"
fi
