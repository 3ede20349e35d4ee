"""Connecting to Ray and sizing stage actors so that every phase fits the cluster.

On a 2-core laptop a naive "1 CPU per actor" plan deadlocks as soon as two stages are alive at
once. Stages alive together (one phase) split the cluster's CPUs between them; Ray CPU requests are
logical, so fractional requests are fine, and an idle stage leaves its cores to the busy ones.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import sys
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray

from pipeline.config import code_paths
from pipeline.engine import embedded
from stages.base import Resources


class ClusterFitError(RuntimeError):
    pass


class ClusterConnectError(RuntimeError):
    pass


@contextlib.contextmanager
def _sigterm_kept() -> Iterator[None]:
    """``ray.init`` installs two SIGTERM handlers of its own: a Python one (``sys.exit``) and, under it,
    the C++ failure handler of its core worker, which prints a stack dump of every thread. Afterwards
    the Python handler the process had before (the CLI's clean stop) is put back, else Ray's Python
    one, so that SIGTERM is handled in Python and no dump is printed."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return
    before = signal.getsignal(signal.SIGTERM)
    try:
        yield
    finally:
        handler = before if callable(before) else signal.getsignal(signal.SIGTERM)
        if handler is not None:
            signal.signal(signal.SIGTERM, handler)


AUTH_MODE = "RAY_AUTH_MODE"
# Where Ray looks for a cluster token, in its own order: the variable, the file it names, the default file.
TOKEN_VARIABLE, TOKEN_PATH_VARIABLE = "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"
DEFAULT_TOKEN_FILE = Path.home() / ".ray" / "auth_token"


def token_available() -> bool:
    """Whether this machine holds a Ray cluster token (as ``ray start`` finds one to turn token auth on)."""
    if os.environ.get(TOKEN_VARIABLE):
        return True
    path = os.environ.get(TOKEN_PATH_VARIABLE)
    candidate = Path(path).expanduser() if path else DEFAULT_TOKEN_FILE
    try:
        return candidate.is_file() and candidate.stat().st_size > 0
    except OSError:
        return False


def _send_token_when_held() -> None:
    """A client given an address sends no token unless ``RAY_AUTH_MODE=token``, while ``ray start``
    turns token auth on wherever a token exists: with a token here and the mode unset, send it (a
    cluster without token auth ignores it)."""
    if os.environ.get(AUTH_MODE) is None and token_available():
        os.environ[AUTH_MODE] = "token"
        config = getattr(getattr(ray, "_raylet", None), "Config", None)
        if config is not None:  # Ray caches its config at import: refresh it as its own setup does
            config.initialize("")


@contextlib.contextmanager
def _stderr_held(sink: Any) -> Iterator[None]:
    """Ray's C++ client writes one warning a second to fd 2 while it retries a refused connection:
    hold them in ``sink``, so that a failure can be said in one line."""
    sys.stderr.flush()
    saved = os.dup(2)
    os.dup2(sink.fileno(), 2)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


def _join(address: str, env: dict[str, Any]) -> None:
    _send_token_when_held()
    with tempfile.TemporaryFile() as held:
        try:
            with _stderr_held(held):
                ray.init(address=address, runtime_env=env, log_to_driver=True)
        except Exception as exc:  # Ray raises ConnectionError, RuntimeError or its own types here
            held.seek(0)
            said = held.read().decode(errors="replace") + str(exc)
            if "InvalidAuthToken" in said or "Unauthenticated" in said:
                raise ClusterConnectError(
                    f"the Ray cluster at {address} wants its authentication token: set {TOKEN_VARIABLE}=<token> "
                    f"(`ray get-auth-token` on the head node prints it) or {TOKEN_PATH_VARIABLE}=<file>, "
                    f"or copy the head's ~/.ray/auth_token to {DEFAULT_TOKEN_FILE}") from None
            last = (str(exc).strip().splitlines() or [type(exc).__name__])[-1]
            raise ClusterConnectError(f"cannot connect to the Ray cluster at {address}: {last}") from None
        held.seek(0)
        sys.stderr.write(held.read().decode(errors="replace"))


def connect(address: str | None = None, num_cpus: int | None = None, py_modules: list[str] | None = None) -> bool:
    """Connect to Ray; returns True when this call started a local embedded Ray (and so owns it).

    ``py_modules``: the user's own stage packages (folders). A cluster gets them uploaded with
    FaceFoundry's packages (Ray's ``py_modules``); the embedded Ray's workers find them on their
    ``PYTHONPATH``."""
    if ray.is_initialized():
        return False
    with _sigterm_kept():
        return _connect(address, num_cpus, py_modules)


def _connect(address: str | None, num_cpus: int | None, py_modules: list[str] | None) -> bool:
    address = address or os.environ.get("RAY_ADDRESS")
    py_modules = list(py_modules or [])
    env_vars = {"HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "0"),
                "PYTHONWARNINGS": "ignore::DeprecationWarning"}
    env: dict[str, Any] = {"env_vars": env_vars}
    if address:
        import facekit
        import manifests
        import pipeline
        import stages
        import training

        if os.environ.get("FACEFOUNDRY_UPLOAD_CODE", "1") == "1":
            env["py_modules"] = [pipeline, stages, manifests, facekit, training]
        if py_modules:
            env["py_modules"] = [*env.get("py_modules", []), *(str(Path(p).resolve()) for p in py_modules)]
        _join(address, env)
        return False
    if py_modules:
        env_vars["PYTHONPATH"] = os.pathsep.join(
            [*code_paths(py_modules), *filter(None, [os.environ.get("PYTHONPATH")])])
    tmp = os.environ.get("FACEFOUNDRY_RAY_TMP") or tempfile.mkdtemp(prefix="ffray-", dir="/tmp")
    embedded.start(num_cpus=num_cpus or os.cpu_count() or 1, _temp_dir=tmp, runtime_env=env, log_to_driver=True,
                   configure_logging=False)
    return True


def shutdown() -> None:
    """Stop the embedded Ray that :func:`connect` started (see ``embedded.stop``)."""
    embedded.stop()


@contextlib.contextmanager
def session(address: str | None = None, num_cpus: int | None = None,
            py_modules: list[str] | None = None) -> Iterator[bool]:
    """Ray for one command: connected on entry, and stopped on exit when this call started it (a
    cluster it only joined keeps running). Yields whether it owns the Ray."""
    owns = connect(address, num_cpus, py_modules)
    try:
        yield owns
    finally:
        if owns:
            shutdown()


@dataclass(frozen=True)
class ActorPlan:
    initial: int  # actors started with the phase
    maximum: int  # actors the stage may grow to while it has a backlog
    num_cpus: float
    num_gpus: float
    memory: int | None


def cluster_totals() -> tuple[float, float]:
    res = ray.cluster_resources()
    return float(res.get("CPU", 0.0)), float(res.get("GPU", 0.0))


def plan_actors(stages: list[tuple[str, Resources, int | None]], cpus: float, gpus: float
                ) -> tuple[dict[str, ActorPlan], int]:
    """Size the actor pools of the stages alive in one phase; returns the plans and the actor budget.

    GPU stages get as many actors as the GPUs hold, from the start. CPU stages start with one actor
    and grow towards one per core while they have a backlog (the runner adds actors to the stage whose
    ready shards wait), so cheap stages do not hold cores that an expensive one needs. Every actor's
    CPU request is capped at cpus / budget, so the whole budget always fits: no deadlock on 2 cores.
    """
    if not stages:
        return {}, 0
    cores = max(1, math.floor(cpus + 1e-9))
    budget = len(stages) + cores
    cap_req = cpus / budget
    out: dict[str, ActorPlan] = {}
    for stage_id, res, max_workers in stages:
        if res.gpus > 0:
            if gpus < res.gpus:
                raise ClusterFitError(
                    f"stage {stage_id!r} declares gpus={res.gpus} but the cluster has {gpus:g} GPU(s); "
                    f"run it on a GPU cluster (--address) or set stages.{stage_id}.resources.gpus=0"
                )
            initial = maximum = max(1, math.floor(gpus / res.gpus + 1e-9))
        else:
            initial = 1
            maximum = max(1, min(cores, math.floor(cpus / res.cpus + 1e-9) if res.cpus > 0 else cores))
        if max_workers is not None:
            initial, maximum = min(initial, max_workers), min(maximum, max_workers)
        memory = int(res.memory_gb * 2**30) if res.memory_gb > 0 else None
        out[stage_id] = ActorPlan(initial=initial, maximum=maximum, num_cpus=round(min(res.cpus, cap_req), 4),
                                  num_gpus=res.gpus, memory=memory)
    if sum(p.maximum for p in out.values()) <= budget:
        # Everything fits at full size: start there rather than pay actor start-up while work waits.
        out = {k: ActorPlan(p.maximum, p.maximum, p.num_cpus, p.num_gpus, p.memory) for k, p in out.items()}
    return out, budget
