#!/usr/bin/env bash
# Runs an ldm_jax command on every worker of a Cloud TPU VM pod slice (e.g. v4-32: 4 workers).
#
#   bash launch/tpu_pod.sh [--dry_run] [--copy] [--setup] TPU_NAME ZONE -- \
#       python -m ldm_jax.train --config=configs/f8_lsun_churches.py --workdir=/mnt/shared/runs/x
#
#   --copy   first copies this checkout to ~/ldm_jax on every worker (gcloud ... scp --worker=all)
#   --setup  first creates ~/ldm_jax/.venv on every worker with requirements.txt and then
#            `pip install -U "jax[tpu]==<the pinned version>"` (the TPU build of jaxlib + libtpu;
#            requirements.txt pins jax[cpu], so this step is what makes the workers see their TPUs)
#   --dry_run  prints the gcloud commands instead of running them
#
# Environment: PROJECT (gcloud --project, optional), REMOTE_DIR (default ldm_jax, relative to
# the workers' home directory), PYTHON (python on the workers, default python3).
#
# Every worker runs the same command at the same time (gcloud ssh --worker=all). No
# coordinator flags are needed: ldm_jax.parallel.distributed sees the TPU chips and calls
# jax.distributed.initialize() with no arguments, which reads the worker list and this
# worker's id from the TPU VM metadata (process 0 = worker 0, port 8482). A leading `python`
# in the command is replaced by the workers' venv python. The data set path and --workdir must
# be visible to every worker (a shared file system, e.g. Filestore or gcsfuse): each worker reads its own
# slice of each global batch from the same data set, and checkpoints are written collectively.
set -euo pipefail

dry_run=0
copy=0
setup=0
while [ $# -gt 0 ]; do
  case "$1" in
    --dry_run) dry_run=1; shift ;;
    --copy) copy=1; shift ;;
    --setup) setup=1; shift ;;
    -h|--help) sed -n '2,24p' "$0"; exit 0 ;;
    --) echo "error: TPU_NAME and ZONE come before --" >&2; exit 2 ;;
    -*) echo "error: unknown option $1 (use --dry_run, --copy, --setup)" >&2; exit 2 ;;
    *) break ;;
  esac
done
if [ $# -lt 3 ] || [ "$3" != "--" ]; then
  echo "usage: bash launch/tpu_pod.sh [--dry_run] [--copy] [--setup] TPU_NAME ZONE -- COMMAND ..." >&2
  exit 2
fi
tpu_name=$1
zone=$2
shift 3
if [ $# -eq 0 ]; then
  echo "error: no command after --" >&2
  exit 2
fi
remote_dir=${REMOTE_DIR:-ldm_jax}
remote_python=${PYTHON:-python3}
here=$(cd "$(dirname "$0")/.." && pwd)
# The TPU build of the jax version this checkout pins (requirements.txt pins jax[cpu]).
jax_version=$(sed -n 's/^jax\[cpu\]==//p' "$here/requirements.txt")
project_args=()
if [ -n "${PROJECT:-}" ]; then
  project_args=(--project "$PROJECT")
fi

# The command as one shell-quoted string for the remote shell; `python` -> the venv's python.
if [ "$1" = "python" ] || [ "$1" = "python3" ]; then
  shift
  set -- .venv/bin/python "$@"
fi
remote_cmd=$(printf '%q ' "$@")

run() {
  if [ "$dry_run" = 1 ]; then
    printf '%q ' "$@"
    printf '\n'
  else
    "$@"
  fi
}

ssh_all() {
  run gcloud compute tpus tpu-vm ssh "$tpu_name" --zone "$zone" "${project_args[@]}" \
    --worker=all --command "$1"
}

if [ "$copy" = 1 ]; then
  ssh_all "mkdir -p ~/$remote_dir"
  run gcloud compute tpus tpu-vm scp --recurse "$here/ldm_jax" "$here/configs" "$here/launch" \
    "$here/requirements.txt" "$tpu_name:~/$remote_dir/" --zone "$zone" "${project_args[@]}" \
    --worker=all
fi
if [ "$setup" = 1 ]; then
  ssh_all "cd ~/$remote_dir && { [ -x .venv/bin/python ] || $remote_python -m venv .venv; } && .venv/bin/pip install -q -r requirements.txt && .venv/bin/pip install -q -U 'jax[tpu]==$jax_version'"
fi
# PYTHONUNBUFFERED: worker output is streamed back through ssh as it is printed.
ssh_all "cd ~/$remote_dir && PYTHONUNBUFFERED=1 $remote_cmd"
