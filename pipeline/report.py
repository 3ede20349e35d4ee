"""`<run>/report/index.html`: one self-contained page a person can open after a run: per-stage counts,
drop and error reasons, and thumbnails of kept and dropped samples with their reasons."""

from __future__ import annotations

import base64
import html
import json
from typing import Any

from manifests.catalog import Catalog
from manifests.storage import RunStorage
from pipeline.status import run_status, stage_order

THUMBS = 12


def _img_tag(store: RunStorage, row: dict[str, Any], caption: str) -> str:
    try:
        data = store.read_range(row["output_shard"], int(row["tar_offset"]), int(row["tar_size"]))
    except (OSError, TypeError, ValueError):
        return ""
    mime = "image/png" if row.get("image_ext") == "png" else "image/jpeg"
    b64 = base64.b64encode(data).decode()
    return (f'<figure><img src="data:{mime};base64,{b64}" width="96" height="96">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def build_report(store: RunStorage) -> str:
    st = run_status(store)
    order = stage_order(store)
    catalog = Catalog(store, order)
    with catalog.connect(read_only=True) as con:
        reasons = con.execute(
            "SELECT stage, status, reason, count(*) AS n FROM decisions WHERE status <> 'ok' OR NOT keep "
            "GROUP BY ALL ORDER BY n DESC LIMIT 40"
        ).fetchall()
        # Thumbnails from the last pixel stage: the pixels a sample ends up with.
        pix = con.execute(
            "SELECT stage FROM decisions WHERE output_shard IS NOT NULL GROUP BY stage ORDER BY max(stage_index) DESC "
            "LIMIT 1"
        ).fetchall()
        thumbs: dict[str, list[dict[str, Any]]] = {"kept": [], "dropped": []}
        if pix:
            rows = con.sql(
                "SELECT * FROM (SELECT d.sample_id, p.output_shard, p.tar_offset, p.tar_size, p.image_ext, "
                "bool_and(d.keep AND d.status = 'ok') AS kept, "
                "string_agg(CASE WHEN NOT d.keep OR d.status <> 'ok' THEN d.stage || ': ' || d.reason END, '; ') "
                "AS why FROM decisions d JOIN decisions p ON p.sample_id = d.sample_id AND p.stage = "
                f"'{pix[0][0]}' AND p.output_shard IS NOT NULL GROUP BY ALL) ORDER BY hash(sample_id) LIMIT 2000"
            ).to_arrow_table().to_pylist()
            for r in rows:
                bucket = "kept" if r["kept"] else "dropped"
                if len(thumbs[bucket]) < THUMBS:
                    thumbs[bucket].append(r)
    parts = [
        "<!doctype html><meta charset='utf-8'><title>facefoundry report</title>",
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}td,th{border:1px solid #ccc;"
        "padding:4px 8px;text-align:right}td:first-child{text-align:left}figure{display:inline-block;margin:4px;"
        "width:110px;font-size:10px;vertical-align:top}</style>",
        f"<h1>{html.escape(st['run'])}</h1><p>{'complete' if st['complete'] else 'incomplete'}</p>",
        "<h2>Stages</h2><table><tr><th>stage</th><th>shards</th><th>samples</th><th>kept</th><th>dropped</th>"
        "<th>errors</th><th>samples/s</th></tr>",
    ]
    for s in st["stages"]:
        rate = f"{s['samples_per_s']:.1f}" if s["samples_per_s"] else "-"
        parts.append(f"<tr><td>{html.escape(s['stage'])}</td><td>{s['shards_committed']}/{s['shards_total']}</td>"
                     f"<td>{s['samples']}</td><td>{s['kept']}</td><td>{s['dropped']}</td><td>{s['errors']}</td>"
                     f"<td>{rate}</td></tr>")
    parts.append("</table><h2>Drops and errors</h2><table><tr><th>stage</th><th>status</th><th>reason</th>"
                 "<th>samples</th></tr>")
    for stage, status, reason, n in reasons:
        parts.append(f"<tr><td>{html.escape(stage)}</td><td>{status}</td><td>{html.escape(str(reason))}</td>"
                     f"<td>{n}</td></tr>")
    parts.append("</table>")
    for bucket, rows in thumbs.items():
        parts.append(f"<h2>{bucket.capitalize()} samples</h2>")
        parts.extend(_img_tag(store, r, r["why"] or r["sample_id"][:12]) for r in rows)
    if st["export"]:
        parts.append("<h2>Export</h2><pre>" + html.escape(json.dumps(st["export"]["splits"], indent=1)) + "</pre>")
    return "\n".join(parts)


def write_report(store: RunStorage) -> str:
    store.write_atomic(build_report(store).encode(), "report", "index.html")
    return store.path("report", "index.html")
