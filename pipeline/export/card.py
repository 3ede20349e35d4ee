"""The dataset card: ``export/README.md``, a Hugging Face dataset card with YAML front matter.

The front matter makes ``datasets.load_dataset(export_dir)`` find the splits (``configs`` /
``data_files``) and decode ``cls`` as a ``ClassLabel`` named by identity id; the body says what the
images are, documents every json field, how labels work across splits, intended use, the face-data
note, the identity grouping's figures where a grouping stage assigned the labels, and what was dropped,
grouped by rule (never one line per distinct reason string).
"""

from __future__ import annotations

from typing import Any

import yaml

from pipeline.export.config import ExportConfig
from pipeline.summaries import grouping_line

JSON_FIELDS: dict[str, tuple[str, str]] = {
    "sample_id": ("string", "deterministic id of the sample (a hash of what defines it); the key of "
                  "`facefoundry lineage RUN SAMPLE_ID` and of the run's `tables/samples`"),
    "identity_id": ("string", "the identity the sample shows; present in every sample of every split"),
    "label": ("int64", "the class index, the same as `.cls`: one label space across splits"),
    "split": ("string", "`train` or `val`"),
    "source_key": ("string", "the sample's key in the run's source shards"),
}


def size_category(n: int) -> str:
    for bound, name in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"),
                        (1_000_000, "100K<n<1M"), (10_000_000, "1M<n<10M"), (100_000_000, "10M<n<100M")):
        if n < bound:
            return name
    return "100M<n<1B"


def _hf_dtype(arrow_type: str) -> str:
    return {"double": "float64", "float": "float32", "bool": "bool", "int64": "int64", "int32": "int32",
            "string": "string"}.get(arrow_type, "string")


def front_matter(cfg: ExportConfig, version: str, splits: dict[str, Any], class_names: list[str],
                 image_exts: list[str], meta_types: dict[str, str]) -> dict[str, Any]:
    data_files = [{"split": "train" if s == "train" else "validation", "path": f"{version}/{s}/*.tar"}
                  for s in ("train", "val") if splits.get(s, {}).get("samples")]
    features: list[dict[str, Any]] = [{"name": "__key__", "dtype": "string"}, {"name": "__url__", "dtype": "string"}]
    features += [{"name": ext, "dtype": "image"} for ext in image_exts]
    features += [{"name": ext, "dtype": "binary"} for ext in cfg.extra_members]
    names = {str(i): n for i, n in enumerate(class_names)}
    features.append({"name": "cls", "dtype": {"class_label": {"names": names}}})
    struct = [{"name": k, "dtype": v[0]} for k, v in JSON_FIELDS.items()]
    struct += [{"name": k, "dtype": _hf_dtype(t)} for k, t in meta_types.items()]
    features.append({"name": "json", "struct": sorted(struct, key=lambda f: f["name"])})
    total = sum(s.get("samples", 0) for s in splits.values())
    doc: dict[str, Any] = {
        "license": cfg.license,
        "task_categories": ["image-classification", "image-feature-extraction"],
        "tags": ["faces", "face-recognition", "webdataset", "facefoundry"],
        "size_categories": [size_category(total)],
        "configs": [{"config_name": "default", "data_files": data_files}],
        "dataset_info": {"features": features},
    }
    if cfg.pretty_name:
        doc["pretty_name"] = cfg.pretty_name
    return doc


def drop_table(reasons: list[dict[str, Any]]) -> list[str]:
    lines = ["| stage | status | rule | samples | examples (sample id: detail) |", "|---|---|---|---|---|"]
    for r in reasons:
        ex = "; ".join(f"`{e['sample_id']}`" + (f": {_cell(e['detail'])}" if e["detail"] else "")
                       for e in r["examples"])
        lines.append(f"| {r['stage']} | {r['status']} | {_cell(r['rule'])} | {r['count']} | {ex} |")
    return lines


