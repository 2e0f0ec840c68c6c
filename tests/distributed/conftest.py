"""A real two-node Ray cluster on 127.0.0.1 for the distributed tests (one per test session).

Loopback needs a workaround on machines whose other address is unreachable: with
RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 the head and the driver listen on 127.0.0.1, and the worker
node is added in-process with ray.cluster_utils.Cluster (`ray start` refuses to add one then).
Each node gets one CPU so that two tasks run on two different nodes.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

# Read by Ray when it is imported: set before the first `import ray` of the session.
_TMP = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # Unix socket paths must stay under 107 bytes
os.makedirs(os.path.join(_TMP, "ray"), exist_ok=True)
os.environ.update(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_USAGE_STATS_ENABLED="0", RAY_TMPDIR=_TMP)
os.environ.pop("RETRIEVAL_RAY_ADDRESS", None)

ray = pytest.importorskip("ray", reason="the distributed tests need Ray: pip install '.[ray]'")


@dataclass
class LocalCluster:
    cluster: Any
    address: str
    worker: Any  # the second node's handle, so a test can remove it mid-run

    def add_worker(self) -> Any:
        self.worker = self.cluster.add_node(num_cpus=1, object_store_memory=100 * 2**20)
        self.cluster.wait_for_nodes()
        return self.worker


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[LocalCluster]:
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "object_store_memory": 100 * 2**20, "include_dashboard": False})
    local = LocalCluster(cluster, cluster.address, None)
    local.add_worker()
    try:
        yield local
    finally:
        ray.shutdown()
        cluster.shutdown()
        shutil.rmtree(_TMP, ignore_errors=True)


@pytest.fixture
def ray_address(ray_cluster: LocalCluster) -> str:
    return ray_cluster.address
