"""Leak-checked identity splits.

Split units: identities joined by a dedup group (a near-copy in two identities) are always one unit,
so a near-copy cannot cross splits; identities whose centroids verify as one person (the space's
verification threshold, facekit.thresholds, or ``splits.threshold``) are one unit too
(``lookalikes: together``) or only counted and listed (``flag``). Units are ranked by the hash of
their first member; walking that order, a unit goes to validation while it fits in round(f * n)
identities of its stratum (``splits.stratify``: an identity's most frequent label; else one
stratum). With every unit a single identity this is exactly the round(f * n) smallest hashes.

The card's leak figures: the largest similarity between a validation centroid and its nearest
training centroid (FAISS over the centroids: one vector per identity), and between a hash sample of
``image_check`` validation images and their nearest training image (training images streamed file
by file, one FAISS flat index per file: memory is the sample plus one file).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from facekit.thresholds import Metric, defaults_for, distinct_label_pairs
from pipeline.export.config import ExportConfig
from pipeline.export.order import units


class UnionFind:
    def __init__(self, n: int) -> None:
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def lookalike_threshold(x: np.ndarray, metric: Metric, cfg: ExportConfig, space: str,
                        max_pairs: int = 200_000) -> dict[str, Any]:
    """The look-alike threshold and where it came from.

    Given, it is used as is. Otherwise it is fitted from centroid pairs of the run's identities. The
    published verification point was measured on photos, and generated identities sit closer (SFace
    render centroids of distinct identities at 0.4-0.8 against the LFW point 0.363): at that point nearly
    every pair of a synthetic run verifies and the union of look-alikes is the whole run. The pairs'
    bulk is modelled as a normal law from its median and MAD (robust: the look-alikes themselves are the
    outliers, and an empirical quantile at a rate below one pair in the sample could never flag them),
    and the threshold is its tail at the pair rate ``lookalike_rate / (n - 1)``: about that share of
    identities gets a false partner, so the links stay far below one per identity and their union cannot
    chain into one unit however many identities the run has. Never looser than the verification point."""
    from statistics import NormalDist

    th = defaults_for(space)
    floor = th.verification if th.verification is not None else th.collision
    given = cfg.splits.threshold
    if given is not None:
        return {"threshold": float(given), "threshold_source": "given"}
    n = x.shape[0]
    rate = cfg.splits.lookalike_rate
    if rate is None or n < 3:
        return {"threshold": float(floor), "threshold_source": "default"}
    i, j = distinct_label_pairs(np.arange(n), max_pairs=max_pairs, seed=0)
    scores = metric.score(x[i], x[j]).astype(np.float64)
    centre = float(np.median(scores))
    spread = 1.4826 * float(np.median(np.abs(scores - centre)))
    z = NormalDist().inv_cdf(1.0 - min(0.5, rate / (n - 1)))
    tail = centre + z * spread if metric.higher_is_same else centre - z * spread
    threshold = max(tail, floor) if metric.higher_is_same else min(tail, floor)
    return {"threshold": float(threshold), "threshold_source": "fitted", "lookalike_rate": rate,
            "centroid_pairs": int(scores.size), "unfloored": float(tail), "floor": float(floor)}


def _read(store: Any, parts: tuple[str, ...], columns: list[str] | None = None) -> pa.Table:
    with store.fs.open(store.path(*parts), "rb") as f:
        return pq.read_table(f, columns=columns)


def load_centroids(store: Any, emb_files: list[tuple[str, ...]], metric: Metric) -> tuple[list[str], np.ndarray]:
    """Identity ids and centroids; an identity's rows all lie in one file (the files are identity-hash
    ranges), so each file's centroids are final."""
    from facekit.vector_index import embedding_matrix
    from pipeline.export.choose import centroids

    names: list[str] = []
    blocks: list[np.ndarray] = []
    for parts in emb_files:
        t = _read(store, parts, ["identity_id", "sel_emb"])
        if not t.num_rows:
            continue
        x, _ = embedding_matrix(t, "sel_emb")
        ids = t.column("identity_id")
        uniq = pc.unique(ids)
        uniq = uniq.take(pc.sort_indices(uniq))
        codes = pc.index_in(ids, value_set=uniq).to_numpy().astype(np.int64)
        blocks.append(centroids(x, codes, len(uniq), metric.higher_is_same))
        names += uniq.to_pylist()
    return names, (np.concatenate(blocks) if blocks else np.zeros((0, 0), np.float32))


def lookalike_pairs(store: Any, emb_files: list[tuple[str, ...]], metric: str, cfg: ExportConfig, space: str
                    ) -> tuple[list[tuple[str, str, float]], dict[str, Any]]:
    """Every pair of identities whose centroids are look-alikes, and the threshold that says so."""
    from facekit.vector_index import range_pairs

    m = Metric(metric)
    names, x = load_centroids(store, emb_files, m)
    fit = lookalike_threshold(x, m, cfg, space)
    if len(names) < 2:
        return [], fit
    pairs = range_pairs(x, m, fit["threshold"])
    return sorted((names[int(i)], names[int(j)], float(s)) for i, j, s in zip(pairs.i, pairs.j, pairs.score,
                                                                             strict=True)), fit


