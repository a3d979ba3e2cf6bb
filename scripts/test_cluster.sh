#!/usr/bin/env bash
# CI: start a one-node SLURM (scripts/slurm_cluster.sh), run the cluster tests (tests/cluster/) against it, stop it
# and clean up, also when a test fails or the script is interrupted. Where the daemons cannot start, the same tests
# run through submitit's local executor (DARTMAMBA_CLUSTER=local) and the reason is printed.
# Job logs of the tests are kept in $DARTMAMBA_CLUSTER_LOG_DIR (default: a temporary folder, printed).
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python
export DARTMAMBA_SLURM_DIR="${DARTMAMBA_SLURM_DIR:-$(mktemp -d /tmp/dartmamba-slurm.XXXXXX)}"
export DARTMAMBA_CLUSTER_LOG_DIR="${DARTMAMBA_CLUSTER_LOG_DIR:-$(mktemp -d /tmp/dartmamba-cluster-logs.XXXXXX)}"
start=$(date +%s)

cleanup() { bash scripts/slurm_cluster.sh stop || true; }
trap cleanup EXIT INT TERM

if start_log=$(bash scripts/slurm_cluster.sh start 2>&1); then
    echo "$start_log"
    # shellcheck disable=SC1091
    . "$DARTMAMBA_SLURM_DIR/env.sh"
    echo "test_cluster: SLURM up ($(sinfo -V)); SLURM_CONF=$SLURM_CONF"
else
    echo "test_cluster: the SLURM daemons could not start; running the cluster tests through submitit's local" \
         "executor instead. The error:"
    echo "$start_log" | sed 's/^/    /'
    export DARTMAMBA_CLUSTER=local
fi

TRITON_INTERPRET=1 "$PY" -m pytest -q -x tests/cluster -rs --durations=10 -p no:cacheprovider "$@"
status=$?
echo "test_cluster: pytest exit status $status after $(( $(date +%s) - start )) s; job logs in $DARTMAMBA_CLUSTER_LOG_DIR"
exit $status
