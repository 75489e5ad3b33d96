"""Run batch-train on a real two-node Ray cluster (head + one worker node, one CPU each) and print
the published artifact's path. Used by test_ray_cluster.py in its own process, so the cluster
never meets the test session's local Ray runtime.

    python -m tests.ray_cluster_job DATA ARTIFACTS CACHE [batch-train flags...]
"""

import os
import subprocess
import sys

from ray.cluster_utils import Cluster


def main() -> int:
    data, artifacts, cache, *flags = sys.argv[1:]
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        env = {**os.environ, "RAY_ADDRESS": cluster.address}
        command = [sys.executable, "-m", "batch.train", "--data", data, "--artifacts", artifacts,
                   "--cache", cache, "--actors", "2", "--threads-per-actor", "1", *flags]
        return subprocess.run(command, env=env, timeout=600).returncode
    finally:
        cluster.shutdown()


if __name__ == "__main__":
    sys.exit(main())