def assign_units(kept: pa.Table, links: list[tuple[str, str]], val_fraction: float, stratify: bool
                 ) -> dict[str, str]:
    """identity -> 'train' | 'val', with every linked pair on one side (see the module doc)."""
    ids = kept.column("identity_id").to_pylist()
    strata = kept.column("strat").to_pylist() if stratify else ["all"] * len(ids)
    index = {k: i for i, k in enumerate(ids)}
    uf = UnionFind(len(ids))
    for a, b in links:
        if a in index and b in index:
            uf.union(index[a], index[b])
    members: dict[int, list[int]] = {}
    for i in range(len(ids)):
        members.setdefault(uf.find(i), []).append(i)
    hashes = units("split:", kept.column("identity_id")).tolist()
    keyed = [(min((hashes[i], ids[i]) for i in m), m) for m in members.values()]
    by_stratum: dict[str, list[tuple[tuple[float, str], list[int]]]] = {}
    for key, m in keyed:
        by_stratum.setdefault(str(strata[index[key[1]]]), []).append((key, m))
    out: dict[str, str] = {}
    for group in by_stratum.values():
        group.sort()
        n = sum(len(m) for _, m in group)
        n_val = round(val_fraction * n) if n > 1 else 0
        if val_fraction > 0 and n_val == 0 and n > 1:
            n_val = 1
        taken = 0
        for _, m in group:
            side = "val" if taken + len(m) <= n_val and taken < n_val else "train"
            taken += len(m) if side == "val" else 0
            for i in m:
                out[ids[i]] = side
    return out


@dataclass
class LeakReport:
    max_identity: dict[str, Any] | None  # score, val, train
    max_image: dict[str, Any] | None  # score, val, train, checked, of


def leak_report(store: Any, emb_files: list[tuple[str, ...]], splits: dict[str, str], metric: str,
                image_check: int) -> LeakReport:
    """The card's cross-split similarities (see the module doc)."""
    from facekit.vector_index import embedding_matrix, knn

    m = Metric(metric)
    names, x = load_centroids(store, emb_files, m)
    val = [i for i, k in enumerate(names) if splits.get(k) == "val"]
    train = [i for i, k in enumerate(names) if splits.get(k) == "train"]
    best_id: dict[str, Any] | None = None
    if val and train:
        scores, nn = knn(x[train], x[val], 1, m)
        b = int(np.argmax(scores[:, 0]) if m.higher_is_same else np.argmin(scores[:, 0]))
        best_id = {"score": float(scores[b, 0]), "val": names[val[b]], "train": names[train[int(nn[b, 0])]]}
    # the sample: the image_check validation images with the smallest check hash (each file is sorted by
    # it, so a file's first val rows are its candidates); Arrow filters, no row reaches Python
    val_set = pa.array([k for k, v in splits.items() if v == "val"], pa.string())
    train_set = pa.array([k for k, v in splits.items() if v == "train"], pa.string())
    sample: pa.Table | None = None
    n_val = 0
    for parts in emb_files:
        t = _read(store, parts, ["sample_id", "identity_id", "sel_emb", "check"])
        t = t.filter(pc.is_in(t.column("identity_id"), value_set=val_set))
        n_val += t.num_rows
        if image_check and t.num_rows:
            both = t.slice(0, image_check) if sample is None else pa.concat_tables([sample, t.slice(0, image_check)])
            sample = both.sort_by([("check", "ascending"), ("sample_id", "ascending")]).slice(0, image_check)
    if sample is None or not sample.num_rows:
        return LeakReport(best_id, None)
    q, _ = embedding_matrix(sample, "sel_emb")
    best = m.worst()
    best_pair: tuple[int, str] | None = None
    for parts in emb_files:
        t = _read(store, parts, ["sample_id", "identity_id", "sel_emb"])
        t = t.filter(pc.is_in(t.column("identity_id"), value_set=train_set))
        if not t.num_rows:
            continue
        xt, _ = embedding_matrix(t, "sel_emb")
        scores, nn = knn(xt, q, 1, m)
        b = int(np.argmax(scores[:, 0]) if m.higher_is_same else np.argmin(scores[:, 0]))
        if best_pair is None or m.closer(float(scores[b, 0]), best):
            best = float(scores[b, 0])
            best_pair = (b, str(t.column("sample_id")[int(nn[b, 0])].as_py()))
    if best_pair is None:
        return LeakReport(best_id, None)
    return LeakReport(best_id, {"score": best, "val": str(sample.column("sample_id")[best_pair[0]].as_py()),
                                "train": best_pair[1], "checked": sample.num_rows, "of": n_val})

