"""Identity-level selection: which identities are exported and how many images each keeps.

Two pure steps, one rule each, shared by the export and ``whatif``:

- ``select_identities(counts, cfg)`` sees one row per (identity, bin) -- candidate images per
  identity and label bin, and the sum of the ranking score -- and decides every identity: kept with
  how many images, or dropped by a rule. It needs no image, so ``whatif`` answers from a GROUP BY.
- ``pick_images(rows, ...)`` sees every candidate row of a few identities (the export's second plan
  pass groups rows by identity hash) and chooses which images fill the counts ``image_plan``
  gives, by the ``prefer`` rule.

Rules of the rows left out: ``identity_too_small`` (fewer than ``min_images`` after the image
quota and balance), ``over_max_identities`` and ``over_quota`` (what ``max_identities`` and
``max_images`` alone leave out: the worst in rank or ``prefer`` order), ``balance`` (what balance
leaves out beyond that: bins over their share, bins without a share).

Quotas of a total t over shares are largest-remainder: floor(t * share) per bin, the rest one each
to the largest fractions (ties by bin name). Without ``fill``, t shrinks to the largest total whose
quotas every bin can meet; with ``fill`` t stays and a short bin's place goes to the other bins in
``prefer`` (images) or rank (identities) order. Either way the shortfall per bin is reported.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.export.config import Balance, ExportConfig, Identities
from pipeline.export.order import units

TOO_SMALL = "identity_too_small"
OVER_QUOTA = "over_quota"
OVER_MAX_IDENTITIES = "over_max_identities"
BALANCE = "balance"
RULES = (TOO_SMALL, OVER_MAX_IDENTITIES, BALANCE, OVER_QUOTA)
NO_BIN = "(none)"

COUNTS_SCHEMA = pa.schema([("identity_id", pa.string()), ("bin", pa.string()), ("n", pa.int64()),
                           ("score_sum", pa.float64()), ("score_n", pa.int64())])


def counts_sql(source: str) -> str:
    """The (identity, bin) counts ``select_identities`` reads, from rows with the selection columns
    ``sel_bal`` (the balance label as text, NULL without balance) and ``sel_rank`` (the identity
    ranking score, NULL without one): ``source`` is a table or a parenthesised query."""
    return (f"SELECT identity_id, coalesce(CAST(sel_bal AS VARCHAR), '{NO_BIN}') AS bin, count(*)::BIGINT AS n, "
            f"sum(sel_rank)::DOUBLE AS score_sum, count(sel_rank)::BIGINT AS score_n FROM {source} "
            "WHERE identity_id IS NOT NULL AND identity_id <> '' GROUP BY 1, 2")


def quotas(total: int, shares: Mapping[str, float]) -> dict[str, int]:
    """Largest-remainder quotas of ``total`` over ``shares`` (they sum to 1)."""
    names = sorted(shares)
    raw = {b: total * shares[b] for b in names}
    out = {b: math.floor(raw[b] + 1e-9) for b in names}
    rest = total - sum(out.values())
    for b in sorted(names, key=lambda b: (-(raw[b] - out[b]), b))[:max(rest, 0)]:
        out[b] += 1
    return out


def balanced_total(upper: int, available: Mapping[str, int], shares: Mapping[str, float], fill: bool,
                   exists: int | None = None) -> int:
    """The largest total <= ``upper`` whose quotas every bin meets (``fill``: ``upper``, capped by what
    exists: ``exists``, by default the sum of ``available``)."""
    if fill:
        return min(upper, sum(available.values()) if exists is None else exists)
    t = upper
    for b, s in shares.items():
        t = min(t, math.ceil((available.get(b, 0) + 1) / s) - 1)
    t = max(t, 0)
    while t > 0 and any(q > available.get(b, 0) for b, q in quotas(t, shares).items()):
        t -= 1
    return t


@dataclass(frozen=True)
class ImagePlan:
    """How many images one identity keeps: ``total``; per balance bin at most ``per_bin`` before
    filling; ``capped`` is what ``max_images`` alone leaves (the rest of the drop is ``balance``)."""

    total: int
    capped: int
    per_bin: dict[str, int] | None
    short: dict[str, int]  # images a bin lacks to meet its share of ``capped``


def image_plan(available: Mapping[str, int], cfg: Identities) -> ImagePlan:
    return _plan(sum(available.values()), available, cfg)


def _plan(n: int, available: Mapping[str, int], cfg: Identities) -> ImagePlan:
    """The plan of an identity with ``n`` candidates, ``available`` of them per bin (bins outside the
    shares may be left out)."""
    capped = min(n, cfg.max_images) if cfg.max_images is not None else n
    bal = cfg.balance
    if bal is None or bal.level != "image":
        return ImagePlan(capped, capped, None, {})
    want = quotas(capped, bal.shares)
    short = {b: q - available.get(b, 0) for b, q in want.items() if q > available.get(b, 0)}
    total = balanced_total(capped, available, bal.shares, bal.fill, n)
    per_bin = {b: min(q, available.get(b, 0)) for b, q in quotas(total, bal.shares).items()}
    return ImagePlan(total, capped, per_bin, short)


@dataclass
class Selection:
    """Every identity's decision and the totals the card, the report and ``whatif`` show."""

    table: pa.Table  # identity_id, candidates, selected, bin, rule (null when kept)
    samples: int  # images selected
    identities: int  # identities selected
    drops: dict[str, int]  # rule -> images
    dropped_identities: dict[str, int]  # rule -> identities dropped whole
    balance: dict[str, Any] | None  # level, column, wanted / got / short per bin, met
    short_of_target: int  # selected identities under target_images
    target_images: int | None = None
    notes: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {"samples": self.samples, "identities": self.identities, "drops": dict(self.drops),
                "dropped_identities": dict(self.dropped_identities), "balance": self.balance,
                "target_images": self.target_images, "short_of_target": self.short_of_target}


