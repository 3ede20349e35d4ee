"""The dataset card: ``export/README.md``, a Hugging Face dataset card with YAML front matter.

The front matter makes ``datasets.load_dataset(export_dir)`` find the splits (``configs`` /
``data_files``) and decode ``cls`` as a ``ClassLabel`` named by identity id; the body says what the
images are, documents every json field, how labels work across splits, intended use, the face-data
note, and what was dropped, grouped by rule (never one line per distinct reason string).
"""

from __future__ import annotations

from typing import Any

import yaml

from pipeline.export.config import ExportConfig

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
                 refill: dict[str, Any] | None = None) -> str:
    fm = front_matter(cfg, version, splits, class_names, image_exts, meta_types)
    n_train = splits.get("train", {}).get("identities", 0)
    n_val = splits.get("val", {}).get("identities", 0)
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
             "# splits: train, validation", "```", "",
             "## Splits (by identity)", "",
             "| split | samples | identities | shards |", "|---|---|---|---|"]
    for split, s in splits.items():
        lines.append(f"| {split} | {s['samples']} | {s['identities']} | {len(s['shards'])} |")
    few = [s for s, v in splits.items() if v["samples"] and len(v["shards"]) < cfg.min_shards_per_split]
    if few:
        lines += ["", f"**Warning:** {', '.join(few)} has fewer than {cfg.min_shards_per_split} shards (too few "
                  "samples): a data loader with more workers than shards leaves workers idle; set "
                  "`num_workers` to at most the shard count."]
    lines += [
        "", "## Labels", "",
        f"One label space across splits: training identities are labels 0..{max(n_train - 1, 0)} (sorted by "
        f"identity id; a classifier head has {n_train} classes), validation identities "
        f"{n_train}..{n_train + n_val - 1 if n_val else n_train}. No identity is in two splits, so validation is "
        "open-set for a classifier trained on `train`: use it for verification (pairs) or identification against "
        "its own gallery. `cls` is a `ClassLabel` whose names are the identity ids; every json carries "
        "`identity_id` too.", "",
        "## Fields of `<key>.json`", "", "| field | type | meaning |", "|---|---|---|",
    ]
    for k, (t, text) in JSON_FIELDS.items():
        lines.append(f"| `{k}` | {t} | {text} |")
    for k, t in meta_types.items():
        lines.append(f"| `{k}` | {_hf_dtype(t)} | copied from the run's stage column "
                     f"`{k.replace('_', '.', 1)}` (`export.metadata_columns`) |")
    lines += [
        "", "Scores are on their backend's own scale: `det_score` of the dlib HOG detector is an SVM margin "
        "(roughly 0-3), not a probability; SCRFD and YuNet scores are in [0, 1]. Embedding distances and "
        "cosines are specific to the embedder named in the run's manifests (`model_name`, `model_revision`).",
        "", "## Selection", "",
        f"- samples seen by the run: {stats['total_samples']}",
        f"- selected by the decisions (every stage ok and kept, or the export thresholds): {stats['candidates']}",
        f"- excluded for lack of an identity label: {stats['dropped_no_identity']}",
        f"- excluded with identities under {cfg.min_images_per_identity} images: "
        f"{stats['dropped_small_identity']} samples of {stats['small_identities']} identities",
        f"- config hash `{config_hash}`, export fingerprint `{fingerprint}`",
    ]
    if cfg.thresholds or cfg.where:
        lines += ["", "Export thresholds (replace those stages' own decisions):", ""]
        lines += [f"- `{k}`: {v.model_dump(exclude_none=True)}" for k, v in cfg.thresholds.items()]
        if cfg.where:
            lines.append(f"- where: `{cfg.where}`")
    if refill:
        lines += ["", "## Refill", "", refill_markdown(refill)]
    lines += ["", "## Drops and errors by rule", ""]
    lines += drop_table(stats["reasons"]) if stats["reasons"] else ["No sample was dropped or failed."]
    if balance:
        lines += ["", "## Balance", "", balance]
    lines += [
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
    return "\n".join(lines) + "\n"
