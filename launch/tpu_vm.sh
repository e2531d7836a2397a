#!/usr/bin/env bash
# vggjax on a Cloud TPU VM slice: create it, install vggjax on every worker, run the same training command on
# all workers, follow the logs, stop gracefully, delete the slice. See launch/README.md.
#
#   launch/tpu_vm.sh create --name=vgg --zone=us-central2-b --accelerator-type=v4-32 [--version=V] [--spot]
#   launch/tpu_vm.sh setup  --name=vgg --zone=us-central2-b [--repo=URL [--ref=REF]]
#   launch/tpu_vm.sh train  --name=vgg --zone=us-central2-b --config=configs/vgg16.py --workdir=gs://b/vgg16 \
#                           [--env=TFDS_DATA_DIR=gs://b/tfds] [--detach] -- --config.optimizer.lr=0.02
#   launch/tpu_vm.sh logs   --name=vgg --zone=us-central2-b [--worker=0] [--no-follow]
#   launch/tpu_vm.sh stop   --name=vgg --zone=us-central2-b       # SIGTERM: checkpoint, exit 0
#   launch/tpu_vm.sh describe --name=vgg --zone=us-central2-b
#   launch/tpu_vm.sh delete --name=vgg --zone=us-central2-b [--yes]
#
# Every subcommand takes --dry-run (print the exact commands, one per line, shell-quoted, and run nothing)
# and --project=P. --name and --zone default to $VGGJAX_TPU_NAME and $VGGJAX_TPU_ZONE.
#
# `_worker`, `_supervise` and `_stop` are the worker side of train/stop: they run on each TPU VM from the
# copy of this repository that `setup` installed.
set -euo pipefail

SCRIPT=$(basename "$0")
REPO=$(cd "$(dirname "$0")/.." && pwd)
DEFAULT_VERSION=tpu-ubuntu2204-base

usage() {
  cat <<EOF
usage: $SCRIPT SUBCOMMAND [options] [-- training overrides]

subcommands:
  create    create the slice: --accelerator-type=TYPE (e.g. v4-32, v5litepod-16), --version=RUNTIME
            (default $DEFAULT_VERSION; v6e needs v2-alpha-tpuv6e), --spot or --preemptible
  setup     install vggjax on every worker: copy this checkout (default) or --repo=URL [--ref=REF] into
            ~/REMOTE_DIR, then pip install -e it with --jax=SPEC (default 'jax[tpu]') and --pip='PKGS'
  train     run 'python3 -m vggjax.main --config=CONFIG --workdir=WORKDIR [overrides after --]' on all
            workers (--worker=all) and stream the log; --detach returns at once (follow with 'logs').
            --env=KEY=VALUE (repeatable) sets environment variables for the run. The workdir must be
            reachable from every worker: gs://BUCKET/PATH or a shared filesystem mounted on each worker.
            Running the same command again resumes from the last checkpoint.
  logs      follow the newest training log of --worker=N (default 0: process 0 writes the logs)
  stop      SIGTERM to the training process on every worker: it finishes the step, checkpoints, exits 0
  describe  show the slice (state, workers, addresses)
  delete    delete the slice (gcloud asks for confirmation unless --yes)

options:
  --name=NAME --zone=ZONE   the slice (default \$VGGJAX_TPU_NAME, \$VGGJAX_TPU_ZONE); required
  --project=PROJECT         passed to every gcloud command
  --remote-dir=DIR          where vggjax lives on the workers, relative to the home directory (default vggjax)
  --python=PYTHON           the workers' Python (default python3)
  --internal-ip             connect to the workers by internal IP (from a VM in the same network)
  --jax-init=flags|auto     multi-host start: flags (default) passes --coordinator_address/--num_processes/
                            --process_id read from the TPU metadata server; auto leaves it to vggjax
  --dry-run                 print the exact commands (shell-quoted, one per line) and run nothing
  -h, --help                this help
EOF
}

die() {
  echo "$SCRIPT: error: $*" >&2
  echo "run '$SCRIPT --help' for usage" >&2
  exit 2
}

warn() { echo "$SCRIPT: warning: $*" >&2; }