@dataclass(frozen=True)
class _PerIdentity:
    """The counts table folded to one entry per identity, identities in id order."""

    ids: pa.Array  # sorted identity ids
    n: np.ndarray  # candidate images
    score: np.ndarray  # mean ranking score; NaN without one
    has_score: np.ndarray
    top_bin: pa.Array  # the most frequent bin (ties by bin name)
    row_ident: np.ndarray  # per (identity, bin) row: its identity's index
    row_bin: pa.Array  # per row: its bin (NO_BIN for a null or empty one)
    row_n: np.ndarray


def _per_identity(counts: pa.Table) -> _PerIdentity:
    bins = pc.if_else(pc.or_kleene(pc.is_null(counts.column("bin")), pc.equal(counts.column("bin"), "")),
                      NO_BIN, counts.column("bin"))
    grouped = pa.table({"identity_id": counts.column("identity_id"), "bin": bins,
                        "n": counts.column("n").cast(pa.int64())}).group_by(["identity_id", "bin"]).aggregate(
        [("n", "sum")])
    ids = pc.unique(grouped.column("identity_id").combine_chunks())
    ids = ids.take(pc.sort_indices(ids))
    row_ident = pc.index_in(grouped.column("identity_id"), ids).to_numpy().astype(np.int64)
    row_bin = grouped.column("bin").combine_chunks()
    row_n = grouped.column("n_sum").to_numpy().astype(np.int64)
    n = np.bincount(row_ident, weights=row_n, minlength=len(ids)).astype(np.int64)
    # The most frequent bin: rows by identity, count descending, bin name ascending; the first per identity.
    order = pc.sort_indices(pa.table({"i": row_ident, "n": row_n, "b": row_bin}),
                            [("i", "ascending"), ("n", "descending"), ("b", "ascending")]).to_numpy()
    starts = np.ones(len(order), dtype=bool)
    starts[1:] = row_ident[order][1:] != row_ident[order][:-1]
    first = order[starts]
    top_bin = row_bin.take(pa.array(first))
    score_sum = np.zeros(len(ids))
    score_n = np.zeros(len(ids), dtype=np.int64)
    if "score_sum" in counts.column_names:
        valid = counts.column("score_sum").is_valid().to_numpy(zero_copy_only=False)
        at = pc.index_in(counts.column("identity_id"), ids).to_numpy(zero_copy_only=False)[valid].astype(np.int64)
        sums = counts.column("score_sum").to_numpy(zero_copy_only=False)[valid].astype(np.float64)
        ns = pc.fill_null(counts.column("score_n"), 0).to_numpy(zero_copy_only=False)[valid].astype(np.int64)
        np.add.at(score_sum, at, sums)
        np.add.at(score_n, at, ns)
    has_score = score_n != 0
    score = np.divide(score_sum, score_n, out=np.full(len(ids), np.nan), where=has_score)
    return _PerIdentity(ids, n, score, has_score, top_bin, row_ident, row_bin, row_n)


