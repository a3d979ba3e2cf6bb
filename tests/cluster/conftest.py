"""The cluster tests run against a real one-node SLURM (scripts/slurm_cluster.sh start; scripts/test_cluster.sh does
start, test, stop). Without one they skip, unless DARTMAMBA_CLUSTER=local asks for the same tests through submitit's
local executor and the deepspeed launcher (where the daemons cannot run)."""
from __future__ import annotations

import os
import shutil
import subprocess

import pytest

NO_CLUSTER = ("no SLURM cluster is up (SLURM_CONF unset or sinfo fails): run scripts/test_cluster.sh, or "
              "scripts/slurm_cluster.sh start and . /tmp/dartmamba-slurm/env.sh; DARTMAMBA_CLUSTER=local runs these "
              "tests through submitit's local executor instead")


def pytest_configure(config):
    config.addinivalue_line("markers", "cluster: needs a SLURM cluster (scripts/test_cluster.sh), else skipped")


def cluster_mode() -> str | None:
    """"slurm" (a cluster answers), "local" (DARTMAMBA_CLUSTER=local), or None."""
    if os.environ.get("DARTMAMBA_CLUSTER") == "local":
        return "local"
    if os.environ.get("SLURM_CONF") and shutil.which("sinfo"):
        try:
            proc = subprocess.run(["sinfo", "-h", "-o", "%a"], capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.TimeoutExpired):
            return None
        if proc.returncode == 0 and "up" in proc.stdout:
            return "slurm"
    return None


def pytest_collection_modifyitems(config, items):
    if cluster_mode() is not None:
        return
    skip = pytest.mark.skip(reason=NO_CLUSTER)
    for item in items:
        if item.get_closest_marker("cluster") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def mode() -> str:
    return cluster_mode()


@pytest.fixture(scope="session")
def log_dir(tmp_path_factory):
    """Where the tests keep the jobs' output (DARTMAMBA_CLUSTER_LOG_DIR, for CI artifacts and the report)."""
    path = os.environ.get("DARTMAMBA_CLUSTER_LOG_DIR")
    if path:
        os.makedirs(path, exist_ok=True)
        return path
    return str(tmp_path_factory.mktemp("cluster-logs"))