def selection_lines(sel: dict[str, Any]) -> list[str]:
    """The identity rules' part of the Selection section: drops by rule, target and balance."""
    out = [f"- left out by identity rule `{rule}`: {n} samples" for rule, n in sorted(sel.get("drops", {}).items())
           if rule != "identity_too_small"]
    if sel.get("target_images") is not None:
        out.append(f"- identities under target_images ({sel['target_images']}): {sel['short_of_target']} of "
                   f"{sel['identities']}")
    bal = sel.get("balance")
    if bal:
        shares = ", ".join(f"{b} {v:g}" for b, v in sorted(bal["shares"].items()))
        out.append(f"- balance of `{bal['column']}` at {bal['level']} level ({shares}; fill {bal['fill']}): "
                   + ("met" if bal["met"] else "NOT met: " + "; ".join(
                       f"{b} short by " + ", ".join(f"{v} {k}" for k, v in short.items())
                       for b, short in sorted(bal["short"].items()))))
    return out


def leak_lines(doc: dict[str, Any]) -> list[str]:
    """The card's leak-check section: how units were formed and the largest cross-split similarities."""
    out = [f"- near-copies (dedup groups) joining two identities, kept on one side: {doc.get('dedup_links', 0)}"]
    if "threshold" not in doc:
        return [*out, "- no embedding in the run: look-alike identities and cross-split similarity not measured"]
    out.append(f"- look-alike identity pairs (centroid {doc['metric']} in `{doc['space']}` at threshold "
               f"{doc['threshold']:g}, {doc.get('threshold_source', 'given')}"
               + (f" at {doc['lookalike_rate']:g} false look-alikes per identity" if "lookalike_rate" in doc else "")
               + f"): {doc['lookalike_pairs']} ({doc['lookalikes']}); across splits: "
               f"{doc['cross_split_lookalikes']}")
    out += [f"  - `{p['a']}` / `{p['b']}`: {p['score']:.3f}" for p in doc.get("cross_split_examples", [])]
    ident, image = doc.get("max_identity_similarity"), doc.get("max_image_similarity")
    if ident:
        out.append(f"- largest validation-to-training identity similarity (centroids): {ident['score']:.3f} "
                   f"(`{ident['val']}` / `{ident['train']}`)")
    if image:
        out.append(f"- largest validation-to-training image similarity: {image['score']:.3f} (`{image['val']}` / "
                   f"`{image['train']}`; {image['checked']} of {image['of']} validation images checked)")
    return out


def refill_markdown(doc: dict[str, Any]) -> str:
    """The run's refill record (pipeline/refill.py): identities at target, rounds, samples per round."""
    share = doc.get("share_at_target")
    lines = [f"Identities under {doc['target_images']} kept images after the filters got more generated images, "
             f"in rounds (at most {doc['max_rounds']}): {doc['at_target']} of {doc['identities'] - doc['lost']} "
             "identities with a kept image reached the target"
             + ("" if share is None else f" ({100 * share:.1f}%)")
             + f" after {doc['rounds_run']} round(s); {doc['short']} stayed short and {doc['lost']} lost every "
             "image to an identity-level decision (not refilled).", ""]
    if doc.get("rounds"):
        lines += ["| round | samples added | identities | shards |", "|---|---|---|---|"]
        lines += [f"| {r['round']} | {r['samples']} | {r['identities']} | {r['shards']} |" for r in doc["rounds"]]
    return "\n".join(lines)


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")[:160]