@dataclass(frozen=True)
class _Plans:
    """Every identity's ``ImagePlan`` as arrays; with image balance, ``kind`` indexes ``plans`` (identities
    with the same counts per share bin share one plan)."""

    total: np.ndarray
    capped: np.ndarray
    kind: np.ndarray | None = None
    plans: list[ImagePlan] = field(default_factory=list)


def _image_plans(per: _PerIdentity, cfg: Identities) -> _Plans:
    capped = per.n if cfg.max_images is None else np.minimum(per.n, cfg.max_images)
    bal = cfg.balance
    if bal is None or bal.level != "image":
        return _Plans(capped, capped)
    names = sorted(bal.shares)
    # Per identity: candidates, then candidates per share bin (what image_plan reads of its counts).
    matrix = np.zeros((len(per.n), 1 + len(names)), dtype=np.int64)
    matrix[:, 0] = per.n
    col = pc.index_in(per.row_bin, pa.array(names, pa.string())).to_numpy(zero_copy_only=False)
    in_share = ~np.isnan(col.astype(np.float64))
    np.add.at(matrix, (per.row_ident[in_share], 1 + col[in_share].astype(np.int64)), per.row_n[in_share])
    patterns, kind = np.unique(matrix, axis=0, return_inverse=True)
    kind = kind.reshape(-1)
    plans = [_plan(int(p[0]), {b: int(c) for b, c in zip(names, p[1:], strict=True) if c}, cfg) for p in patterns]
    total = np.array([p.total for p in plans], dtype=np.int64)[kind]
    return _Plans(total, capped, kind, plans)


def _ranked(per: _PerIdentity, eligible: np.ndarray, cfg: Identities) -> np.ndarray:
    """Indices of the eligible identities, best first by ``cfg.rank``; ties by identity id (the
    identities' index order)."""
    idx = np.flatnonzero(eligible)
    r = cfg.rank
    if r.by == "images":
        keys: tuple[np.ndarray, ...] = (idx, -per.n[idx])
    elif r.by == "hash":
        keys = (idx, units("rank:", per.ids.take(pa.array(idx))))
    else:
        score = np.where(per.has_score[idx], per.score[idx], 0.0)
        keys = (idx, -score if r.order == "higher" else score, ~per.has_score[idx])
    return idx[np.lexsort(keys)]


