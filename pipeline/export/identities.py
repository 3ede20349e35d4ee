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
from pipeline.export.order import unit

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


def balanced_total(upper: int, available: Mapping[str, int], shares: Mapping[str, float], fill: bool) -> int:
    """The largest total <= ``upper`` whose quotas every bin meets (``fill``: ``upper``, capped by what
    exists)."""
    if fill:
        return min(upper, sum(available.values()))
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
    n = sum(available.values())
    capped = min(n, cfg.max_images) if cfg.max_images is not None else n
    bal = cfg.balance
    if bal is None or bal.level != "image":
        return ImagePlan(capped, capped, None, {})
    want = quotas(capped, bal.shares)
    short = {b: q - available.get(b, 0) for b, q in want.items() if q > available.get(b, 0)}
    total = balanced_total(capped, available, bal.shares, bal.fill)
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


def _identity_bin(bins: Mapping[str, int]) -> str:
    """The most frequent bin of an identity's images; ties by bin name."""
    return min(bins, key=lambda b: (-bins[b], b))


def _rank_key(cfg: Identities, ident: str, n: int, score: float | None) -> tuple[Any, ...]:

    r = cfg.rank
    if r.by == "images":
        return (-n, ident)
    if r.by == "hash":
        return (unit("rank:" + ident), ident)
    if score is None:
        return (1, 0.0, ident)  # identities without a score rank last
    return (0, -score if r.order == "higher" else score, ident)


def select_identities(counts: pa.Table, cfg: ExportConfig | Identities, min_images: int | None = None
                      ) -> Selection:
    """Decide every identity from its (identity, bin) counts (``COUNTS_SCHEMA``; ``bin`` is the
    balance label or any constant without balance). Deterministic: no input order matters."""
    if isinstance(cfg, ExportConfig):
        ids_cfg, min_req = cfg.identities, cfg.min_images
    else:
        ids_cfg, min_req = cfg, min_images or cfg.min_images or 1
    per: dict[str, dict[str, int]] = {}
    score_sum: dict[str, float] = {}
    score_n: dict[str, int] = {}
    cols = {c: counts.column(c).to_pylist() for c in counts.column_names}
    n_rows = counts.num_rows
    for i in range(n_rows):
        ident, b, n = cols["identity_id"][i], cols["bin"][i] or NO_BIN, int(cols["n"][i])
        bins = per.setdefault(ident, {})
        bins[b] = bins.get(b, 0) + n
        if "score_sum" in cols and cols["score_sum"][i] is not None:
            score_sum[ident] = score_sum.get(ident, 0.0) + float(cols["score_sum"][i])
            score_n[ident] = score_n.get(ident, 0) + int(cols["score_n"][i] or 0)
    drops = dict.fromkeys(RULES, 0)
    dropped_ids = dict.fromkeys(RULES, 0)
    rule: dict[str, str | None] = {}
    selected: dict[str, int] = {}
    plans: dict[str, ImagePlan] = {}
    eligible: list[str] = []
    for ident in sorted(per):
        plan = image_plan(per[ident], ids_cfg)
        plans[ident] = plan
        if plan.total < min_req:
            rule[ident] = TOO_SMALL
            drops[TOO_SMALL] += sum(per[ident].values())
            dropped_ids[TOO_SMALL] += 1
        else:
            eligible.append(ident)

    def score_of(ident: str) -> float | None:
        return score_sum[ident] / score_n[ident] if score_n.get(ident) else None

    ranked = sorted(eligible, key=lambda i: _rank_key(ids_cfg, i, sum(per[i].values()), score_of(i)))
    limit = len(ranked) if ids_cfg.max_identities is None else min(len(ranked), ids_cfg.max_identities)
    bal = ids_cfg.balance
    ident_bin = {i: _identity_bin(per[i]) for i in per}
    balance_doc: dict[str, Any] | None = None
    if bal is not None and bal.level == "identity":
        chosen, balance_doc = _balance_identities(ranked, limit, ident_bin, bal)
    else:
        chosen = set(ranked[:limit])
    left = [i for i in ranked if i not in chosen]
    for k, ident in enumerate(left):  # the last len(ranked) - limit in rank order: max_identities alone
        why = OVER_MAX_IDENTITIES if k >= len(left) - (len(ranked) - limit) else BALANCE
        rule[ident] = why
        drops[why] += sum(per[ident].values())
        dropped_ids[why] += 1
    short_bins: dict[str, dict[str, int]] = {}
    for ident in chosen:
        plan = plans[ident]
        n = sum(per[ident].values())
        rule[ident] = None
        selected[ident] = plan.total
        drops[OVER_QUOTA] += n - plan.capped
        drops[BALANCE] += plan.capped - plan.total
        for b, lack in plan.short.items():
            entry = short_bins.setdefault(b, {"images": 0, "identities": 0})
            entry["images"] += lack
            entry["identities"] += 1
    if bal is not None and bal.level == "image":
        got: dict[str, int] = {}
        for ident in chosen:
            for b, k in (plans[ident].per_bin or {}).items():
                got[b] = got.get(b, 0) + k
        balance_doc = {"level": "image", "column": bal.column, "fill": bal.fill,
                       "shares": dict(bal.shares), "kept_per_bin_before_fill": dict(sorted(got.items())),
                       "short": dict(sorted(short_bins.items())), "met": not short_bins}
    target = ids_cfg.target_images
    short_target = sum(1 for i in chosen if target is not None and selected[i] < target)
    idents = sorted(per)
    table = pa.table({
        "identity_id": pa.array(idents, pa.string()),
        "candidates": pa.array([sum(per[i].values()) for i in idents], pa.int64()),
        "selected": pa.array([selected.get(i, 0) for i in idents], pa.int64()),
        "bin": pa.array([ident_bin[i] for i in idents], pa.string()),
        "rule": pa.array([rule[i] for i in idents], pa.string()),
    })
    return Selection(table, sum(selected.values()), len(chosen), {k: v for k, v in drops.items() if v},
                     {k: v for k, v in dropped_ids.items() if v}, balance_doc, short_target, target)


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
    tie = [unit("pick:" + s) for s in ids]
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