def dataset_card(*, cfg: ExportConfig, version: str, splits: dict[str, Any], stats: dict[str, Any],
                 class_names: list[str], image_exts: list[str], meta_types: dict[str, str], config_hash: str,
                 fingerprint: str, balance: str, stages: list[dict[str, Any]],
                 leaks: dict[str, Any] | None = None, grouping: list[dict[str, Any]] | None = None,
                 refill: dict[str, Any] | None = None) -> str:
    fm = front_matter(cfg, version, splits, class_names, image_exts, meta_types)
    description = cfg.description or (
        "Face images produced and curated by a FaceFoundry run: every sample traceable from the seed (or source "
        "file) that made it to the training shard that holds it.")
    lines = ["---", yaml.safe_dump(fm, sort_keys=False, allow_unicode=True).rstrip(), "---", "",
             f"# {cfg.pretty_name or 'FaceFoundry face dataset'}", "", description, "",
             "## Contents", "",
             "WebDataset tars, one sample per key: the face image (`" + "`, `".join(image_exts or ["png"])
             + "`; pixels exactly as the run's last pixel-writing stage wrote them unless `image_format` "
             "re-encodes), `<key>.cls` (the class index as text) and `<key>.json` (below)"
             + (", plus " + ", ".join(f"`{e}`" for e in cfg.extra_members) if cfg.extra_members else "") + ".",
             "Stages of the run that made them: " + ", ".join(f"`{s['id']}` ({s['name']})" for s in stages) + ".",
             "", "```python", "import datasets", "ds = datasets.load_dataset(\"path/to/export\")  "
             "# splits: train, validation", "```", ""]
    lines += _splits_lines(cfg, splits)
    lines += _labels_lines(splits, grouping)
    lines += _fields_lines(meta_types)
    lines += _selection_section(cfg, stats, config_hash, fingerprint)
    if refill:
        lines += ["", "## Refill", "", refill_markdown(refill)]
    lines += ["", "## Drops and errors by rule", ""]
    lines += drop_table(stats["reasons"]) if stats["reasons"] else ["No sample was dropped or failed."]
    if balance:
        lines += ["", "## Balance", "", balance]
    if leaks:
        lines += ["", "## Split leak check", "", *leak_lines(leaks)]
    lines += USE_AND_FACE_DATA
    return "\n".join(lines) + "\n"


USE_AND_FACE_DATA = [
    "", "## Intended use", "",
    "Training and evaluating face recognition and face restoration models, and research on dataset curation. "
    "Not for identifying, tracking or profiling real people, nor for inferring sensitive attributes.", "",
    "## Face data", "",
    "This dataset contains images of faces. Synthetic faces can still resemble real people; ingested corpora "
    "contain real people who have rights over their likeness (consent, data-protection law such as the GDPR's "
    "rules on biometric data). Check the license and the provenance of the sources before use or release, "
    "honour removal requests, and measure demographic balance (the Balance section, when present, covers "
    "only the run's attribute labels) before drawing conclusions from a model trained on it.",
]


def _splits_lines(cfg: ExportConfig, splits: dict[str, Any]) -> list[str]:
    lines = ["## Splits (by identity)", "", "| split | samples | identities | shards |", "|---|---|---|---|"]
    for split, s in splits.items():
        lines.append(f"| {split} | {s['samples']} | {s['identities']} | {len(s['shards'])} |")
    few = [s for s, v in splits.items() if v["samples"] and len(v["shards"]) < cfg.min_shards_per_split]
    if few:
        lines += ["", f"**Warning:** {', '.join(few)} has fewer than {cfg.min_shards_per_split} shards (too few "
                  "samples): a data loader with more workers than shards leaves workers idle; set "
                  "`num_workers` to at most the shard count."]
    return lines


def _labels_lines(splits: dict[str, Any], grouping: list[dict[str, Any]] | None) -> list[str]:
    n_train = splits.get("train", {}).get("identities", 0)
    n_val = splits.get("val", {}).get("identities", 0)
    lines = [
        "", "## Labels", "",
        f"One label space across splits: training identities are labels 0..{max(n_train - 1, 0)} (sorted by "
        f"identity id; a classifier head has {n_train} classes), validation identities "
        f"{n_train}..{n_train + n_val - 1 if n_val else n_train}. No identity is in two splits, so validation is "
        "open-set for a classifier trained on `train`: use it for verification (pairs) or identification against "
        "its own gallery. `cls` is a `ClassLabel` whose names are the identity ids; every json carries "
        "`identity_id` too.", "",
    ]
    for g in grouping or []:
        lines += [f"Identity labels assigned by grouping {grouping_line(g)}", ""]
    return lines


