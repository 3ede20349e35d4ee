"""The run report: one self-contained page from templates, every number an SQL aggregation over the
manifests, drawn for real in a headless Chromium."""

from __future__ import annotations

import html.parser
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any, ClassVar

import duckdb
import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from manifests.catalog import Catalog
from manifests.storage import RunStorage
from pipeline.report import build_report, queries, write_report
from pipeline.status import stage_order
from stages.base import FilterStage, Params, StageKind
from tests.fixtures.engine_stages import MeanParams


class _Tags(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))


def _tags(page: str) -> list[tuple[str, dict[str, str | None]]]:
    p = _Tags()
    p.feed(page)
    return p.tags


@pytest.fixture(scope="module")
def report(small_quickstart_run: Path) -> str:
    path = write_report(RunStorage(str(small_quickstart_run)))
    return Path(path).read_text()


def test_report_is_one_file_with_nothing_loaded_from_elsewhere(report: str) -> None:
    tags = _tags(report)
    srcs = [a.get("src") or "" for t, a in tags if t == "img"]
    assert len(srcs) > 10 and all(s.startswith("data:image/") for s in srcs)
    assert not [t for t, a in tags if t in {"script", "link", "iframe"}]
    assert not [a for t, a in tags if t in {"a", "use", "image"} and any(
        (v or "").startswith(("http:", "https:", "file:")) for v in a.values())]


def test_report_shows_a_histogram_per_filter_score_with_the_export_threshold_lines(report: str) -> None:
    assert report.count("<svg") >= 6
    for score in ("quality.yaw", "quality.sharpness", "image_stats.sharpness", "detect.det_score",
                  "consistency.centroid_score"):
        assert f"{score}</text>" in report or f">{score}<" in report, score
    assert "export |x| ≤ 25" in report and "export min 0.5" in report


def test_drops_are_grouped_by_rule_with_counts_matching_the_manifests(small_quickstart_run: Path, report: str) -> None:
    store = RunStorage(str(small_quickstart_run))
    with Catalog(store, stage_order(store)).connect() as con:
        groups = queries.drops_by_rule(con)
        expected = con.execute(f"SELECT stage, {queries.RULE_SQL}, count(*) FROM decisions "
                               "WHERE status <> 'ok' OR NOT keep GROUP BY ALL").fetchall()
    assert {(g["stage"], g["rule"], g["count"]) for g in groups} == {(s, r, int(n)) for s, r, n in expected}
    stages = {g["stage"] for g in groups}
    # detect errors (faces under the raised score bar) and identity drops
    assert {"detect", "consistency"} <= stages, stages
    detect = next(g for g in groups if g["stage"] == "detect" and g["status"] == "error")
    assert f"{detect['rule']} <span class=\"muted\">({detect['count']} error)" in report
    assert all(len(g["examples"]) == min(g["count"], queries.EXAMPLES_PER_RULE) for g in groups)


def test_every_example_thumbnail_is_the_image_its_stage_saw(small_quickstart_run: Path, report: str) -> None:
    """Detect errors show the source render; identity drops show the aligned 112 px crop."""
    tags = _tags(report)
    imgs = {a["alt"]: a["src"] for t, a in tags if t == "img" and a.get("alt")}
    store = RunStorage(str(small_quickstart_run))
    with Catalog(store, stage_order(store)).connect() as con:
        errors = con.execute("SELECT sample_id FROM detect WHERE status = 'error'").fetchall()
        src = dict(con.execute("SELECT sample_id, output_shard FROM render").fetchall())
    shown = [sid for (sid,) in errors if sid in imgs]
    assert shown, "no detect error has a thumbnail"
    assert all(src[sid].startswith("shards/render/") for sid in shown)


def test_identity_sheets_show_the_dropped_sample_beside_its_identitys_other_images(report: str) -> None:
    assert "Identity sheets" in report
    sheet = report.split('<div class="sheet">', 1)[1].split('<div class="sheet">', 1)[0]
    sheet_imgs = [a for t, a in _tags(sheet) if t == "img"]
    assert len(sheet_imgs) >= 3  # the sample and at least two of its identity's others
    assert 'class="dropped"' in sheet


