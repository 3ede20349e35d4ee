"""Face verification evaluation, the standard protocol (LFW / CFP-FP / AgeDB-30 as insightface runs it).

- Embedding: the embeddings of an image and of its mirror are summed, then L2-normalised.
- Score: cosine similarity of the two embeddings of a pair (same ranking as insightface's squared
  distance between normalised embeddings, ``2 - 2 cos``).
- Accuracy: 10 contiguous folds; for each, the threshold with the best accuracy on the other nine
  folds is applied to it; the result is the mean (and std) over folds. Candidate thresholds are the
  midpoints between consecutive distinct scores (exact, no grid); ties go to the middle candidate.
- TAR@FAR: the threshold is the (k+1)-th highest impostor score with k = floor(FAR * impostors), so
  at most a FAR fraction of impostors pass; TAR is the fraction of genuine pairs above it. With
  fewer than 1/FAR impostor pairs the achievable FAR is 0 and the result says so (``far_resolved``).

Pairs come from insightface ``.bin`` files or from held-out identities of our own export.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.table import Table
from rich.text import Text
from torch import nn

from pipeline.terminal import console as make_console
from training.augmentations import recognition_eval_transform
from training.bin_pairs import PairFile, read_pair_file, write_pair_file
from training.config import VerificationEvalConfig, VerificationPairsConfig
from training.export_index import ExportIndex, load_export
from training.job_layout import run_dir_of_checkpoint, write_json
from training.metrics_store import MetricsWriter
from training.recognition_model import load_backbone
from training.shard_loader import ShardStream, decode_rgb_tensor, image_member

DEFAULT_FARS = (1e-3, 1e-4)


# ---------------------------------------------------------------- scores -> metrics (pure numpy)


def _best_threshold(scores: np.ndarray, issame: np.ndarray) -> float:
    """Threshold maximising accuracy of ``score > t`` on these pairs."""
    uniq = np.unique(scores)
    candidates = np.concatenate([[uniq[0] - 1.0], (uniq[:-1] + uniq[1:]) / 2.0, [uniq[-1] + 1.0]])
    order = np.argsort(scores, kind="stable")
    s_sorted, same_sorted = scores[order], issame[order]
    # For each candidate: pairs above it are predicted "same".
    below = np.searchsorted(s_sorted, candidates, side="right")
    neg_below = np.concatenate([[0], np.cumsum(~same_sorted)])[below]
    pos_above = issame.sum() - np.concatenate([[0], np.cumsum(same_sorted)])[below]
    correct = neg_below + pos_above
    best = np.flatnonzero(correct == correct.max())
    return float(candidates[best[len(best) // 2]])


def kfold_accuracy(scores: np.ndarray, issame: np.ndarray, n_folds: int = 10) -> dict[str, Any]:
    scores, issame = np.asarray(scores, np.float64), np.asarray(issame, bool)
    if len(scores) < n_folds:
        raise ValueError(f"{len(scores)} pairs cannot make {n_folds} folds")
    folds = np.array_split(np.arange(len(scores)), n_folds)
    accs, thresholds = [], []
    for test in folds:
        train = np.setdiff1d(np.arange(len(scores)), test)
        t = _best_threshold(scores[train], issame[train])
        accs.append(float(np.mean((scores[test] > t) == issame[test])))
        thresholds.append(t)
    return {
        "accuracy": float(np.mean(accs)),
        "accuracy_std": float(np.std(accs)),
        "threshold": float(np.mean(thresholds)),
        "fold_accuracies": accs,
    }


def tar_at_far(scores: np.ndarray, issame: np.ndarray, far: float) -> dict[str, Any]:
    scores, issame = np.asarray(scores, np.float64), np.asarray(issame, bool)
    impostor = np.sort(scores[~issame])[::-1]
    genuine = scores[issame]
    if len(impostor) == 0 or len(genuine) == 0:
        raise ValueError("TAR@FAR needs genuine and impostor pairs")
    k = int(np.floor(far * len(impostor)))
    threshold = float(impostor[min(k, len(impostor) - 1)])
    return {
        "tar": float(np.mean(genuine > threshold)),
        "threshold": threshold,
        "far_achieved": float(np.mean(impostor > threshold)),
        "far_resolved": len(impostor) * far >= 1.0,
    }


def verification_metrics(
    scores: np.ndarray, issame: np.ndarray, fars: Iterable[float] = DEFAULT_FARS, n_folds: int = 10
) -> dict[str, Any]:
    issame = np.asarray(issame, bool)
    out: dict[str, Any] = {
        "pairs": len(issame),
        "genuine_pairs": int(issame.sum()),
        "impostor_pairs": int((~issame).sum()),
    }
    out.update(kfold_accuracy(scores, issame, n_folds))
    for far in fars:
        r = tar_at_far(scores, issame, far)
        out[f"tar@far={far:g}"] = r["tar"]
        out[f"tar@far={far:g}_resolved"] = r["far_resolved"]
    return out


# ---------------------------------------------------------------- embeddings


@torch.inference_mode()
def embed(
    model: nn.Module, batches: Iterable[torch.Tensor], device: torch.device | str = "cpu", flip: bool = True
) -> np.ndarray:
    """(N, D) L2-normalised embeddings of normalised image batches; ``flip`` adds the mirror's embedding."""
    model.eval()
    out = []
    for x in batches:
        x = x.to(device)
        e = model(x).float()
        if flip:
            e = e + model(torch.flip(x, dims=[-1])).float()
        out.append(torch.nn.functional.normalize(e, dim=1).cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, 0), np.float32)


