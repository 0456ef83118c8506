"""A real multi-node local Ray cluster (head + worker nodes, one CPU each) for the fault tests."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

OBJECT_STORE_BYTES = 96 * 1024 * 1024


@contextmanager
def multi_node_cluster(workers: int = 2, join: bool = False) -> Iterator:
    """A head and ``workers`` worker nodes, one CPU each: two actors of a kind fill two CPUs and a
    replacement has somewhere to go. ``join``: this driver joins at once (so the GCS actor table can be read
    before a job connects). The worker nodes are ``cluster.added`` in order. Shut down on exit.

    RAY_AUTH_MODE stays as the session set it (conftest): changing it after a first ray.init in this process
    makes every actor creation on the new cluster fail (SchedulingCancelled)."""
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()  # the session's local cluster; `ray_local` restarts it for later modules
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("RAY_ADDRESS", raising=False)
        cluster = Cluster(
            initialize_head=True,
            head_node_args={
                "num_cpus": 1,
                "object_store_memory": OBJECT_STORE_BYTES,
                "include_dashboard": False,
            },
        )
        try:
            cluster.added = [
                cluster.add_node(num_cpus=1, object_store_memory=OBJECT_STORE_BYTES) for _ in range(workers)
            ]
            cluster.wait_for_nodes()
            if join:
                ray.init(address=cluster.address, logging_level=logging.WARNING)
            yield cluster
        finally:
            ray.shutdown()
            cluster.shutdown()
