"""The export end to end on a real local Ray: the dataset card and `datasets`, one label space,
shards per split, drops by rule, `export.where` as one sandboxed predicate, and the commit that
leaves the previous export readable until the new one is in place (and intact when it fails)."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import webdataset as wds
import yaml

from pipeline.config import ConfigError, load_config
from pipeline.engine.runner import Runner
from tests.conftest import ENGINE_CONFIG
from tests.fixtures import completed_run, run_config

pytestmark = pytest.mark.usefixtures("ray_session")

CONFIG = copy.deepcopy(ENGINE_CONFIG)
CONFIG["export"] = {**CONFIG["export"], "license": "cc-by-4.0", "description": "Test faces.",
                    "min_shards_per_split": 3}


def _samples(run: Path, shards: list[str]) -> list[dict[str, Any]]:
    return list(wds.WebDataset([str(run / s) for s in shards], shardshuffle=False).decode())


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return completed_run(CONFIG, tmp_path_factory.mktemp("export") / "run")


def _done(run: Path) -> dict[str, Any]:
    return json.loads((run / "export" / "export.json").read_text())


def _front_matter(run: Path) -> dict[str, Any]:
    text = (run / "export" / "README.md").read_text()
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def test_labels_share_one_space_across_splits_and_name_identities(run: Path) -> None:
    done = _done(run)
    train = _samples(run, done["splits"]["train"]["shards"])
    val = _samples(run, done["splits"]["val"]["shards"])
    n_train = done["splits"]["train"]["identities"]
    assert {int(s["cls"]) for s in train} == set(range(n_train))
    assert {int(s["cls"]) for s in val} == set(range(n_train, n_train + done["splits"]["val"]["identities"]))
    names = _front_matter(run)["dataset_info"]["features"]
    cls = next(f for f in names if f["name"] == "cls")["dtype"]["class_label"]["names"]
    for s in train + val:
        assert cls[str(int(s["cls"]))] == s["json"]["identity_id"] == s["json"]["identity_id"]
        assert s["json"]["label"] == int(s["cls"])


def test_dataset_card_loads_with_hf_datasets_offline_and_picks_up_both_splits(run: Path, tmp_path: Path) -> None:
    import datasets

    ds = datasets.load_dataset(str(run / "export"), cache_dir=str(tmp_path / "hf"))
    done = _done(run)
    assert set(ds) == {"train", "validation"}
    assert ds["train"].num_rows == done["splits"]["train"]["samples"]
    assert ds["validation"].num_rows == done["splits"]["val"]["samples"]
    feature = ds["train"].features["cls"]
    assert isinstance(feature, datasets.ClassLabel)
    row = ds["validation"][0]
    assert feature.int2str(row["cls"]) == row["json"]["identity_id"]
    assert row["png"].size == (32, 32)
    fm = _front_matter(run)
    assert fm["license"] == "cc-by-4.0" and fm["size_categories"] == ["n<1K"]
    card = (run / "export" / "README.md").read_text()
    assert "Test faces." in card and "## Intended use" in card and "## Face data" in card
    for field in ("sample_id", "identity_id", "label", "split", "source_key"):
        assert f"| `{field}` |" in card


def test_each_split_has_at_least_the_configured_shards_and_the_card_warns_when_it_cannot(run: Path) -> None:
    done = _done(run)
    for split in ("train", "val"):
        s = done["splits"][split]
        assert len(s["shards"]) >= min(3, s["samples"])
    few = {k for k, s in done["splits"].items() if len(s["shards"]) < 3}
    assert ("Warning:" in (run / "export" / "README.md").read_text()) == bool(few)


def test_drop_table_has_one_line_per_rule_with_count_and_examples(run: Path) -> None:
    import pyarrow.parquet as pq

    card = (run / "export" / "README.md").read_text()
    table = card.split("## Drops and errors by rule")[1].split("\n## ")[0]
    lines = [ln for ln in table.splitlines() if ln.startswith("| meanf |")]
    # Every drop of the test filter has one rule and its own numbers in the detail: one line for all.
    dropped = [r for r in pq.read_table(run / "tables" / "decisions").to_pylist()
               if r["stage"] == "meanf" and not r["keep"]]
    assert dropped and {r["reason"] for r in dropped} == {"mean_below_min"}
    assert len({r["detail"] for r in dropped}) > 1
    assert len(lines) == 1
    cells = [c.strip() for c in lines[0].strip("|").split("|")]
    assert cells[2] == "mean_below_min" and int(cells[3]) == len(dropped)
    assert cells[4].count("`") == 2 * min(3, len(dropped))


@pytest.mark.parametrize("where", [
    "true); COPY (SELECT 1) TO '/tmp/ff-pwned'; SELECT 1 WHERE (true",
    "true) UNION (SELECT * FROM samples WHERE (true",
    "(SELECT count(*) FROM read_csv('/etc/passwd')) > 0",
])
def test_export_where_that_is_not_one_predicate_is_a_config_error(where: str) -> None:
    raw = copy.deepcopy(CONFIG)
    raw["export"]["where"] = where
    with pytest.raises(ConfigError, match=r"export\.where"):
        load_config(raw=raw)
    assert not Path("/tmp/ff-pwned").exists()


@pytest.mark.parametrize("where", ["true) OR (true", "true) OR meanf__keep IS NULL OR (true", "1=1) --",
                                   "1=1 /* */) OR (1=1", "meanf__keep; DROP TABLE samples",
                                   "true) UNION SELECT * FROM samples WHERE (true"])
def test_a_where_that_closes_its_parenthesis_is_refused(where: str) -> None:
    with pytest.raises(ConfigError, match=r"export\.where"):
        load_config(raw=CONFIG, overrides=[f"export.where={where}"])


def test_a_where_cannot_select_what_the_exports_own_conditions_refuse() -> None:
    """The plan's query over samples with error rows (NULL keep, NULL scores) and drops: whatever the
    predicate says, only rows every stage kept are selected, and a NULL means not selected."""
    import pyarrow as pa

    from pipeline.export.config import WHERE_TABLE, ExportConfig
    from pipeline.export.plan import sandbox, selection_spec

    n = 5
    rows = pa.table({
        "sample_id": [f"s{i}" for i in range(n)], "key": ["k"] * n, "identity_id": ["a"] * n,
        "image_shard": ["x.tar"] * n, "image_offset": [0] * n, "image_size": [1] * n, "image_crc32": [0] * n,
        "image_ext": ["png"] * n, "pattern__status": ["ok"] * n, "pattern__keep": [True] * n,
        "meanf__status": ["ok", "ok", "error", "ok", "ok"], "meanf__keep": [True, False, None, True, True],
        "meanf__mean": [100.0, 10.0, None, None, 200.0],
    })
    con = sandbox()
    con.register(WHERE_TABLE, rows)
    for where, want in [("meanf__mean > 0 OR true", ["s0", "s3", "s4"]),
                        ("meanf__mean IS NULL OR meanf__mean > 150", ["s3", "s4"]),
                        ("meanf__mean > 150", ["s4"]), ("meanf__keep IS NULL /* ) OR (true */", []),
                        ("NOT (meanf__mean < 150)", ["s4"]), ("meanf__mean > 150 -- a trailing comment", ["s4"])]:
        spec = selection_spec(ExportConfig(where=where), ["pattern", "meanf"])
        assert sorted(r[0] for r in con.sql(spec.sql).fetchall()) == want, where
    con.close()


def test_export_where_with_an_unknown_column_fails_before_any_work(tmp_path: Path) -> None:
    raw = copy.deepcopy(CONFIG)
    raw["export"]["where"] = "meanf__no_such_column > 1"
    cfg, stages = load_config(raw=raw)
    with pytest.raises(ConfigError, match=r"export\.where.*no_such_column"):
        Runner(cfg, stages, str(tmp_path / "run"), show_progress=False)
    assert not (tmp_path / "run").exists()


def test_export_where_selects_on_the_samples_table_columns(run: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    shutil.copytree(run, out)
    res = run_config(CONFIG, out, overrides=["export.where=pattern__variant < 2"])
    assert res.complete and res.export_ran
    done = _done(out)
    rows = _samples(out, done["splits"]["train"]["shards"] + done["splits"]["val"]["shards"])
    assert rows and len(rows) < sum(s["samples"] for s in _done(run)["splits"].values())


def test_a_new_export_switches_at_its_commit_and_removes_the_old_version(run: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    shutil.copytree(run, out)
    before = _done(out)
    res = run_config(CONFIG, out, overrides=['export.thresholds={"meanf.mean": {"min": 10}}'])
    assert res.complete and res.export_ran
    after = _done(out)
    assert after["version"] != before["version"]
    assert not (out / "export" / before["version"]).exists()
    assert sorted(p.name for p in (out / "export").iterdir() if p.name.startswith("v-")) == [after["version"]]
    assert len(_samples(out, after["splits"]["train"]["shards"])) == after["splits"]["train"]["samples"]


def test_a_failed_export_leaves_the_previous_export_intact_and_readable(run: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    shutil.copytree(run, out)
    committed = (out / "export" / "export.json").read_bytes()
    card = (out / "export" / "README.md").read_bytes()
    # The new export's filter fails on the data itself (a key that is not a number), not on the schema
    # checked before work: its plan tasks fail. (A missing source tar no longer fails an export: the run
    # sees it and recomputes the shard.)
    change = ["export.where=CAST(key AS INTEGER) >= 0"]
    res = run_config(CONFIG, out, overrides=change)
    assert not res.complete and any(f["stage"] == "export" for f in res.failures)
    assert (out / "export" / "export.json").read_bytes() == committed
    assert (out / "export" / "README.md").read_bytes() == card
    done = json.loads(committed)
    for split in ("train", "val"):
        assert len(_samples(out, done["splits"][split]["shards"])) == done["splits"][split]["samples"]
    history = json.loads(sorted((out / "history").glob("*.json"))[-1].read_text())
    assert [f["stage"] for f in history["failures"]] == ["export"] and not history["complete"]


def test_identity_quota_drops_are_counted_by_rule_in_the_card_and_export_json(run: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    shutil.copytree(run, out)
    res = run_config(CONFIG, out, overrides=["export.identities.max_images=2", "export.identities.target_images=2"])
    assert res.complete and res.export_ran
    done = _done(out)
    rows = _samples(out, done["splits"]["train"]["shards"] + done["splits"]["val"]["shards"])
    per: dict[str, int] = {}
    for r in rows:
        per[r["json"]["identity_id"]] = per.get(r["json"]["identity_id"], 0) + 1
    assert per and max(per.values()) == 2
    over = done["selection"]["drops"]["over_quota"]
    assert over == sum(s["samples"] for s in _done(run)["splits"].values()) - len(rows) > 0
    card = (out / "export" / "README.md").read_text()
    line = next(ln for ln in card.splitlines() if ln.startswith("| export | dropped | over_quota |"))
    assert int(line.split("|")[4]) == over
    assert f"- left out by identity rule `over_quota`: {over} samples" in card
    assert "no embedding in the run" in card