def select_identities(counts: pa.Table, cfg: ExportConfig | Identities, min_images: int | None = None
                      ) -> Selection:
    """Decide every identity from its (identity, bin) counts (``COUNTS_SCHEMA``; ``bin`` is the
    balance label or any constant without balance). Deterministic: no input order matters."""
    if isinstance(cfg, ExportConfig):
        ids_cfg, min_req = cfg.identities, cfg.min_images
    else:
        ids_cfg, min_req = cfg, min_images or cfg.min_images or 1
    per = _per_identity(counts)
    plans = _image_plans(per, ids_cfg)
    eligible = plans.total >= min_req
    ranked = _ranked(per, eligible, ids_cfg)
    limit = len(ranked) if ids_cfg.max_identities is None else min(len(ranked), ids_cfg.max_identities)
    bal = ids_cfg.balance
    balance_doc: dict[str, Any] | None = None
    chosen = np.zeros(len(per.n), dtype=bool)
    if bal is not None and bal.level == "identity":
        names = per.ids.to_pylist()
        top = per.top_bin.to_pylist()
        picked, balance_doc = _balance_identities([names[i] for i in ranked], limit,
                                                  {names[i]: top[i] for i in ranked}, bal)
        chosen[[i for i in ranked if names[i] in picked]] = True
    else:
        chosen[ranked[:limit]] = True
    rule = np.full(len(per.n), None, dtype=object)
    rule[~eligible] = TOO_SMALL
    left = ranked[~chosen[ranked]]  # in rank order: the last len(ranked) - limit are max_identities alone
    cut = len(left) - (len(ranked) - limit)
    rule[left[:cut]] = BALANCE
    rule[left[cut:]] = OVER_MAX_IDENTITIES
    selected = np.where(chosen, plans.total, 0)
    drops = {why: int(per.n[rule == why].sum()) for why in (TOO_SMALL, OVER_MAX_IDENTITIES, BALANCE)}
    dropped_ids = {why: int((rule == why).sum()) for why in RULES}
    drops[OVER_QUOTA] = int((per.n - plans.capped)[chosen].sum())
    drops[BALANCE] += int((plans.capped - plans.total)[chosen].sum())
    if bal is not None and bal.level == "image":
        balance_doc = _image_balance_doc(plans, chosen, bal)
    target = ids_cfg.target_images
    short_target = int((selected[chosen] < target).sum()) if target is not None else 0
    table = pa.table({"identity_id": per.ids, "candidates": pa.array(per.n, pa.int64()),
                      "selected": pa.array(selected, pa.int64()), "bin": per.top_bin.cast(pa.string()),
                      "rule": pa.array(rule.tolist(), pa.string())})
    return Selection(table, int(selected.sum()), int(chosen.sum()), {k: drops[k] for k in RULES if drops[k]},
                     {k: v for k, v in dropped_ids.items() if v}, balance_doc, short_target, target)


def _image_balance_doc(plans: _Plans, chosen: np.ndarray, bal: Balance) -> dict[str, Any]:
    """What image-level balance kept per bin (before ``fill``) over the chosen identities, and what each
    bin lacked."""
    assert plans.kind is not None
    per_kind = np.bincount(plans.kind[chosen], minlength=len(plans.plans))
    got: dict[str, int] = {}
    short: dict[str, dict[str, int]] = {}
    for plan, times in zip(plans.plans, per_kind.tolist(), strict=True):
        if not times:
            continue
        for b, k in (plan.per_bin or {}).items():
            got[b] = got.get(b, 0) + k * times
        for b, lack in plan.short.items():
            entry = short.setdefault(b, {"images": 0, "identities": 0})
            entry["images"] += lack * times
            entry["identities"] += times
    return {"level": "image", "column": bal.column, "fill": bal.fill, "shares": dict(bal.shares),
            "kept_per_bin_before_fill": dict(sorted(got.items())), "short": dict(sorted(short.items())),
            "met": not short}


def _balance_identities(ranked: list[str], limit: int, ident_bin: Mapping[str, str], bal: Balance
                        ) -> tuple[set[str], dict[str, Any]]:
    by_bin: dict[str, list[str]] = {}
    for ident in ranked:
        by_bin.setdefault(ident_bin[ident], []).append(ident)
    available = {b: len(v) for b, v in by_bin.items()}
    want = quotas(limit, bal.shares)
    total = balanced_total(limit, available, bal.shares, bal.fill)
    per_bin = {b: min(q, available.get(b, 0)) for b, q in quotas(total, bal.shares).items()}
    chosen = {i for b, k in per_bin.items() for i in by_bin.get(b, [])[:k]}
    if bal.fill:
        for ident in ranked:
            if len(chosen) >= total:
                break
            chosen.add(ident)
    got = {b: sum(1 for i in chosen if ident_bin[i] == b) for b in sorted({ident_bin[i] for i in chosen})}
    short = {b: {"identities": q - available.get(b, 0)} for b, q in want.items() if q > available.get(b, 0)}
    return chosen, {"level": "identity", "column": bal.column, "fill": bal.fill, "shares": dict(bal.shares),
                    "wanted": want, "kept_per_bin": got, "short": short, "met": not short}