def _batched(items: Iterable[torch.Tensor], size: int) -> Iterator[torch.Tensor]:
    buf: list[torch.Tensor] = []
    for item in items:
        buf.append(item)
        if len(buf) == size:
            yield torch.stack(buf)
            buf = []
    if buf:
        yield torch.stack(buf)


def pair_scores(embeddings: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    return np.sum(embeddings[pairs[:, 0]] * embeddings[pairs[:, 1]], axis=1)


# ---------------------------------------------------------------- pair sources


def _genuine_pairs(labels: np.ndarray, n_pairs: int, rng: np.random.Generator) -> np.ndarray:
    """Distinct same-identity pairs: all of them, or a uniform sample of ``n_pairs`` when there are more."""
    groups = [np.flatnonzero(labels == ident) for ident in np.unique(labels)]
    groups = [g for g in groups if len(g) > 1]
    counts = np.asarray([len(g) * (len(g) - 1) // 2 for g in groups], dtype=np.float64)
    if not groups:
        raise ValueError("pairs need at least one identity with two samples")
    if counts.sum() <= max(4 * n_pairs, 10_000):
        every = np.asarray([(a, b) for g in groups for i, a in enumerate(g) for b in g[i + 1 :]])
        take = rng.choice(len(every), size=min(n_pairs, len(every)), replace=False)
        return every[np.sort(take)]
    found: set[tuple[int, int]] = set()
    while len(found) < n_pairs:  # far more pairs exist than asked for, so this ends quickly
        g = groups[rng.choice(len(groups), p=counts / counts.sum())]
        a, b = rng.choice(g, size=2, replace=False)
        found.add((int(min(a, b)), int(max(a, b))))
    return np.asarray(sorted(found))


def identity_pairs(labels: np.ndarray, n_pairs: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Balanced pairs over samples with identity ``labels``: up to ``n_pairs`` distinct genuine pairs
    and as many distinct impostor pairs, shuffled so every fold mixes both."""
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    if len(np.unique(labels)) < 2:
        raise ValueError("pairs need at least two identities")
    sizes = np.unique(labels, return_counts=True)[1].astype(np.int64)
    impostor_total = int((sizes.sum() ** 2 - (sizes**2).sum()) // 2)
    pos = _genuine_pairs(labels, min(n_pairs, impostor_total), rng)
    neg: set[tuple[int, int]] = set()
    while len(neg) < len(pos):
        a, b = rng.integers(0, len(labels), size=2)
        if labels[a] != labels[b]:
            neg.add((int(min(a, b)), int(max(a, b))))
    pairs = np.concatenate([pos, np.asarray(sorted(neg))])
    issame = np.concatenate([np.ones(len(pos), bool), np.zeros(len(neg), bool)])
    order = rng.permutation(len(pairs))
    return pairs[order], issame[order]


def _export_images(export: ExportIndex, split: str, input_size: int) -> Iterator[tuple[torch.Tensor, int]]:
    transform = recognition_eval_transform(input_size)

    def decode(sample: dict[str, Any]) -> tuple[torch.Tensor, int]:
        return transform(decode_rgb_tensor(image_member(sample))), int(sample["cls"].decode().strip())

    yield from ShardStream(
        export.split(split).shards,
        decode,
        shuffle=False,
        repeat=False,
        storage_options=export.storage_options,
    )


def evaluate_on_export(
    model: nn.Module,
    export: ExportIndex,
    split: str,
    pairs_cfg: VerificationPairsConfig,
    input_size: int,
    device: torch.device | str = "cpu",
    seed: int = 0,
    fars: Iterable[float] = DEFAULT_FARS,
) -> dict[str, Any]:
    """Verification on pairs of the split's identities (held out from training by the export)."""
    labels: list[int] = []

    def images() -> Iterator[torch.Tensor]:
        for image, label in _export_images(export, split, input_size):
            labels.append(label)
            yield image

    emb = embed(model, _batched(images(), pairs_cfg.batch_size), device, pairs_cfg.flip)
    pairs, issame = identity_pairs(np.asarray(labels), pairs_cfg.pairs, seed)
    out = verification_metrics(pair_scores(emb, pairs), issame, fars)
    out.update(dataset=f"export:{split}", samples=len(labels), identities=len(set(labels)))
    return out


def export_pairs_to_bin(
    export: ExportIndex, split: str, path: str, n_pairs: int = 3000, seed: int = 0
) -> int:
    """Write the split's verification pairs (the same ones ``evaluate_on_export`` scores with this
    seed) as an insightface ``.bin``, so other tools can evaluate on our held-out identities.
    Returns the number of pairs written."""

    def raw(sample: dict[str, Any]) -> tuple[bytes, int]:
        decode_rgb_tensor(image_member(sample))  # the same samples as evaluation: skip what cannot decode
        return image_member(sample), int(sample["cls"].decode().strip())

    items = list(
        ShardStream(
            export.split(split).shards,
            raw,
            shuffle=False,
            repeat=False,
            storage_options=export.storage_options,
        )
    )
    pairs, issame = identity_pairs(np.asarray([label for _, label in items]), n_pairs, seed)
    images = [items[i][0] for pair in pairs for i in pair]
    write_pair_file(path, images, issame.tolist(), export.storage_options)
    return len(pairs)


def evaluate_on_pair_file(
    model: nn.Module,
    pair_file: PairFile,
    input_size: int,
    batch_size: int = 64,
    flip: bool = True,
    device: torch.device | str = "cpu",
    fars: Iterable[float] = DEFAULT_FARS,
) -> dict[str, Any]:
    transform = recognition_eval_transform(input_size)
    images = (transform(decode_rgb_tensor(b)) for b in pair_file.images)
    emb = embed(model, _batched(images, batch_size), device, flip)
    out = verification_metrics(pair_scores(emb, pair_file.pairs), pair_file.issame, fars)
    out["dataset"] = pair_file.name
    return out


# ---------------------------------------------------------------- the job


def evaluate_verification(config: VerificationEvalConfig, console: Console | None = None) -> dict[str, Any]:
    """``facefoundry eval verification``: one checkpoint against every configured pair source.
    Returns ``{"checkpoint", "step", "results": {dataset: metrics}}``, also written as JSON and,
    when the checkpoint lies in a run, as eval rows of the job's Parquet metrics."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, meta = load_backbone(config.checkpoint, config.storage_options, device)
    input_size = int(meta["config"]["data"]["input_size"])
    results: dict[str, Any] = {}
    for path in config.bin_files:
        pf = read_pair_file(path, config.storage_options)
        results[pf.name] = evaluate_on_pair_file(
            model, pf, input_size, config.pairs.batch_size, config.pairs.flip, device
        )
    if config.export:
        export = load_export(config.export, config.storage_options)
        r = evaluate_on_export(model, export, config.split, config.pairs, input_size, device, config.seed)
        results[r["dataset"]] = r
    ckpt_path = meta.get("checkpoint_path") or config.checkpoint
    summary = {
        "checkpoint": ckpt_path,
        "step": meta["step"],
        "export": meta.get("export"),
        "results": results,
    }
    located = run_dir_of_checkpoint(ckpt_path)
    output = config.output
    if output is None and located is not None:
        output = f"{located[0]}/train/{located[1]}/eval/verification-step-{meta['step']:08d}.json"
    if output:
        write_json(output, summary, config.storage_options)
        summary["output"] = output
    if located is not None:
        writer = MetricsWriter(located[0], located[1], "verification", config.storage_options)
        for name, r in results.items():
            writer.log(meta["step"], _numeric(r), phase="eval", dataset=name)
        writer.flush(tag="verification")
    (console or make_console()).print(results_table(results))
    return summary


def _numeric(result: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in result.items() if isinstance(v, int | float) and not isinstance(v, bool)}


def results_table(results: dict[str, dict[str, Any]]) -> Table:
    table = Table(title="verification")
    for col in ("dataset", "pairs", "accuracy", "std", "TAR@FAR=1e-3", "TAR@FAR=1e-4"):
        table.add_column(col, justify="left" if col == "dataset" else "right")
    for name, r in results.items():

        def tar(far: str, r: dict[str, Any] = r) -> str:
            value = f"{r.get(f'tar@far={far}', float('nan')):.4f}"
            return value if r.get(f"tar@far={far}_resolved", True) else value + "*"

        table.add_row(
            Text(name),
            str(r["pairs"]),
            f"{r['accuracy']:.4f}",
            f"{r['accuracy_std']:.4f}",
            tar("0.001"),
            tar("0.0001"),
        )
    table.caption = "* fewer than 1/FAR impostor pairs: the threshold is the highest impostor score"
    return table
