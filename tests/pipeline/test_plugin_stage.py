"""A stage written outside the package is one class plus one config block, run through the CLI; and a
stage's identity is its registered name and version, so moving its file never invalidates a run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from tests.fixtures import EXAMPLES, REPO
from tests.fixtures.ray_cluster import ray_head

PLUGIN = textwrap.dedent('''
    """A user's own filter: keeps images whose red channel dominates."""

    from typing import Any, ClassVar

    import pyarrow as pa

    from facekit.imaging import decode_rgb
    from stages.base import IMAGE, Batch, Checks, FilterStage, Params, Reason


    class RedParams(Params):
        min_red_share: float = 0.3


    class RedShare(FilterStage[RedParams]):
        name: ClassVar[str] = "red_share"
        version: ClassVar[str] = "1"
        columns: ClassVar[tuple[pa.Field, ...]] = (pa.field("red_share", pa.float32()),)

        def score_row(self, batch: Batch, i: int) -> dict[str, Any]:
            rgb = decode_rgb(batch[IMAGE][i]).astype(float)
            return {"red_share": float(rgb[..., 0].sum() / max(rgb.sum(), 1.0))}

        def decide(self, scores: dict[str, Any]) -> Reason | None:
            return Checks().min("red_share", scores["red_share"], self.params.min_red_share).reason()
''')


def _config(module: str) -> dict:
    return {
        "name": "plugin",
        "run": {"seed": 1, "shard_size": 6},
        "identities": {"count": 4, "images_per_identity": 3, "dim": 32, "max_cosine": 0.6},
        "stages": [
            {"stage": "tests.fixtures.engine_stages:PatternSource", "id": "pattern"},
            {"stage": f"{module}:RedShare", "id": "red", "params": {"min_red_share": 0.34}},
        ],
        "export": {"enabled": False},
    }


def _cli(plugin_root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join([str(plugin_root), str(REPO)])}
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=plugin_root, env=env,
                          capture_output=True, text=True, timeout=600)


def _user_package(root: Path) -> Path:
    """The user's stage package ``myfilters`` (module ``myfilters.red``) under ``root``."""
    (root / "myfilters").mkdir(parents=True)
    (root / "myfilters" / "__init__.py").write_text("")
    (root / "myfilters" / "red.py").write_text(PLUGIN)
    return root / "myfilters"


def _without(env: dict[str, str], *names: str) -> dict[str, str]:
    return {k: v for k, v in env.items() if k not in names}


def test_a_stage_from_outside_the_package_runs_through_the_cli_and_resumes_after_its_file_moves(
        tmp_path: Path) -> None:
    root = tmp_path / "user_code"
    _user_package(root)
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(_config("myfilters.red")))
    out = tmp_path / "run"

    first = _cli(root, "run", str(config), "--output", str(out), "--no-progress")
    assert first.returncode == 0, first.stderr[-3000:]
    table = pq.read_table(out / "manifests" / "red" / "000000.parquet")
    assert "red_share" in table.column_names
    rows = table.to_pylist()
    assert {r["stage_name"] for r in rows} == {"red_share"}
    dropped = [r for r in rows if not r["keep"]]
    assert all(r["reason"] == "red_share_below_min" and "< 0.34" in r["detail"] for r in dropped)

    # The user reorganises their code: same class, same registered name and version, another module.
    (root / "myfilters" / "colour").mkdir()
    (root / "myfilters" / "colour" / "__init__.py").write_text("")
    (root / "myfilters" / "red.py").rename(root / "myfilters" / "colour" / "shares.py")
    config.write_text(yaml.safe_dump(_config("myfilters.colour.shares")))
    second = _cli(root, "run", str(config), "--output", str(out), "--no-progress")
    assert second.returncode == 0, second.stderr[-3000:]
    history = sorted((out / "history").glob("*.json"))
    last = json.loads(history[-1].read_text())
    assert last["stages"]["red"]["computed"] == 0 and last["stages"]["red"]["resumed"] > 0
    assert last["stages"]["pattern"]["computed"] == 0


def test_a_stage_reading_a_column_no_earlier_stage_writes_is_refused_before_any_work(tmp_path: Path) -> None:
    cfg = _config("tests.fixtures.engine_stages")
    cfg["stages"][1] = {"stage": "align", "id": "align"}
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "run"
    proc = _cli(REPO, "run", str(config), "--output", str(out), "--no-progress")
    assert proc.returncode == 2
    assert "stages[1] (align)" in proc.stderr and "landmarks5" in proc.stderr
    assert "gt_mean (pattern)" in proc.stderr  # what earlier stages do write
    assert not (out / "manifests").exists()


@pytest.mark.faults  # 60-90 s on 2 cores: a cluster start and a quickstart run beside a refused one
def test_the_quickstart_with_a_user_stage_runs_on_a_ray_start_cluster_with_token_auth(tmp_path: Path) -> None:
    """``ray start --head`` turns token auth on where a token exists; ``--address`` sends it, and
    ``--py-module`` ships the user's package, which the cluster's workers cannot import otherwise."""
    package = _user_package(tmp_path / "user_code")
    token = tmp_path / "auth_token"
    token.write_text(uuid.uuid4().hex * 2)
    raw = yaml.safe_load((EXAMPLES / "quickstart.yaml").read_text())
    raw["stages"].append({"stage": "myfilters.red:RedShare", "id": "red", "params": {"min_red_share": 0.34}})
    config = tmp_path / "quickstart-red.yaml"
    config.write_text(yaml.safe_dump(raw))
    base = _without(dict(os.environ), "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_ADDRESS")
    head_env = {**_without(base, "PYTHONPATH"), "RAY_AUTH_TOKEN_PATH": str(token)}
    client = {**base, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}  # the user's package is not on it
    small = ["--set", "identities.count=4", "--set", "identities.images_per_identity=2",
             "--set", "export.min_images_per_identity=1", "--no-progress"]
    with ray_head(head_env) as address:
        def run(env: dict[str, str], out: str) -> subprocess.Popen[str]:
            return subprocess.Popen([sys.executable, "-m", "pipeline.cli", "run", str(config), "--output",
                                     str(tmp_path / out), "--address", address, "--py-module", str(package), *small],
                                    cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

        # Without the token: refused in one line that says what to set (it waits out Ray's retries
        # beside the real run).
        refused = run({**client, "RAY_AUTH_TOKEN_PATH": str(tmp_path / "no-token")}, "refused")
        done = run({**client, "RAY_AUTH_TOKEN_PATH": str(token)}, "run")
        _, err = done.communicate(timeout=600)
        _, refused_err = refused.communicate(timeout=600)
        doctor = subprocess.run([sys.executable, "-m", "pipeline.cli", "doctor", str(config), "--address", address,
                                 "--py-module", str(package)], cwd=tmp_path, env={**client, "RAY_AUTH_TOKEN_PATH":
                                 str(token)}, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, err[-3000:]
    assert "complete" in err and "InvalidAuthToken" not in err
    red = pq.read_table(tmp_path / "run" / "manifests" / "red" / "000000.parquet").to_pylist()
    assert red and {r["stage_name"] for r in red} == {"red_share"}
    assert refused.returncode == 2
    assert refused_err.startswith("error: ") and "InvalidAuthToken" not in refused_err
    assert "RAY_AUTH_TOKEN" in refused_err and not (tmp_path / "refused" / "manifests").exists()
    assert doctor.returncode == 0, doctor.stdout[-3000:] + doctor.stderr[-3000:]
    assert "node " in doctor.stdout and "✓ red (myfilters.red:RedShare" in doctor.stdout  # checked on the node
