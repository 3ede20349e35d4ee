"""The embedded Ray a run starts for itself: stopped at the end with none of its processes left."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]

# Runs in a fresh interpreter: the suite's own Ray is already up in this one, and connect() only
# starts a Ray where none is.
_SCRIPT = textwrap.dedent("""
    import json, os, time

    import ray

    from pipeline.engine import cluster
    from tests.fixtures.ray_cluster import descendants

    services = ray._private.services
    real = (services.get_node, services.start_api_server)
    owned = cluster.connect(num_cpus=1)
    restored = (services.get_node, services.start_api_server) == real
    kinds = sorted(ray._private.worker._global_node.all_processes)
    assert ray.get(ray.remote(lambda: 41 + 1).remote()) == 42
    before = descendants(os.getpid())
    cluster.shutdown()
    deadline = time.monotonic() + 60  # a bound for a stuck process, not a timing claim
    while descendants(os.getpid()) and time.monotonic() < deadline:
        time.sleep(0.1)
    print(json.dumps({"owned": owned, "restored": restored, "kinds": kinds, "before": len(before),
                      "left": sorted(descendants(os.getpid())), "initialized": ray.is_initialized()}))
""")


def test_an_embedded_ray_is_stopped_with_every_process_it_started_including_the_killed_monitor() -> None:
    env = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_MODE"}  # Ray's default: token auth, with a notice
    proc = subprocess.run([sys.executable, "-c", _SCRIPT], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["owned"] is True
    assert res["restored"] is True  # the start's shortcuts are Ray's own functions again once it is up
    assert "monitor" in res["kinds"] and "raylet" in res["kinds"]  # the monitor shutdown() kills was there
    assert "dashboard" not in res["kinds"]  # include_dashboard=False: no dashboard head either
    assert res["before"] >= 4  # GCS, raylet, monitor, agents, the task's worker
    assert res["left"] == []
    assert res["initialized"] is False
    assert "Token authentication" not in proc.stderr  # token auth stays on, without Ray's notice on every start


_SESSION_SCRIPT = textwrap.dedent("""
    import json

    import ray

    from pipeline.engine import cluster

    with cluster.session(num_cpus=1) as owned:
        answer = ray.get(ray.remote(lambda: 6 * 7).remote())
    stopped = not ray.is_initialized()
    ray.init(num_cpus=1, include_dashboard=False, configure_logging=False)  # somebody else's Ray
    with cluster.session() as joined_owned:
        pass
    kept = ray.is_initialized()
    ray.shutdown()
    print(json.dumps({"owned": owned, "answer": answer, "stopped": stopped, "joined_owned": joined_owned,
                      "kept": kept}))
""")


def test_a_command_session_stops_the_ray_it_started_and_leaves_one_it_joined_running() -> None:
    proc = subprocess.run([sys.executable, "-c", _SESSION_SCRIPT], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res == {"owned": True, "answer": 42, "stopped": True, "joined_owned": False, "kept": True}