def test_throughput_table_labels_capacity_and_wall_rate_separately(report: str) -> None:
    assert "capacity /s/worker" in report and "wall rate /s" in report and "wall s" in report
    assert "time per stage" in report and "throughput per stage" in report


def test_balance_table_counts_each_pose_bin_per_split(small_quickstart_run: Path, report: str) -> None:
    store = RunStorage(str(small_quickstart_run))
    import pyarrow.parquet as pq

    exported = pq.read_table(small_quickstart_run / "export" / "manifest.parquet").num_rows
    with Catalog(store, stage_order(store)).connect() as con:
        tables = queries.balance_tables(con, queries.stage_names(con), str(small_quickstart_run / "export" /
                                                                             "manifest.parquet"))
    pose = next(t for t in tables if t["attribute"] == "labels.pose_bin")
    per_split = dict(zip(pose["splits"], np.sum([r["counts"] for r in pose["rows"]], axis=0), strict=True))
    assert per_split["train"] + per_split["val"] == exported
    assert "labels.pose_bin" in report


def test_histogram_binned_in_sql_equals_numpy() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(0.0, 1.0, 5000)
    keep = x > -0.5
    con = duckdb.connect()
    t = pa.table({"sample_id": [str(i) for i in range(x.size)], "status": ["ok"] * x.size, "keep": keep, "s": x})
    con.register("t", t)
    h = queries.histogram(con, "t", "s", bins=25)
    assert h is not None
    want_kept, edges = np.histogram(x[keep], bins=25, range=(x.min(), x.max()))
    want_dropped, _ = np.histogram(x[~keep], bins=25, range=(x.min(), x.max()))
    np.testing.assert_allclose(h.edges, edges)
    assert h.kept == want_kept.tolist() and h.dropped == want_dropped.tolist()


def test_free_text_reasons_group_by_their_words_before_the_numbers() -> None:
    con = duckdb.connect()
    rows = [("a", "ok", False, "blurry: 10.2 < 20", None), ("b", "ok", False, "blurry: 3.1 < 20", None),
            ("c", "ok", False, "sharpness_below_min", "4 < 20"), ("d", "error", False, "no face", None),
            ("e", "ok", True, None, None), ("f", "ok", False, "yaw -46.0 < -45", None),
            ("g", "ok", False, "yaw 47.1 > 45", None), ("h", "ok", False, "far from centroid (0.28, max 0.25)", None),
            ("i", "ok", False, "far from centroid (0.31, max 0.25)", None)]
    con.register("d0", pa.table({k: [r[i] for r in rows] for i, k in enumerate(
        ["sample_id", "status", "keep", "reason", "detail"])}))
    con.execute("CREATE VIEW decisions AS SELECT 0 AS stage_index, 's' AS stage, sample_id, NULL AS identity_id, "
                "status, keep, reason, detail FROM d0")
    got = {(g["rule"], g["status"]): (g["count"], [e["caption"] for e in g["examples"]])
           for g in queries.drops_by_rule(con)}
    assert got[("blurry", "ok")][0] == 2
    assert got[("sharpness_below_min", "ok")] == (1, ["4 < 20"])
    assert got[("no face", "error")][0] == 1
    assert got[("yaw", "ok")][0] == 2 and got[("far from centroid", "ok")][0] == 2 and len(got) == 5


def test_a_page_with_markup_in_names_is_escaped(tmp_path: Path) -> None:
    from jinja2 import Environment, PackageLoader

    env = Environment(loader=PackageLoader("pipeline.report", "templates"))
    assert env.get_template("index.html.j2") is not None
    from pipeline import report as rep

    page = rep._env.get_template("index.html.j2").render(
        run="<script>alert(1)</script>", complete=False, stages=[], export=None, histograms=[], drops=[],
        sheets=[], balance=[], kept=[], time_svg=None, throughput_svg=None, summaries=[], config_name="<b>x</b>")
    assert "<script>alert" not in page and "&lt;script&gt;" in page and "&lt;b&gt;x" in page


