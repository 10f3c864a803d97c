# Shared shell logic of the launchers (launch/*.sh) and the SLURM jobs (slurm/*.sbatch).
# Source it; besides defaulting ASC_ROOT to this repository it only defines functions, so it
# can be tried with fake SLURM variables:
#   source launch/lib.sh; SLURM_JOB_NODELIST='gpu[01-03]' SLURM_JOB_ID=123 asc_rdzv_endpoint
#
# The one place where shell scripts find the repository (ASC_ROOT) and its python (asc_python).
#
# Environment read here (all optional):
#   ASC_ROOT            the repository (default: the parent of this file's directory)
#   ASC_PYTHON          python to use (default: $ASC_ROOT/.venv/bin/python, made by launch/setup.sh;
#                       any python with asc-dist installed works, e.g. a cluster's own PyTorch)
#   ASC_NPROC_PER_NODE  processes per node (default: the GPUs SLURM gave this node, else the
#                       visible GPUs, else 1)
#   ASC_RDZV_PORT       SLURM rendezvous port (default: 20000 + job id mod 10000)
#   ASC_NET_IFNAME      network interface for NCCL and Gloo, see asc_network_env
ASC_ROOT="${ASC_ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"
export ASC_ROOT
# The checkout's asc_dist wins over any installed copy, and a python without asc-dist installed
# (a GPU node's own PyTorch with the dependencies beside it) runs it too.
export PYTHONPATH="$ASC_ROOT${PYTHONPATH:+:$PYTHONPATH}"

# Prints an error and fails; callers write `x=$(asc_... ) || exit 1`.
asc_die() { echo "error: $*" >&2; return 1; }

# Submit a SLURM job and print its id. usage: asc_submit NAME [sbatch args ...]
# ASC_DRY_RUN=1: print the sbatch command on fd 3 (the caller's terminal: `exec 3>&1` before
# capturing) and the placeholder id <NAME>, submitting nothing.
asc_submit() {
  local name=$1 cmd out; shift
  if [ "${ASC_DRY_RUN:-0}" = 1 ]; then
    cmd=$(printf '%q ' sbatch "$@"); echo "${cmd% }" >&3
    echo "<$name>"
  else
    out=$(sbatch --parsable "$@") || { echo "error: sbatch failed for $name" >&2; return 1; }
    echo "${out%%;*}"
  fi
}

# The rendezvous host: the first host of the nodelist ($1, default $SLURM_JOB_NODELIST), as
# scontrol expands it (slurm-client installs it on every SLURM node: no parser of our own).
# Deliberately no "localhost" fallback: every node would rendezvous alone and train its own model.
asc_head_host() {
  local list=${1-${SLURM_JOB_NODELIST:-}} hosts
  [ -n "$list" ] || { asc_die "SLURM_JOB_NODELIST is empty: not inside a SLURM allocation (submit with sbatch)"; return 1; }
  command -v scontrol >/dev/null 2>&1 || {
    asc_die "scontrol not found on PATH: it expands the nodelist '$list' (package slurm-client)"; return 1; }
  hosts=$(scontrol show hostnames "$list") && [ -n "$hosts" ] || {
    asc_die "scontrol could not expand the nodelist '$list' (see its message above)"; return 1; }
  printf '%s\n' "${hosts%%$'\n'*}"
}

