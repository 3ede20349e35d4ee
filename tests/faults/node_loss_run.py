"""Run a config on a 3-node local Ray cluster (``ray.cluster_utils.Cluster``) and remove a worker node,
ungracefully, once ``--kill-after`` shards of ``--watch`` are committed. Own process: a cluster and the
test session's embedded Ray cannot share one driver. Prints the RunResult as JSON on the last line."""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import tempfile
import threading
import time
from dataclasses import asdict

# Every path Ray writes (including the "current cluster" address file) under our own folder.
TMP = tempfile.mkdtemp(prefix="ffcluster-", dir="/tmp")
os.environ["RAY_TMPDIR"] = TMP
os.makedirs(os.path.join(TMP, "ray"), exist_ok=True)

import ray  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

from pipeline.config import load_config  # noqa: E402
from pipeline.engine.runner import Runner  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("config")
    ap.add_argument("output")
    ap.add_argument("--watch", default="busy")
    ap.add_argument("--kill-after", type=int, default=2)
    args = ap.parse_args()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "temp_dir": TMP,
                                                            "include_dashboard": False})
    workers = [cluster.add_node(num_cpus=1) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    removed: list[str] = []

    def remove_when_busy() -> None:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if len(glob.glob(os.path.join(args.output, "manifests", args.watch, "*.parquet"))) >= args.kill_after:
                cluster.remove_node(workers[0], allow_graceful=False)
                removed.append(time.strftime("%H:%M:%S"))
                return
            time.sleep(0.05)

    watcher = threading.Thread(target=remove_when_busy, daemon=True)
    watcher.start()
    cfg, stages = load_config(args.config)
    result = Runner(cfg, stages, args.output, show_progress=False).run(address=cluster.address)
    watcher.join(timeout=1)
    ray.shutdown()
    cluster.shutdown()
    print(json.dumps({"result": asdict(result), "removed": removed}, default=str))
    return 0 if result.complete else 1


if __name__ == "__main__":
    sys.exit(main())