# ------------------------------------------------------------------ a real browser draws the page

def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    apt = shutil.which("apt-get")
    if apt is None or os.geteuid() != 0:
        pytest.skip("no chromium on PATH and no apt-get as root to install it (`make test` installs it: "
                    "apt-get install -y chromium)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = [apt, "install", "-y", "--no-install-recommends", "chromium"]
    if subprocess.run(install, timeout=900, capture_output=True, env=env).returncode != 0:  # empty package lists
        subprocess.run([apt, "update"], check=True, timeout=900, capture_output=True, env=env)
        subprocess.run(install, check=True, timeout=900, capture_output=True, env=env)
    path = shutil.which("chromium")
    assert path, "apt-get installed chromium but it is not on PATH"
    return path


_PROBE = """<script>
window.addEventListener('load', () => {
  const imgs = [...document.images].map(i => [i.naturalWidth, i.naturalHeight, i.complete]);
  const svgs = [...document.querySelectorAll('svg')].map(s => {
    const r = s.getBoundingClientRect(); return [r.width, r.height, s.querySelectorAll('path, rect, use').length];
  });
  const out = document.createElement('pre'); out.id = 'probe';
  out.textContent = JSON.stringify({imgs, svgs}); document.body.appendChild(out);
});
</script>"""


def _browser(args: list[str], tmp: Path) -> subprocess.CompletedProcess[str]:
    cmd = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
           f"--user-data-dir={tmp / 'profile'}", "--virtual-time-budget=5000", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180)


def test_headless_chromium_draws_every_plot_and_image(report: str, tmp_path: Path) -> None:
    probed = tmp_path / "probed.html"
    probed.write_text(report.replace("</body>", _PROBE + "</body>"))
    proc = _browser(["--dump-dom", probed.as_uri()], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = proc.stdout.split('<pre id="probe">', 1)[1].split("</pre>", 1)[0]
    probe: dict[str, Any] = json.loads(html.unescape(text))
    assert len(probe["imgs"]) == report.count("<img ")
    assert all(w > 0 and h > 0 and done for w, h, done in probe["imgs"]), probe["imgs"]
    assert len(probe["svgs"]) == report.count("<svg ")
    assert all(w > 50 and h > 50 and marks > 5 for w, h, marks in probe["svgs"]), probe["svgs"]


def test_headless_chromium_screenshot_is_not_blank(report: str, tmp_path: Path) -> None:
    page = tmp_path / "index.html"
    page.write_text(report)
    shot = tmp_path / "shot.png"
    proc = _browser([f"--screenshot={shot}", "--window-size=1280,3000", page.as_uri()], tmp_path)
    assert proc.returncode == 0 and shot.exists(), proc.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("RGB"), dtype=np.float32)
    # Blue and orange bars and face thumbnails: many distinct colours, not a white page.
    assert pixels.std() > 20
    assert len(np.unique(pixels.reshape(-1, 3)[::37], axis=0)) > 200


def test_a_run_without_an_export_still_gets_a_page(small_quickstart_run: Path, tmp_path: Path) -> None:
    """A run whose export is missing still gets a page (the export section says so)."""
    part = tmp_path / "partial"
    shutil.copytree(small_quickstart_run, part, ignore=shutil.ignore_patterns("export"))
    page = build_report(RunStorage(str(part)))
    assert "incomplete" in page and "Not written." in page and "<svg" in page


