"""Shared fixtures: the single-node SLURM cluster and a work folder for its jobs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.slurm_cluster import ClusterUnavailableError, SlurmCluster, SlurmClusterError, ensure_cluster


def _running_in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() == "true"


@pytest.fixture(scope="session")
def slurm_cluster() -> SlurmCluster:
    """Return the SLURM test cluster, starting it with ``tests/slurm/cluster.sh up`` if needed.

    Skips the test when no node is idle and this machine cannot start the
    cluster (not root, or not Debian). Under ``CI=true`` that case fails
    instead, so a CI run cannot pass with its SLURM tests silently skipped.
    A failed ``cluster.sh up`` always fails, with the daemon log tail.
    """
    try:
        return ensure_cluster()
    except ClusterUnavailableError as error:
        if _running_in_ci():
            pytest.fail(f"CI=true but the SLURM test cluster is unavailable: {error}", pytrace=False)
        pytest.skip(str(error))
    except SlurmClusterError as error:
        pytest.fail(f"the SLURM test cluster did not start: {error}", pytrace=False)


@pytest.fixture
def tmp_workdir(tmp_path: Path) -> Path:
    """Return a fresh folder for one test's jobs to read and write.

    Compute jobs run on this same machine as the submitting user, so pytest's
    tmp_path is visible to them as it is.
    """
    return tmp_path