# Quotes one word for a POSIX shell: safe words as they are, --opt=VALUE with only VALUE quoted, anything
# else in single quotes (double quotes when that avoids escaping single quotes).
quote() {
  local s=$1
  if [[ -n $s && $s =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then
    printf '%s' "$s"
  elif [[ $s =~ ^(--[A-Za-z0-9_.-]+=)(.+)$ ]]; then
    printf '%s' "${BASH_REMATCH[1]}"
    quote "${BASH_REMATCH[2]}"
  elif [[ $s != *\'* ]]; then
    printf "'%s'" "$s"
  elif [[ $s != *[\$\`\\\"!]* ]]; then
    printf '"%s"' "$s"
  else
    printf "'%s'" "${s//\'/\'\\\'\'}"
  fi
}

quote_all() {
  local out='' w
  for w in "$@"; do
    out+="${out:+ }$(quote "$w")"
  done
  printf '%s' "$out"
}

DRY_RUN=0

# Runs a command, or prints it (shell-quoted, on one line) under --dry-run.
run() {
  if ((DRY_RUN)); then
    printf '%s\n' "$(quote_all "$@")"
  else
    "$@"
  fi
}

# ----------------------------------------------------------------------------------------------------------
# Worker side (runs on each TPU VM).

LOGDIR_DEFAULT="$HOME/vggjax-logs"

# The TPU metadata server's attribute $1 (VGGJAX_TPU_METADATA overrides the base URL, e.g. for tests).
metadata() {
  local base=${VGGJAX_TPU_METADATA:-http://metadata.google.internal/computeMetadata/v1/instance/attributes}
  curl -sf --max-time 5 -H 'Metadata-Flavor: Google' "$base/$1"
}

# Prints the explicit multi-process flags of this worker (nothing on a single-host slice or off a TPU VM).
distributed_flags() {
  local endpoints id first
  endpoints=$(metadata worker-network-endpoints) || return 0
  id=$(metadata agent-worker-number) || return 0
  local -a eps
  IFS=, read -ra eps <<<"$endpoints"
  ((${#eps[@]} > 1)) || return 0
  first=${eps[0]}                  # name:id:ip (older format) or a hostname; sorted by worker number
  printf '%s\n' "--coordinator_address=${first##*:}:${VGGJAX_COORDINATOR_PORT:-8476}" \
    "--num_processes=${#eps[@]}" "--process_id=$id"
}

# _supervise LOGDIR LOG -- CMD...: runs CMD with its output appended to LOG, records its pid and exit status,
# and forwards SIGTERM/SIGINT/SIGHUP to it as SIGTERM (the trainer then checkpoints and exits 0).
supervise() {
  local logdir=$1 log=$2
  shift 3
  echo $$ >"$logdir/supervisor.pid"
  "$@" >>"$log" 2>&1 </dev/null &
  local child=$! rc=0
  echo "$child" >"$logdir/train.pid"
  trap 'kill -TERM "$child" 2>/dev/null || true' TERM INT HUP
  while :; do
    rc=0
    wait "$child" || rc=$?
    kill -0 "$child" 2>/dev/null || break
  done
  echo "$rc" >"$logdir/train.rc.tmp"
  mv "$logdir/train.rc.tmp" "$logdir/train.rc"
  rm -f "$logdir/train.pid" "$logdir/supervisor.pid"
}

stop_following() {
  [[ -z ${TAIL_PID:-} ]] || kill "$TAIL_PID" 2>/dev/null || true
  # A signal between `tail ... &` and `TAIL_PID=$!` finds TAIL_PID empty: end this shell's tail by name too
  # (left running, it held the caller's pipes open until the training ended).
  pkill -TERM -P $$ -x tail 2>/dev/null || true
  echo "$(hostname): stopped following the log; training goes on ($SCRIPT stop ends it)" >&2
  exit 130
}

# _worker [--detach] [--logdir=DIR] [--jax-init=flags|auto] -- CMD...: starts CMD in its own session (it
# survives a dropped ssh connection), then streams its log until it ends and exits with its status.
worker() {
  local detach=0 logdir=$LOGDIR_DEFAULT jax_init=flags
  while (($#)); do
    case $1 in
      --detach) detach=1 ;;
      --logdir=*) logdir=${1#*=} ;;
      --jax-init=*) jax_init=${1#*=} ;;
      --) shift; break ;;
      *) die "_worker: unknown option $1" ;;
    esac
    shift
  done
  (($#)) || die "_worker: no command after --"
  local -a cmd=("$@")
  mkdir -p "$logdir"
  local pid
  if [[ -f $logdir/train.pid ]] && pid=$(<"$logdir/train.pid") && kill -0 "$pid" 2>/dev/null; then
    echo "$(hostname): a training process (pid $pid) is still running; stop it first ($SCRIPT stop)" >&2
    return 1
  fi
  if [[ $jax_init == flags ]]; then
    local -a dist=()
    mapfile -t dist < <(distributed_flags)
    cmd+=("${dist[@]}")
  elif [[ $jax_init != auto ]]; then
    die "--jax-init must be flags or auto, not $jax_init"
  fi
  local log
  log="$logdir/train-$(date +%Y%m%d-%H%M%S)-$$.log"
  rm -f "$logdir/train.rc" "$logdir/train.pid" "$logdir/supervisor.pid"
  printf '# %s on %s: %s\n' "$(date -Is)" "$(hostname)" "$(quote_all "${cmd[@]}")" >"$log"
  ln -sfn "$(basename "$log")" "$logdir/latest.log"
  # From here on a dropped connection (SIGHUP) or Ctrl-C ends this follower at once, never the training. Set
  # before the training starts: a signal that arrived between the two used to end the follower unhandled.
  TAIL_PID=''
  trap 'stop_following' INT HUP TERM
  setsid nohup bash "$0" _supervise "$logdir" "$log" -- "${cmd[@]}" </dev/null >/dev/null 2>&1 &
  local i
  for ((i = 0; i < 100; i++)); do
    [[ -s $logdir/supervisor.pid && -s $logdir/train.pid ]] && break
    [[ -f $logdir/train.rc ]] && break
    sleep 0.1
  done
  local sup
  sup=$(cat "$logdir/supervisor.pid" 2>/dev/null || true)
  echo "$(hostname): training started (pid $(cat "$logdir/train.pid" 2>/dev/null || echo '?')), log $log" >&2
  if ((detach)); then
    return 0
  fi
  if [[ -n $sup ]] && kill -0 "$sup" 2>/dev/null; then
    tail -n +1 -F -s 0.2 --pid="$sup" "$log" 2>/dev/null &  # in the background: signals reach the trap
    TAIL_PID=$!
    wait "$TAIL_PID" || true
  else
    cat "$log"
  fi
  for ((i = 0; i < 50; i++)); do
    [[ -f $logdir/train.rc ]] && break
    sleep 0.1
  done
  local rc
  rc=$(cat "$logdir/train.rc" 2>/dev/null || echo 1)
  return "$rc"
}

# _stop [--logdir=DIR]: SIGTERM to this worker's training process, if one runs.
stop_worker() {
  local logdir=$LOGDIR_DEFAULT pid
  [[ ${1:-} == --logdir=* ]] && logdir=${1#*=}
  if [[ -f $logdir/train.pid ]] && pid=$(<"$logdir/train.pid") && kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid"
    echo "$(hostname): sent SIGTERM to pid $pid (it checkpoints and exits)"
  else
    echo "$(hostname): no training process is running"
  fi
}

case ${1:-} in
  _supervise) shift; supervise "$@"; exit ;;
  _worker) shift; worker "$@"; exit ;;
  _stop) shift; stop_worker "$@"; exit ;;
esac

# ----------------------------------------------------------------------------------------------------------
# Client side (runs where gcloud is configured).

SUBCOMMAND='' NAME=${VGGJAX_TPU_NAME:-} ZONE=${VGGJAX_TPU_ZONE:-} PROJECT='' ACCELERATOR=''
VERSION=$DEFAULT_VERSION
SPOT=0 PREEMPTIBLE=0 REPO_URL='' REF='' REMOTE_DIR=vggjax PYTHON=python3 JAX_SPEC='jax[tpu]' PIP_EXTRA=''
CONFIG='' WORKDIR='' DETACH=0 WORKER=0 FOLLOW=1 INTERNAL_IP=0 YES=0 JAX_INIT=flags
ENVS=() OVERRIDES=()

# value OPTION "$@": the value of --opt=VALUE or --opt VALUE (sets SHIFT to the words consumed).
SHIFT=1
value() {
  local opt=$1 arg=$2
  if [[ $arg == *=* ]]; then
    VALUE=${arg#*=}
    SHIFT=1
  else
    if (($# < 3)) || [[ $3 == -* ]]; then
      die "$opt needs a value"
    fi
    VALUE=$3
    SHIFT=2
  fi
  [[ -n $VALUE ]] || die "$opt needs a non-empty value"
}

while (($#)); do
  arg=$1
  case $arg in
    -h | --help) usage; exit 0 ;;
    --dry-run) DRY_RUN=1; SHIFT=1 ;;
    --spot) SPOT=1; SHIFT=1 ;;
    --preemptible) PREEMPTIBLE=1; SHIFT=1 ;;
    --detach) DETACH=1; SHIFT=1 ;;
    --no-follow) FOLLOW=0; SHIFT=1 ;;
    --internal-ip) INTERNAL_IP=1; SHIFT=1 ;;
    --yes | -y) YES=1; SHIFT=1 ;;
    --name | --name=*) value --name "$@"; NAME=$VALUE ;;
    --zone | --zone=*) value --zone "$@"; ZONE=$VALUE ;;
    --project | --project=*) value --project "$@"; PROJECT=$VALUE ;;
    --accelerator-type | --accelerator-type=* | --type | --type=*) value --accelerator-type "$@"
      ACCELERATOR=$VALUE ;;
    --version | --version=*) value --version "$@"; VERSION=$VALUE ;;
    --repo | --repo=*) value --repo "$@"; REPO_URL=$VALUE ;;
    --ref | --ref=*) value --ref "$@"; REF=$VALUE ;;
    --remote-dir | --remote-dir=*) value --remote-dir "$@"; REMOTE_DIR=$VALUE ;;
    --python | --python=*) value --python "$@"; PYTHON=$VALUE ;;
    --jax | --jax=*) value --jax "$@"; JAX_SPEC=$VALUE ;;
    --pip | --pip=*) value --pip "$@"; PIP_EXTRA=$VALUE ;;
    --config | --config=*) value --config "$@"; CONFIG=$VALUE ;;
    --workdir | --workdir=*) value --workdir "$@"; WORKDIR=$VALUE ;;
    --env | --env=*) value --env "$@"
      [[ $VALUE =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "--env takes KEY=VALUE, not '$VALUE'"
      ENVS+=("$VALUE") ;;
    --worker | --worker=*) value --worker "$@"; WORKER=$VALUE ;;
    --jax-init | --jax-init=*) value --jax-init "$@"; JAX_INIT=$VALUE ;;
    --) shift; OVERRIDES=("$@"); break ;;
    -*) die "unknown option $arg" ;;
    *)
      [[ -z $SUBCOMMAND ]] || die "unexpected argument '$arg' (training overrides go after --)"
      SUBCOMMAND=$arg; SHIFT=1 ;;
  esac
  shift "$SHIFT"
done

[[ -n $SUBCOMMAND ]] || { usage >&2; exit 2; }

require() {
  local var
  for var in "$@"; do
    case $var in
      NAME) [[ -n $NAME ]] || die "$SUBCOMMAND needs --name=NAME (the TPU VM slice) or \$VGGJAX_TPU_NAME" ;;
      ZONE) [[ -n $ZONE ]] || die "$SUBCOMMAND needs --zone=ZONE (e.g. us-central2-b) or \$VGGJAX_TPU_ZONE" ;;
      ACCELERATOR) [[ -n $ACCELERATOR ]] || die "create needs --accelerator-type=TYPE (e.g. v4-32)" ;;
      WORKDIR) [[ -n $WORKDIR ]] || die "train needs --workdir=gs://BUCKET/PATH or a shared path" ;;
    esac
  done
}

TPU=(gcloud compute tpus tpu-vm)
gflags() {  # the flags every gcloud command of this slice takes
  GFLAGS=("--zone=$ZONE")
  [[ -z $PROJECT ]] || GFLAGS+=("--project=$PROJECT")
}

# ssh WORKER REMOTE_COMMAND
ssh_workers() {
  local worker=$1 remote=$2
  local -a extra=()
  ((INTERNAL_IP)) && extra+=(--internal-ip)
  run "${TPU[@]}" ssh "$NAME" "${GFLAGS[@]}" "--worker=$worker" "${extra[@]}" "--command=$remote"
}

check_overrides() {
  local o
  for o in "${OVERRIDES[@]}"; do
    [[ $o == --* ]] || die "training overrides look like --config.FIELD=VALUE, not '$o'"
  done
  ((${#OVERRIDES[@]} == 0)) || [[ $SUBCOMMAND == train ]] || die "$SUBCOMMAND takes no arguments after --"
}

check_overrides
gflags
case $SUBCOMMAND in
  create)
    require NAME ZONE ACCELERATOR
    ((SPOT && PREEMPTIBLE)) && die "--spot and --preemptible exclude each other"
    args=("${TPU[@]}" create "$NAME" "${GFLAGS[@]}" "--accelerator-type=$ACCELERATOR" "--version=$VERSION")
    ((SPOT)) && args+=(--spot)
    ((PREEMPTIBLE)) && args+=(--preemptible)
    run "${args[@]}"
    ;;
  setup)
    require NAME ZONE
    [[ -z $REF || -n $REPO_URL ]] || die "--ref needs --repo=URL"
    [[ $REMOTE_DIR != /* && $REMOTE_DIR != *..* ]] || die "--remote-dir is relative to the workers' home"
    d=$(quote "$REMOTE_DIR")
    py=$(quote "$PYTHON")
    install="$py -m pip install -U pip && $py -m pip install -e $(quote "./$REMOTE_DIR")"
    install+=" $(quote "$JAX_SPEC")${PIP_EXTRA:+ $PIP_EXTRA}"
    if [[ -n $REPO_URL ]]; then
      fetch="rm -rf $d && git clone $(quote "$REPO_URL") $d"
      [[ -z $REF ]] || fetch+=" && git -C $d checkout $(quote "$REF")"
    else
      archive="${TMPDIR:-/tmp}/vggjax-src-$NAME.tar.gz"
      if git -C "$REPO" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
        pack="cd $(quote "$REPO") && git ls-files -z --cached --others --exclude-standard"
        pack+=" | tar --null --ignore-failed-read -czf $(quote "$archive") -T -"
      else
        pack="cd $(quote "$REPO") && tar --exclude=.git --exclude='.venv*' --exclude=__pycache__"
        pack+=" -czf $(quote "$archive") ."
      fi
      run bash -c "$pack"
      extra=()
      ((INTERNAL_IP)) && extra+=(--internal-ip)
      run "${TPU[@]}" scp "$archive" "$NAME:vggjax-src.tar.gz" "${GFLAGS[@]}" --worker=all "${extra[@]}"
      fetch="rm -rf $d.new && mkdir -p $d.new && tar -xzf vggjax-src.tar.gz -C $d.new && rm -rf $d"
      fetch+=" && mv $d.new $d && rm -f vggjax-src.tar.gz"
    fi
    ssh_workers all "set -e; $fetch && $install"
    ;;
  train)
    require NAME ZONE WORKDIR
    [[ $JAX_INIT == flags || $JAX_INIT == auto ]] || die "--jax-init must be flags or auto"
    if [[ $WORKDIR != gs://* ]]; then
      [[ $WORKDIR == /* ]] || die "--workdir must be gs://BUCKET/PATH or an absolute path on a filesystem" \
        "mounted on every worker (a relative path would land inside each worker's copy of vggjax)"
      warn "$WORKDIR must be on a filesystem shared by all workers of a multi-host slice (every process" \
        "writes its part of the checkpoint); gs://BUCKET/PATH is the usual choice"
    fi
    cmd=()
    ((${#ENVS[@]} == 0)) || cmd+=(env "${ENVS[@]}")
    cmd+=("$PYTHON" -m vggjax.main)
    [[ -z $CONFIG ]] || cmd+=("--config=$CONFIG")
    cmd+=("--workdir=$WORKDIR" "${OVERRIDES[@]}")
    wflags=("--jax-init=$JAX_INIT")
    ((DETACH)) && wflags+=(--detach)
    remote="cd $(quote "$REMOTE_DIR") && bash launch/tpu_vm.sh _worker $(quote_all "${wflags[@]}")"
    remote+=" -- $(quote_all "${cmd[@]}")"
    ssh_workers all "$remote"
    if ((DETACH && !DRY_RUN)); then
      echo "training runs on every worker; follow it with: $SCRIPT logs --name=$NAME --zone=$ZONE" >&2
    fi
    ;;
  logs)
    require NAME ZONE
    if ((FOLLOW)); then
      ssh_workers "$WORKER" "tail -n 200 -F vggjax-logs/latest.log"
    else
      ssh_workers "$WORKER" "tail -n 200 vggjax-logs/latest.log"
    fi
    ;;
  stop)
    require NAME ZONE
    ssh_workers all "bash $(quote "$REMOTE_DIR")/launch/tpu_vm.sh _stop"
    ;;
  describe)
    require NAME ZONE
    run "${TPU[@]}" describe "$NAME" "${GFLAGS[@]}"
    ;;
  delete)
    require NAME ZONE
    args=("${TPU[@]}" delete "$NAME" "${GFLAGS[@]}")
    ((YES)) && args+=(--quiet)
    run "${args[@]}"
    ;;
  *) die "unknown subcommand '$SUBCOMMAND' (create, setup, train, logs, stop, describe, delete)" ;;
esac