# A port derived from the job id: jobs sharing a head node get different ports (unless their
# ids differ by a multiple of 10000), a requeued job (same id) the same one. 20000-29999 stays
# below Linux's ephemeral range (32768+) that outgoing connections draw from.
asc_rdzv_port() {
  local job=${1-${SLURM_JOB_ID:-}}
  if [ -n "${ASC_RDZV_PORT:-}" ]; then
    [[ $ASC_RDZV_PORT =~ ^[0-9]+$ ]] && [ "$ASC_RDZV_PORT" -ge 1 ] && [ "$ASC_RDZV_PORT" -le 65535 ] \
      || { asc_die "ASC_RDZV_PORT='$ASC_RDZV_PORT' is not a port number"; return 1; }
    printf '%s\n' "$ASC_RDZV_PORT"; return 0
  fi
  [[ $job =~ ^[0-9]+$ ]] || { asc_die "job id '$job' is not a number (SLURM_JOB_ID unset?); set ASC_RDZV_PORT"; return 1; }
  printf '%s\n' $((20000 + 10#$job % 10000))
}

asc_rdzv_endpoint() {
  local head port
  head=$(asc_head_host "${1-${SLURM_JOB_NODELIST:-}}") || return 1
  port=$(asc_rdzv_port "${2-${SLURM_JOB_ID:-}}") || return 1
  printf '%s:%s\n' "$head" "$port"
}

# Processes (= GPUs) per node: ASC_NPROC_PER_NODE, else what SLURM allocated on this node
# (SLURM_GPUS_ON_NODE; SLURM_GPUS_PER_NODE may read "a100:4"), else CUDA_VISIBLE_DEVICES,
# else the GPUs nvidia-smi lists, else 1 (CPU).
asc_nproc_per_node() {
  local n="" devs
  if [ -n "${ASC_NPROC_PER_NODE:-}" ]; then
    n=$ASC_NPROC_PER_NODE
  elif [ -n "${SLURM_GPUS_ON_NODE:-}" ]; then
    n=$SLURM_GPUS_ON_NODE
  elif [ -n "${SLURM_GPUS_PER_NODE:-}" ]; then
    n=${SLURM_GPUS_PER_NODE##*:}
  elif [[ ${CUDA_VISIBLE_DEVICES:-} =~ ^[0-9A-Za-z][0-9A-Za-z,-]*$ && $CUDA_VISIBLE_DEVICES != NoDevFiles ]]; then
    IFS=, read -r -a devs <<< "$CUDA_VISIBLE_DEVICES"
    n=${#devs[@]}
  elif command -v nvidia-smi >/dev/null 2>&1; then
    n=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true)
  fi
  [ -n "$n" ] && [ "$n" != 0 ] || n=1
  [[ $n =~ ^[1-9][0-9]*$ ]] || { asc_die "processes per node '$n' is not a positive number (ASC_NPROC_PER_NODE / SLURM_GPUS_*)"; return 1; }
  printf '%s\n' "$n"
}

asc_python() {
  local py=${ASC_PYTHON:-$ASC_ROOT/.venv/bin/python}
  command -v "$py" >/dev/null 2>&1 || { asc_die "python '$py' not found: run 'bash launch/setup.sh' in $ASC_ROOT first, or set ASC_PYTHON"; return 1; }
  printf '%s\n' "$py"
}

# THE one place for the network interfaces of NCCL (GPU collectives) and Gloo (CPU collectives).
# ASC_NET_IFNAME=ib0 (or eth0, ens1f0, ...) pins both to one interface, for nodes with several
# networks where the default route is not the fast one. Variables you export yourself
# (NCCL_SOCKET_IFNAME, GLOO_SOCKET_IFNAME, NCCL_IB_HCA, NCCL_DEBUG=INFO, ...) are kept and reach
# every rank (the SLURM job runs srun --export=ALL).
asc_network_env() {
  if [ -n "${ASC_NET_IFNAME:-}" ]; then
    export NCCL_SOCKET_IFNAME="${NCCL_SOCKET_IFNAME:-$ASC_NET_IFNAME}"
    export GLOO_SOCKET_IFNAME="${GLOO_SOCKET_IFNAME:-$ASC_NET_IFNAME}"
  fi
}

# OMP threads per rank: the task's CPUs split over its ranks (torchrun alone would pick 1).
asc_omp_threads() {
  local nproc=$1 cpus=${SLURM_CPUS_PER_TASK:-}
  if [ -z "${OMP_NUM_THREADS:-}" ] && [[ $cpus =~ ^[0-9]+$ ]]; then
    local t=$((cpus / nproc))
    export OMP_NUM_THREADS=$((t > 0 ? t : 1))
  fi
}

# Waits for child PID across trapped signals (a trap interrupts `wait` with status 128+n) and
# returns its exit code. Traps that may fire meanwhile must set ASC_SIGNALLED=1.
asc_wait() {
  local pid=$1 rc=0 prev
  while :; do
    ASC_SIGNALLED=0; prev=$rc; rc=0
    wait "$pid" || rc=$?
    if [ "$rc" = 127 ] && ! kill -0 "$pid" 2>/dev/null; then rc=$prev; break; fi  # status already taken
    [ "$ASC_SIGNALLED" = 1 ] && [ "$rc" -gt 128 ] || break
  done
  return "$rc"
}

# Runs as the srun task on every node: this node's torchrun agent, joining the c10d rendezvous
# hosted by HEAD. usage: asc_node_agent HEAD PYTHON [asc_dist.torchrun options] -- [trainer args]
#
# Why a wrapper: a stop request must reach the torchrun agents only. SLURM delivers a signal to
# every process of a step (scancel --signal, srun's forwarding), which would also hit DataLoader
# workers and the W&B service and kill them. So the batch shell sends USR2 to the steps; the
# agent and everything below it inherit USR2 as ignored, and this wrapper turns it into one
# SIGTERM for torchrun, which passes it to its ranks; they checkpoint at the next step boundary.
# The head node hosts the rendezvous store explicitly (is_host): torch's own guess compares
# host names, which fails where SLURM node names are not the machines' host names.
asc_node_agent() {
  local head=$1 py=$2 is_host=false agent rc=0 stopping=""
  shift 2
  [ "${SLURMD_NODENAME:-}" = "$head" ] && is_host=true
  # Once only: a second SIGTERM would cut short torchrun's wait for its ranks' checkpoint.
  trap 'ASC_SIGNALLED=1; [ -n "$stopping" ] || { kill -TERM "$agent" 2>/dev/null && stopping=1; }' USR2
  trap 'ASC_SIGNALLED=1' TERM INT HUP  # SLURM signalled the agent as well: wait until it is done
  ( trap '' USR2; exec "$py" -m asc_dist.torchrun --rdzv-host "$is_host" "$@" ) &
  agent=$!
  echo "[asc_node_agent] node ${SLURMD_NODENAME:-?} (node id ${SLURM_NODEID:-?}): torchrun agent pid $agent," \
       "rendezvous host: $is_host"
  asc_wait "$agent" || rc=$?
  return "$rc"
}