def _fields_lines(meta_types: dict[str, str]) -> list[str]:
    lines = ["## Fields of `<key>.json`", "", "| field | type | meaning |", "|---|---|---|"]
    for k, (t, text) in JSON_FIELDS.items():
        lines.append(f"| `{k}` | {t} | {text} |")
    for k, t in meta_types.items():
        lines.append(f"| `{k}` | {_hf_dtype(t)} | copied from the run's stage column "
                     f"`{k.replace('_', '.', 1)}` (`export.metadata_columns`) |")
    return [*lines,
            "", "Scores are on their backend's own scale: `det_score` of the dlib HOG detector is an SVM margin "
            "(roughly 0-3), not a probability; SCRFD and YuNet scores are in [0, 1]. Embedding distances and "
            "cosines are specific to the embedder named in the run's manifests (`model_name`, `model_revision`)."]


def _selection_section(cfg: ExportConfig, stats: dict[str, Any], config_hash: str, fingerprint: str) -> list[str]:
    lines = [
        "", "## Selection", "",
        f"- samples seen by the run: {stats['total_samples']}",
        f"- selected by the decisions (every stage ok and kept, or the export thresholds): {stats['candidates']}",
        f"- excluded for lack of an identity label: {stats['dropped_no_identity']}",
        f"- excluded with identities under {cfg.min_images} images: "
        f"{stats['dropped_small_identity']} samples of {stats['small_identities']} identities",
    ]
    lines += selection_lines(stats.get("selection") or {})
    lines.append(f"- config hash `{config_hash}`, export fingerprint `{fingerprint}`")
    if cfg.thresholds or cfg.where:
        lines += ["", "Export thresholds (replace those stages' own decisions):", ""]
        lines += [f"- `{k}`: {v.model_dump(exclude_none=True)}" for k, v in cfg.thresholds.items()]
        if cfg.where:
            lines.append(f"- where: `{cfg.where}`")
    return lines


def leakage_gates(store: Any, stages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The summaries of the run's leakage stages (``report/<stage>.summary.json``, written before the export)."""
    import json

    from manifests.layout import stage_summary_path

    out = []
    for s in stages:
        path = stage_summary_path(s["id"])
        if s["name"] == "leakage" and store.exists(*path):
            out.append({"id": s["id"], "summary": json.loads(store.read_bytes(*path))})
    return out


def leakage_section(gates: list[dict[str, Any]]) -> list[str]:
    """Which gallery each leakage gate kept out, and the thresholds it decided with (fitted or given)."""
    if not gates:
        return []
    lines = ["", "## Leakage gate", "",
             "Samples that look like a person of a reference gallery were dropped (rules `leakage_*`).", ""]
    for g in gates:
        s = g["summary"]
        gal = s.get("gallery") or {}
        dist = s.get("distribution") or {}
        lines.append(f"- `{g['id']}`: gallery `{_cell(gal.get('path'))}` (sha256 `{gal.get('gallery_sha256')}`, "
                     f"{gal.get('items')} items of {gal.get('identities')} identities, space `{s.get('space')}`, "
                     f"{s.get('metric')}); {dist.get('flagged', 0)} of {dist.get('samples', 0)} samples dropped")
        for basis, t in sorted((s.get("thresholds") or {}).items()):
            what = "identity centroids" if basis == "identity" else "single samples"
            fit = t.get("fit") or {}
            unit = "identities" if basis == "identity" else "samples"
            measured = (f"; false-match rate {fit['far']:.2g} on {fit['n_impostor']} impostor pairs, at most "
                        f"{t.get('innocent_flag_rate_bound', 0):.2g} of innocent {unit} flagged") if fit else ""
            lines.append(f"  - {what}: threshold {t['threshold']:.4g} ({_cell(t['source'])}{measured})")
    return lines


def with_leakage_gates(card: str, store: Any, stages: list[dict[str, Any]]) -> str:
    """``card`` with a Leakage gate section, before Intended use, when the run has a leakage stage."""
    lines = leakage_section(leakage_gates(store, stages))
    if not lines:
        return card
    head, sep, tail = card.partition("\n## Intended use\n")
    return head + "\n".join(lines) + "\n" + sep + tail if sep else card + "\n".join(lines[1:]) + "\n"
