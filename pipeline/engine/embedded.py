"""Starting and stopping the Ray a run brings up for itself on one machine, without Ray's fixed waits.

A run on a laptop or a CI box starts its own Ray and stops it at the end. On 2 cores Ray spent about
3 s of each run on waits that do nothing there: three are hard-coded in Ray (a one-second retry, a
one-second poll, a one-second grace), one is a process with nothing to serve. Each is removed here,
and only here: a cluster reached with ``--address`` is untouched.

- The raylet's clients retry their connection every 50 ms, not every second (system config). The
  raylet's first connection to its own object store usually comes before the store listens, and
  then waited a whole second.
- ``ray.init`` waits for the raylet to register with a C++ poll that sleeps a whole second between
  tries; the raylet registers 0.5-0.7 s after it starts. ``start`` polls every 20 ms first.
- With ``include_dashboard=False`` Ray still starts a dashboard head process, loading only its
  usage-statistics module (usage statistics are off here), and ``ray.init`` waits for it to come
  up: 0.6-0.8 s and 0.5 s of CPU. ``start`` does not start it. Nothing the engine, Ray Data or Ray
  Train uses needs it; the state and job APIs it would serve are not loaded without the dashboard.
- The autoscaler monitor's SIGTERM handler reports its death to the GCS, which Ray has already
  stopped, so it always ran out its one-second grace. An embedded Ray has nothing to autoscale:
  ``stop`` kills it first.

And one message is not printed: a Ray started by ``ray.init`` turns token authentication on by default
and says so on every start; the embedded Ray keeps it on, without the notice.

These touch Ray's private modules. Each is looked up before use; when Ray's internals are not what
they were written against, that one step is skipped and Ray's own (slower) path runs.
"""

from __future__ import annotations

import contextlib
import logging
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping
from types import MappingProxyType
from typing import Any

import ray

# No metrics collection and no workers prestarted for the first driver: no dashboard reads the
# metrics, and those workers stay idle through a run; both cost CPU while the actors load their models.
# The raylet's clients retry every 50 ms for the same 10 s in all (see above), so a connection that
# comes just before the object store listens waits 50 ms, not a second.
SYSTEM_CONFIG: Mapping[str, Any] = MappingProxyType({
    "enable_metrics_collection": False,
    "prestart_worker_first_driver": False,
    "raylet_client_connect_timeout_milliseconds": 50,
    "raylet_client_num_connect_attempts": 200,
})
NODE_POLL_S = 0.02
# The logger of Ray's token-auth notice, and the notice's start (see the module docstring).
AUTH_LOGGER = "ray._private.authentication.authentication_token_setup"
AUTH_NOTICE = "Token authentication is enabled"
NODE_WAIT_S = 30.0


def _private(module: str) -> Any:
    """``ray._private.<module>``, or None where this Ray has no such module."""
    return getattr(getattr(ray, "_private", None), module, None)


def _wait_registered(gcs_address: str, node_id: str, services: Any) -> None:
    """Return once the GCS lists the node alive (or after NODE_WAIT_S, or on any error: the caller's
    own wait follows either way)."""
    state = _private("state")
    with contextlib.suppress(Exception):
        accessor = state.GlobalState()
        accessor._initialize_global_state(services._get_gcs_client_options(gcs_address))
        try:
            deadline = time.monotonic() + NODE_WAIT_S
            while time.monotonic() < deadline:
                if any(n.get("NodeID") == node_id and n.get("Alive") for n in accessor.node_table()):
                    return
                time.sleep(NODE_POLL_S)
        finally:
            accessor.disconnect()


def _not_auth_notice(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith(AUTH_NOTICE)


@contextlib.contextmanager
def _auth_notice_dropped() -> Iterator[None]:
    logger = logging.getLogger(AUTH_LOGGER)
    logger.addFilter(_not_auth_notice)
    try:
        yield
    finally:
        logger.removeFilter(_not_auth_notice)


@contextlib.contextmanager
def _patched(module: Any, name: str, make: Callable[[Any], Any]) -> Iterator[None]:
    real = getattr(module, name, None)
    if not callable(real):  # this Ray has no such function: its own path runs
        yield
        return
    setattr(module, name, make(real))
    try:
        yield
    finally:
        setattr(module, name, real)


def start(**init_kwargs: Any) -> None:
    """``ray.init`` of a new local Ray (``init_kwargs`` as for ``ray.init``, no address), without the
    waits above. ``_system_config`` entries given here win over ``SYSTEM_CONFIG``."""
    services = _private("services")

    def quick_get_node(real: Callable[[str, str], Any]) -> Callable[[str, str], Any]:
        def get_node(gcs_address: str, node_id: str) -> Any:
            _wait_registered(gcs_address, node_id, services)
            return real(gcs_address, node_id)
        return get_node

    def no_head(real: Callable[..., Any]) -> Callable[..., Any]:
        def start_api_server(include_dashboard: bool | None, *args: Any, **kwargs: Any) -> Any:
            if include_dashboard is False:
                return "", None  # what Ray's own code returns for "no dashboard process"
            return real(include_dashboard, *args, **kwargs)
        return start_api_server

    config = {**SYSTEM_CONFIG, **init_kwargs.pop("_system_config", {})}
    init_kwargs.setdefault("include_dashboard", False)
    with (_patched(services, "get_node", quick_get_node), _patched(services, "start_api_server", no_head),
          _auth_notice_dropped()):
        ray.init(_system_config=config, **init_kwargs)


def stop() -> None:
    """``ray.shutdown()``, with the autoscaler monitor killed first (see above)."""
    node = getattr(_private("worker"), "_global_node", None)
    processes = getattr(node, "all_processes", None) or {}
    for info in processes.get("monitor", []):
        proc = getattr(info, "process", None)
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait(timeout=5)
    ray.shutdown()
