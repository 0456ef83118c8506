#!/usr/bin/env bash
# Submit an embedpipe job to a running Ray cluster (KubeRay, `ray up`, or infra/docker-compose.yml).
set -euo pipefail

usage() {
  cat >&2 <<'USAGE'
usage: cluster/submit.sh JOB SPEC [RAY_ADDRESS]
  JOB          embed | dedup | mine | reembed
  SPEC         spec YAML inside this repository (uploaded with the working dir), or a URL
  RAY_ADDRESS  Ray dashboard address; default $RAY_ADDRESS, else http://127.0.0.1:8265
AWS credentials are never passed here: the cluster's containers read them from their own
environment (Kubernetes Secret, instance profile, docker-compose). For a cluster with token
authentication (KubeRay authOptions, or a `ray start --head` on a machine with ~/.ray/auth_token),
export RAY_AUTH_MODE=token and the token first (RAY_AUTH_TOKEN, or ~/.ray/auth_token on this
machine); otherwise the submission fails with "Missing authentication token". See cluster/README.md.
USAGE
  exit 2
}

[[ $# -eq 2 || $# -eq 3 ]] || usage
job=$1
spec=$2
address=${3:-${RAY_ADDRESS:-http://127.0.0.1:8265}}

case $job in
  embed | dedup | mine | reembed) ;;
  *) echo "submit.sh: unknown job '$job'" >&2; usage ;;
esac

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [[ $spec != *://* ]]; then
  [[ -f $spec ]] || { echo "submit.sh: spec not found: $spec" >&2; exit 2; }
  spec_abs=$(cd "$(dirname "$spec")" && pwd)/$(basename "$spec")
  case $spec_abs in
    "$root"/*) spec=${spec_abs#"$root"/} ;;
    *) echo "submit.sh: spec must be inside $root (only the working dir is uploaded)" >&2; exit 2 ;;
  esac
fi

cd "$root"
exec ray job submit --address "$address" --working-dir . \
  --runtime-env-json '{"excludes": [".git", ".venv", "**/__pycache__", "*.egg-info", ".pytest_cache", ".ruff_cache", "demo-output", "build", "dist"]}' \
  -- python -m "jobs.$job" --spec "$spec"