def preference_order(rows: pa.Table, cfg: Identities) -> np.ndarray:
    """Row indices of ONE identity's candidates, best first, by ``prefer``; columns read:
    ``sample_id``, ``sel_score`` and ``sel_div`` where configured."""

    n = rows.num_rows
    ids = rows.column("sample_id").to_pylist()
    tie = units("pick:", rows.column("sample_id")).tolist()
    p = cfg.prefer
    if p.score is not None:
        scores = rows.column("sel_score").to_pylist()
        sign = -1.0 if p.order == "higher" else 1.0
        base = sorted(range(n), key=lambda i: (scores[i] is None, sign * (scores[i] or 0.0), tie[i], ids[i]))
    else:
        base = sorted(range(n), key=lambda i: (tie[i], ids[i]))
    if p.diversity is None:
        return np.asarray(base, dtype=np.int64)
    div = rows.column("sel_div")
    if pa.types.is_list(div.type) or pa.types.is_fixed_size_list(div.type) or pa.types.is_large_list(div.type):
        return _farthest_point(rows.select(["sel_div"]), base)
    values = [NO_BIN if v is None else str(v) for v in div.to_pylist()]
    seen: dict[str, int] = {}
    turn = [0] * n
    for pos in base:  # round robin: the k-th best of every bin before the (k+1)-th of any
        turn[pos] = seen.get(values[pos], 0)
        seen[values[pos]] = turn[pos] + 1
    where = {pos: k for k, pos in enumerate(base)}
    return np.asarray(sorted(range(n), key=lambda i: (turn[i], where[i])), dtype=np.int64)


def _farthest_point(vectors: pa.Table, base: list[int]) -> np.ndarray:
    """Farthest-point order (euclidean): the best image first, then each time the image farthest from
    those chosen; ties by the base order; rows without a vector last, in base order."""
    from facekit.vector_index import embedding_matrix

    x, valid = embedding_matrix(vectors, "sel_div")
    with_vec = [i for i in base if valid[i]]
    order: list[int] = []
    if with_vec:
        pts = x[with_vec].astype(np.float64)
        dist = np.full(len(with_vec), np.inf)
        taken = np.zeros(len(with_vec), dtype=bool)
        k = 0
        for _ in range(len(with_vec)):
            order.append(with_vec[k])
            taken[k] = True
            dist = np.minimum(dist, np.linalg.norm(pts - pts[k], axis=1))
            dist[taken] = -1.0
            k = int(np.argmax(dist))  # argmax takes the first maximum: the base order breaks ties
    order += [i for i in base if not valid[i]]
    return np.asarray(order, dtype=np.int64)


def pick_images(rows: pa.Table, plan: ImagePlan, cfg: Identities) -> list[str | None]:
    """Per row of ONE kept identity: None when chosen, else its rule. Walks the ``prefer`` order: a
    row is taken while its bin is under its quota (no bins: while under the total); with ``fill``
    a second walk takes the rest up to the total. Of the rows left, the last ``n - capped`` in
    ``prefer`` order are ``over_quota`` and the others ``balance``."""
    order = preference_order(rows, cfg)
    n = rows.num_rows
    taken = np.zeros(n, dtype=bool)
    if plan.per_bin is None:
        taken[order[: plan.total]] = True
    else:
        bins = [NO_BIN if v is None else str(v) for v in rows.column("sel_bal").to_pylist()]
        got: dict[str, int] = {}
        count = 0
        for i in order:
            b = bins[i]
            if got.get(b, 0) < plan.per_bin.get(b, 0):
                taken[i] = True
                got[b] = got.get(b, 0) + 1
                count += 1
        if cfg.balance is not None and cfg.balance.fill:
            for i in order:
                if count >= plan.total:
                    break
                if not taken[i]:
                    taken[i] = True
                    count += 1
    left = [int(i) for i in order if not taken[i]]
    over = n - plan.capped
    out: list[str | None] = [None] * n
    for k, i in enumerate(left):
        out[i] = OVER_QUOTA if k >= len(left) - over else BALANCE
    return out


def available_bins(rows: pa.Table) -> dict[str, int]:
    """Candidate images per balance bin of ONE identity's rows (``sel_bal``)."""
    if "sel_bal" not in rows.column_names:
        return {NO_BIN: rows.num_rows}
    vc = pc.value_counts(pc.fill_null(rows.column("sel_bal").cast(pa.string()), NO_BIN))
    return {str(v["values"]): int(v["counts"]) for v in vc.to_pylist()}