@pytest.fixture(scope="module")
def grouped_run(small_quickstart_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The small quickstart with a grouping stage appended, scored against the renders' identities: only
    grouping, the tables and the export run again."""
    import yaml

    from pipeline.config import load_config
    from pipeline.engine.runner import Runner
    from tests.fixtures import EXAMPLES
    from tests.pipeline.conftest import EXPORT_THRESHOLDS, SMALL_QUICKSTART

    out = tmp_path_factory.mktemp("grouped") / "run"
    shutil.copytree(small_quickstart_run, out)
    raw = yaml.safe_load((EXAMPLES / "quickstart.yaml").read_text())
    raw["export"]["thresholds"] = EXPORT_THRESHOLDS
    raw["stages"].append({"stage": "grouping", "params": {"threshold": 0.7, "gt_column": "identity_id"}})
    cfg, stages = load_config(raw=raw, overrides=SMALL_QUICKSTART)
    assert Runner(cfg, stages, str(out), show_progress=False).run().complete
    write_report(RunStorage(str(out)))
    return out


def test_report_shows_the_grouping_method_groups_and_every_score_against_ground_truth(grouped_run: Path,
                                                                                       report: str) -> None:
    summary = json.loads((grouped_run / "report" / "grouping.summary.json").read_text())
    page = (grouped_run / "report" / "index.html").read_text()
    section = page.split('<h2 id="grouping">Identity grouping</h2>')[1].split("<h2")[0]
    cells = [c.split("</t")[0] for c in section.split("<td>")[1:]]
    source = f" ({summary['threshold_source']})" if "threshold_source" in summary else ""
    assert cells[:6] == ["grouping", summary["method"], f"0.7{source}", str(summary["groups"]),
                         str(summary["singletons"]), str(summary["largest_group"])]
    shown = {k: v for k, v in (("purity", "purity"), ("inverse_purity", "inverse purity"),
                               ("pairwise_f", "pairwise F"), ("bcubed_f", "BCubed F")) if k in summary}
    assert {"purity", "inverse_purity"} <= set(shown)
    for key, label in shown.items():
        assert f"<th>{label}</th>" in section
        assert f"<td>{summary[key]:.3f}</td>" in section
    assert "Scored against the ground truth" in section
    assert 'id="grouping"' not in report  # a run without a grouping stage has no such section


def test_dataset_card_has_one_line_of_the_grouping_figures(grouped_run: Path) -> None:
    summary = json.loads((grouped_run / "report" / "grouping.summary.json").read_text())
    card = (grouped_run / "export" / "README.md").read_text()
    lines = [line for line in card.splitlines() if line.startswith("Identity labels assigned by grouping")]
    assert len(lines) == 1, lines
    line = lines[0]
    source = f", {summary['threshold_source']}" if "threshold_source" in summary else ""
    assert f"`grouping` (method {summary['method']}, threshold 0.7{source}): {summary['groups']} groups" in line
    assert f"purity {summary['purity']:.3f}, inverse purity {summary['inverse_purity']:.3f}" in line
    if "bcubed_f" in summary:
        assert f"BCubed F {summary['bcubed_f']:.3f}" in line


class ThresholdedFilter(FilterStage):
    """A filter that declares its threshold through the stage contract's ``thresholds()`` hook."""

    name: ClassVar[str] = "thresholded_mean"
    params_model: ClassVar[type[Params]] = MeanParams
    columns: ClassVar[tuple[pa.Field, ...]] = (pa.field("mean", pa.float32()),)

    def thresholds(self) -> dict[str, dict[str, float]]:
        return {"mean": {"min": self.params.min_mean}}  # type: ignore[attr-defined]


def test_threshold_lines_come_from_the_filter_hook_and_the_export_config() -> None:
    from pipeline.report.thresholds import stage_kinds_and_thresholds
    from tests.conftest import ENGINE_CONFIG

    raw = {**ENGINE_CONFIG, "stages": [
        ENGINE_CONFIG["stages"][0],
        {"stage": f"{__name__}:ThresholdedFilter", "id": "own", "params": {"min_mean": 42.5}},
        {"stage": "tests.fixtures.engine_stages:MeanFilter", "id": "plain"},
    ], "export": {"thresholds": {"plain.mean": {"max": 200.0}, "own.mean": {"max_abs": 3.0}}}}
    kinds, lines = stage_kinds_and_thresholds(raw, "/nowhere")
    assert kinds["own"] == StageKind.FILTER and kinds["pattern"] == StageKind.SOURCE
    assert lines[("own", "mean")] == [(42.5, "min 42.5"), (-3.0, "export |x| ≤ 3"), (3.0, "")]
    assert lines[("plain", "mean")] == [(0.0, "min 0"), (200.0, "export max 200")]
