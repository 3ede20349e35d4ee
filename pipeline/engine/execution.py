"""What a worker does with one shard of one stage: assemble the input, process it batch by batch with
per-sample error isolation, write the outputs and commit. Plain Python, so it runs the same inside a
Ray actor, a Ray task or a test."""

from __future__ import annotations

import os
import socket
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from facekit.imaging import PixelBudget, remembering
from manifests import layout
from manifests.commit import (
    CorruptFragmentError,
    TarRecord,
    check_tar,
    encode_manifest,
    tar_record,
    verify_fragment,
)
from manifests.ranges import ByteRange, fetch_ranges, is_source_tar
from manifests.reader import ShardReader, own_or_parent_rows, shard_rows
from manifests.schema import CARRIED, manifest_schema, member_ext
from manifests.shards import UnsafeMemberError, check_key, write_tar
from manifests.storage import RunStorage
from manifests.vocabulary import IMAGE_SOURCE, OUTPUT_SHARD, TAR_CRC32, TAR_OFFSET, TAR_SIZE
from pipeline.engine.faults import UpstreamNotCommittedError, is_transient
from stages.base import (
    DETAIL,
    IDENTITY_ID,
    IMAGE,
    IMAGE_EXT,
    KEEP,
    KEY,
    PARENT_ID,
    REASON,
    SAMPLE_ID,
    STATUS,
    STATUS_ERROR,
    STATUS_OK,
    Batch,
    Params,
    SourceStage,
    Stage,
    StageContext,
    TransientError,
)

# Decoded pixels one shard's images may keep while a fused chain runs (the rest are decoded again).
DECODED_BUDGET = int(float(os.environ.get("FACEFOUNDRY_DECODED_BUDGET_MB", "256")) * (1 << 20))
WORKER_CRASH = "worker_crash"  # the reason of a sample quarantined because processing it kills the worker


@dataclass(frozen=True)
class UpstreamInfo:
    stage_id: str
    writes_pixels: bool
    prune: bool
    columns: tuple[str, ...] = ()  # the stage's own manifest columns; empty: not known, look in the file
    members: tuple[str, ...] = ()  # those of them that are pixel members (bytes in the stage's shard tar)


@dataclass(frozen=True)
class StageSpec:
    """Everything a worker needs to run one stage; small and picklable."""

    stage_id: str
    cls: type[Stage[Any]]
    params: Params
    batch_size: int
    fingerprint: str
    params_hash: str
    upstream: tuple[UpstreamInfo, ...]
    context: StageContext

    def build(self) -> Stage[Any]:
        return self.cls(self.params, self.context)


@dataclass(kw_only=True)
class Outcomes:
    """Samples kept, dropped and failed, and how many for each reason: what one shard's run counts and
    what a stage's progress sums over its shards."""

    kept: int = 0
    dropped: int = 0
    errors: int = 0
    reasons: Counter[str] = field(default_factory=Counter)

    def tally(self, other: Outcomes) -> None:
        self.kept += other.kept
        self.dropped += other.dropped
        self.errors += other.errors
        self.reasons.update(other.reasons)

    def clear(self) -> None:
        self.kept = self.dropped = self.errors = 0
        self.reasons.clear()


@dataclass
class ShardResult(Outcomes):
    stage_id: str
    shard: str
    rows_in: int = 0
    rows_out: int = 0
    seconds: float = 0.0
    worker: str = ""


manifest_path = layout.manifest_path
shard_tar_path = layout.shard_path


def is_committed(store: RunStorage, stage_id: str, shard: str) -> bool:
    """Committed means verified (size, footer, the tar's size), not merely present: manifests/commit.py."""
    try:
        verify_fragment(store, stage_id, shard)
    except (FileNotFoundError, CorruptFragmentError):
        return False
    return True


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


# ---------------------------------------------------------------- input assembly


def read_manifest(store: RunStorage, stage_id: str, shard: str, columns: set[str] | None = None) -> pa.Table:
    """One verified manifest fragment; with ``columns``, only those of them it has."""
    return ShardReader(store, shard, lost=UpstreamNotCommittedError).fragment(stage_id, columns)


@dataclass
class ShardCache:
    """What a fused chain keeps in memory for one shard: the manifests its stages just built and the
    images of its pixel-writing stage, so the next stage of the chain reads neither from storage."""

    tables: dict[str, pa.Table] = field(default_factory=dict)
    images: dict[str, dict[str, tuple[bytes, str]]] = field(default_factory=dict)
    # Decoded pixels the chain's images may keep between its stages (facekit.imaging.EncodedImage).
    pixels: PixelBudget = field(default_factory=lambda: PixelBudget(DECODED_BUDGET))
    # stage id -> pixel-member column -> sample id -> bytes
    members: dict[str, dict[str, dict[str, bytes]]] = field(default_factory=dict)


def member_columns(stage: Stage[Any]) -> dict[str, str]:
    """A stage's pixel-member columns and their tar extensions."""
    return {f.name: ext for f in stage.output_fields() if (ext := member_ext(f)) is not None}


def load_shard_input(store: RunStorage, upstream: tuple[UpstreamInfo, ...], shard: str,
                     with_images: bool = True, columns: set[str] | None = None,
                     cache: ShardCache | None = None) -> tuple[Batch, str | None]:
    """Rebuild the batch a stage sees for one shard from committed upstream outputs.

    The rows and columns are ``manifests.reader.shard_rows`` (live samples, each upstream stage's own
    columns by the own-or-parent rule); pixel members and images come from the shard tars, checked
    whole against what their stage committed. With ``columns`` only those upstream columns are used
    (plus what liveness, the join and the images need), and upstream fragments that declare none of
    them are not opened. With ``cache``, what a fused chain already holds in memory for this shard is
    used instead of storage.
    """
    cache = cache if cache is not None else ShardCache()
    pix = next((u for u in reversed(upstream) if u.writes_pixels), None) if with_images else None
    if with_images and pix is None:
        raise RuntimeError("no upstream stage writes pixels")
    reader = ShardReader(store, shard, lost=UpstreamNotCommittedError, held=cache.tables)
    rows = shard_rows(reader, upstream, columns)
    members = {c: u for u in upstream for c in u.members if c in rows.column_names}
    batch: Batch = {c: rows.column(c).to_pylist() for c in rows.column_names if c not in members}
    tars: dict[str, bytes] = {}
    for c, u in members.items():
        batch[c] = _member_bytes(reader, cache, u.stage_id, c, rows, tars)
    if pix is None:
        return batch, None
    batch[IMAGE], batch[IMAGE_EXT] = _images(reader, cache, pix.stage_id, rows, tars)
    return batch, _input_shard(reader, pix.stage_id)


def _input_shard(reader: ShardReader, stage_id: str) -> str:
    """The tar a stage's input images come from: the pixel stage's shard tar, or the source tar its
    images lie in when it referenced them there."""
    shards = pc.drop_null(reader.fragment(stage_id, [OUTPUT_SHARD])[OUTPUT_SHARD])
    first = shards[0].as_py() if len(shards) else None
    if first and is_source_tar(first):
        return str(first)
    return "/".join(shard_tar_path(stage_id, reader.shard))


def _member_bytes(reader: ShardReader, cache: ShardCache, stage_id: str, column: str, rows: pa.Table,
                  tars: dict[str, bytes]) -> list[bytes | None]:
    """A pixel-member column's bytes for each row: a byte range of the stage's shard tar (read once and
    checked whole), or what a fused chain holds."""
    tab = reader.fragment(stage_id, [SAMPLE_ID, column])
    at = own_or_parent_rows(rows[SAMPLE_ID], rows[PARENT_ID], tab[SAMPLE_ID]).to_pylist()
    held = cache.members.get(stage_id)
    if held is not None:
        ids = tab.column(SAMPLE_ID).to_pylist()
        return [held.get(column, {}).get(ids[r]) if r is not None else None for r in at]
    where = tab.column(column).to_pylist()
    if stage_id not in tars and any(where[r] for r in at if r is not None):
        tars[stage_id] = _read_tar(reader, stage_id)
    data = tars.get(stage_id, b"")
    return [data[w["offset"] : w["offset"] + w["size"]] if (r is not None and (w := where[r])) else None for r in at]


def _images(reader: ShardReader, cache: ShardCache, stage_id: str, rows: pa.Table,
            tars: dict[str, bytes]) -> tuple[list[Any], list[str | None]]:
    """Each row's image (own or its parent's) from the latest pixel-writing stage: sliced from its shard
    tar at the offsets the manifest records (no tar parsing), fetched by byte range from the source tar
    it lies in (each slice checked against its CRC-32), or what a fused chain holds."""
    if stage_id not in cache.images:
        tab = reader.fragment(stage_id, [SAMPLE_ID, TAR_OFFSET, TAR_SIZE, TAR_CRC32, IMAGE_EXT, OUTPUT_SHARD])
        tab = tab.filter(pc.is_valid(tab[TAR_OFFSET]))
        sids, offs, sizes, crcs, exts, shards = (tab.column(c).to_pylist() for c in (
            SAMPLE_ID, TAR_OFFSET, TAR_SIZE, TAR_CRC32, IMAGE_EXT, OUTPUT_SHARD))
        sourced = [i for i, tar in enumerate(shards) if tar and is_source_tar(tar)]
        fetched = dict(zip(sourced, fetch_ranges(reader.store, [
            ByteRange(shards[i], offs[i], sizes[i], crcs[i]) for i in sourced]), strict=True))
        data = b""
        if len(sourced) < tab.num_rows:
            data = tars.get(stage_id) or _read_tar(reader, stage_id)
        view = memoryview(data)
        cache.images[stage_id] = {
            sid: (remembering(fetched[i] if i in fetched else view[offs[i] : offs[i] + sizes[i]], cache.pixels), ext)
            for i, (sid, ext) in enumerate(zip(sids, exts, strict=True))}
    found = cache.images[stage_id]
    at = own_or_parent_rows(rows[SAMPLE_ID], rows[PARENT_ID], list(found)).to_pylist()
    hits = list(found.values())
    return ([hits[r][0] if r is not None else None for r in at],
            [hits[r][1] if r is not None else None for r in at])


def _read_tar(reader: ShardReader, stage_id: str) -> bytes:
    """The shard tar, checked against the size and checksum its stage committed: a truncated tar must
    never yield empty images. A mismatch uncommits the stage's fragment so that the shard is recomputed."""
    record = reader.tar(stage_id)
    rel = "/".join(shard_tar_path(stage_id, reader.shard))
    if record is None:
        raise reader.lose(stage_id, f"{'/'.join(manifest_path(stage_id, reader.shard))} records no shard tar")
    try:
        data = reader.store.read_bytes(rel)
        check_tar(data, record)
    except FileNotFoundError:
        raise reader.lose(stage_id, f"shard tar {rel} missing") from None
    except CorruptFragmentError as exc:
        raise reader.lose(stage_id, str(exc)) from None
    return data


def cache_for_next_stage(cache: ShardCache, stage: Stage[Any], stage_id: str, table: pa.Table, out: Batch,
                         wrote_tar: bool, members: dict[str, list[bytes | None]] | None = None) -> None:
    """Keep a stage's output for the next stage of a fused chain: exactly what that stage would read
    back from storage (the manifest as built; the images and pixel members the tar holds)."""
    cache.tables[stage_id] = table
    if stage.writes_pixels:
        # The chain's pixel source moves on: images of earlier stages are never read again.
        for old in list(cache.images):
            del cache.images[old]
    if members:
        sids = out[SAMPLE_ID]
        cache.members[stage_id] = {c: {sids[i]: v for i, v in enumerate(vals) if v is not None}
                                   for c, vals in members.items()}
    if not stage.writes_pixels:
        return
    n = len(out[SAMPLE_ID])
    images = out.get(IMAGE, [None] * n)
    if wrote_tar:
        offsets = table.column(TAR_OFFSET).to_pylist()
        exts = table.column(IMAGE_EXT).to_pylist()
        cache.images[stage_id] = {out[SAMPLE_ID][i]: (remembering(images[i], cache.pixels), exts[i])
                                  for i in range(n) if offsets[i] is not None}
    else:
        exts = out.get(IMAGE_EXT, [None] * n)
        cache.images[stage_id] = {out[SAMPLE_ID][i]: (remembering(images[i], cache.pixels), exts[i]) for i in range(n)
                                  if out[STATUS][i] == STATUS_OK and images[i] is not None and exts[i]}


def split_quarantined(batch: Batch, poison: set[str], detail: str) -> tuple[Batch, Batch | None]:
    """Take the quarantined samples out of a batch; they get a ``worker_crash`` error row instead."""
    sids = batch[SAMPLE_ID]
    bad = [i for i, s in enumerate(sids) if s in poison]
    if not bad:
        return batch, None
    good = [i for i, s in enumerate(sids) if s not in poison]
    rest = {k: [v[i] for i in good] for k, v in batch.items()}
    sub = {k: [v[i] for i in bad] for k, v in batch.items()}
    k = len(bad)
    rows = {SAMPLE_ID: list(sub[SAMPLE_ID]), STATUS: [STATUS_ERROR] * k, KEEP: [False] * k,
            REASON: [WORKER_CRASH] * k, DETAIL: [detail[:1000]] * k}
    return rest, complete_rows(sub, rows)


def subset(batch: Batch, sample_ids: set[str]) -> Batch:
    idx = [i for i, s in enumerate(batch[SAMPLE_ID]) if s in sample_ids]
    return {k: [v[i] for i in idx] for k, v in batch.items()}


# ---------------------------------------------------------------- processing


def _error_rows(batch: Batch, detail: str) -> Batch:
    """Rows for samples whose ``process`` call raised: rule ``stage_error``, the exception as detail."""
    n = len(batch[SAMPLE_ID])
    return {SAMPLE_ID: list(batch[SAMPLE_ID]), STATUS: [STATUS_ERROR] * n, KEEP: [False] * n,
            REASON: ["stage_error"] * n, DETAIL: [detail] * n}


def _slice(batch: Batch, start: int, stop: int) -> Batch:
    return {k: v[start:stop] for k, v in batch.items()}


def _concat(parts: list[Batch]) -> Batch:
    keys: list[str] = []
    for p in parts:
        keys.extend(k for k in p if k not in keys)
    out: Batch = {k: [] for k in keys}
    for p in parts:
        n = len(p[SAMPLE_ID])
        for k in keys:
            out[k].extend(p.get(k, [None] * n))
    return out


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}"[:500] if text else type(exc).__name__


def process_isolated(stage: Stage[Any], batch: Batch) -> Batch:
    """Run ``process``; if a batch fails, retry sample by sample so one bad sample costs one row.

    A transient failure (``TransientError``, a storage 5xx or timeout: ``faults.is_transient``) says
    nothing about the samples: it propagates out of ``run_shard`` and the scheduler retries the shard,
    instead of being committed as error rows that resume would never revisit."""
    try:
        out = stage.process(batch)
    except TransientError:
        raise  # says nothing about these samples: the engine retries the shard
    except Exception as exc:
        if is_transient(exc):
            raise
        n = len(batch[SAMPLE_ID])
        if n == 1:
            return _error_rows(batch, _describe(exc))
        return _concat([process_isolated(stage, _slice(batch, i, i + 1)) for i in range(n)])
    return complete_rows(batch, out)


def complete_rows(batch: Batch, out: Batch) -> Batch:
    """Fill decision defaults, carry sample columns, and add an error row for any sample the stage
    returned nothing for: samples never vanish."""
    n = len(out.get(SAMPLE_ID, []))
    for col, default in ((STATUS, STATUS_OK), (KEEP, True), (REASON, None)):
        out.setdefault(col, [default] * n)
    index = {sid: i for i, sid in enumerate(batch[SAMPLE_ID])}
    carried: dict[str, list[Any]] = {c: [] for c in CARRIED if c != SAMPLE_ID}
    for j, sid in enumerate(out[SAMPLE_ID]):
        parent = out.get(PARENT_ID, [None] * n)[j]
        src = index.get(sid, index.get(parent) if parent else None)
        for c in carried:
            mine = out.get(c)
            value = mine[j] if mine is not None and mine[j] is not None else None
            if value is None and src is not None and not (c == PARENT_ID and sid not in index):
                value = batch[c][src]
            carried[c].append(value)
    out.update(carried)
    seen = set(out[SAMPLE_ID]) | {p for p in out[PARENT_ID] if p}
    missing = [i for i, sid in enumerate(batch[SAMPLE_ID]) if sid not in seen]
    if missing:
        lost = {c: [batch[c][i] for i in missing] for c in CARRIED}
        lost.update({STATUS: [STATUS_ERROR] * len(missing), KEEP: [False] * len(missing),
                     REASON: ["no_row_returned"] * len(missing),
                     DETAIL: ["the stage returned no row for this sample"] * len(missing)})
        out = _concat([out, lost])
    return out


# ---------------------------------------------------------------- commit


def build_manifest(spec: StageSpec, stage: Stage[Any], shard: str, out: Batch, input_shard: str | None,
                   output_shard: str | None, locations: dict[str, Any], worker: str,
                   durations: list[float]) -> pa.Table:
    fields = stage.output_fields()
    schema = manifest_schema(fields)
    n = len(out[SAMPLE_ID])
    info = stage.model_info()
    now = datetime.now(UTC)
    keys = out.get(KEY, [None] * n)
    images = out.get(IMAGE, [None] * n)
    sources = out.get(IMAGE_SOURCE, [None] * n)
    exts = out.get(IMAGE_EXT, [None] * n) if output_shard or any(sources) else [None] * n
    shards: list[str | None] = []
    offsets, sizes, crcs = [], [], []
    for i in range(n):
        has_image = images[i] is not None and out[STATUS][i] == STATUS_OK
        src = sources[i] if has_image else None
        loc = locations.get(keys[i] or "", {}).get(exts[i] or "png") if has_image and output_shard and not src else None
        where = ByteRange(src["tar"], src["offset"], src["size"], src["crc32"]) if src else loc
        shards.append((src["tar"] if src else output_shard) if where else None)
        offsets.append(where.offset if where else None)
        sizes.append(where.size if where else None)
        crcs.append(where.crc32 if where else None)
    data: dict[str, list[Any]] = {
        SAMPLE_ID: out[SAMPLE_ID],
        KEY: keys,
        IDENTITY_ID: out.get(IDENTITY_ID, [None] * n),
        PARENT_ID: out.get(PARENT_ID, [None] * n),
        "stage": [spec.stage_id] * n,
        "stage_name": [stage.name] * n,
        "stage_version": [stage.version] * n,
        "shard": [shard] * n,
        STATUS: out[STATUS],
        KEEP: [bool(k) for k in out[KEEP]],
        REASON: out[REASON],
        DETAIL: out.get(DETAIL, [None] * n),
        "model_name": [info.name or None] * n,
        "model_revision": [info.revision or None] * n,
        "params_hash": [spec.params_hash] * n,
        "fingerprint": [spec.fingerprint] * n,
        "input_shard": [input_shard] * n,
        OUTPUT_SHARD: shards,
        IMAGE_EXT: [e if o is not None else None for e, o in zip(exts, offsets, strict=True)],
        TAR_OFFSET: offsets,
        TAR_SIZE: sizes,
        TAR_CRC32: crcs,
        "worker": [worker] * n,
        "processed_at": [now] * n,
        "duration_ms": durations if len(durations) == n else [None] * n,
    }
    for f in fields:
        # Error rows keep whatever the stage could say (the failing file's path, an MLLM's raw answer).
        data[f.name] = list(out.get(f.name, [None] * n))
    try:
        return pa.Table.from_pydict(data, schema=schema)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise TypeError(f"stage {spec.stage_id!r} returned columns that do not match its schema: {exc}") from exc


def take_members(out: Batch, members: dict[str, str]) -> dict[str, list[bytes | None]]:
    """Pull a stage's pixel-member bytes out of its output rows: the tar gets the bytes, the manifest
    their location (filled in by ``write_pixels``), never the pixels."""
    n = len(out[SAMPLE_ID])
    taken: dict[str, list[bytes | None]] = {}
    for c in members:
        values = out.get(c, [None] * n)
        kept: list[bytes | None] = []
        for i, v in enumerate(values):
            if v is not None and not isinstance(v, bytes | bytearray | memoryview):
                raise TypeError(f"pixel member column {c!r} holds {type(v).__name__}, not encoded image bytes")
            kept.append(bytes(v) if v is not None and out[STATUS][i] == STATUS_OK else None)
        taken[c] = kept
        out[c] = [None] * n
    return taken


def write_pixels(store: RunStorage, spec: StageSpec, shard: str, out: Batch,
                 members: dict[str, list[bytes | None]] | None = None,
                 member_exts: dict[str, str] | None = None) -> tuple[str | None, dict[str, Any], TarRecord | None]:
    """Write the shard tar for rows that carry pixels (the image, and any pixel members as
    ``<key>.<column>.<ext>``); a bad key turns that row into an error. An image that already lies in a
    source tar (``IMAGE_SOURCE``) is not written: its manifest row records that range. Returns the
    tar's path, member locations and its size + checksum, which the manifest commits (no tar: None,
    when every image lies in a source tar); member columns of ``out`` get their location."""
    n = len(out[SAMPLE_ID])
    sources = out.get(IMAGE_SOURCE, [None] * n)
    images = [None if src else image for image, src in zip(out.get(IMAGE, [None] * n), sources, strict=True)]
    exts = out.get(IMAGE_EXT, [None] * n)
    members = members or {}
    member_exts = member_exts or {}
    samples = []
    for i in range(n):
        extra = {f"{c}.{member_exts[c]}": vals[i] for c, vals in members.items() if vals[i] is not None}
        if out[STATUS][i] != STATUS_OK or (images[i] is None and not extra):
            continue
        try:
            key = check_key(out[KEY][i])
        except (UnsafeMemberError, TypeError) as exc:
            out[STATUS][i], out[KEEP][i], out[REASON][i] = STATUS_ERROR, False, "unsafe_key"
            out.setdefault(DETAIL, [None] * n)[i] = str(exc)
            for vals in members.values():
                vals[i] = None
            continue
        meta = {SAMPLE_ID: out[SAMPLE_ID][i], IDENTITY_ID: out[IDENTITY_ID][i],
                PARENT_ID: out[PARENT_ID][i], "stage": spec.stage_id}
        record: dict[str, Any] = {"__key__": key, "json": meta, **extra}
        if images[i] is not None:
            record[exts[i] or "png"] = images[i]
        samples.append(record)
    if not samples and any(sources):
        return None, {}, None
    data, index = write_tar(samples)
    rel = "/".join(shard_tar_path(spec.stage_id, shard))
    for c, vals in members.items():
        column = out[c]
        for i, v in enumerate(vals):
            if v is not None:
                loc = index[out[KEY][i]][f"{c}.{member_exts[c]}"]
                column[i] = {"tar": rel, "offset": loc.offset, "size": loc.size, "crc32": loc.crc32}
    store.write_atomic(data, rel)
    return rel, index, tar_record(rel, data)


def commit_manifest(store: RunStorage, spec: StageSpec, shard: str, table: pa.Table,
                    tar: TarRecord | None = None) -> None:
    """The commit: the fragment, written last, carrying the checksum of its own data pages and of the
    shard tar written before it (manifests/commit.py)."""
    store.write_atomic(encode_manifest(table, tar), *manifest_path(spec.stage_id, shard))


def summarise(spec: StageSpec, shard: str, rows_in: int, out: Batch, seconds: float, worker: str) -> ShardResult:
    res = ShardResult(spec.stage_id, shard, rows_in=rows_in, rows_out=len(out[SAMPLE_ID]),
                      seconds=seconds, worker=worker)
    for st, kp, rs in zip(out[STATUS], out[KEEP], out[REASON], strict=True):
        if st != STATUS_OK:
            res.errors += 1
            res.reasons[f"error: {rs}"[:120]] += 1
        elif kp:
            res.kept += 1
        else:
            res.dropped += 1
            res.reasons[str(rs)[:120]] += 1
    return res


class PreparedStage:
    """One stage built and set up once, running shards one at a time: read the input, process, write,
    commit. Lives inside a Ray actor, as part of a ``fused.FusedChain``."""

    def __init__(self, spec: StageSpec) -> None:
        self.spec = spec
        self.store = RunStorage(spec.context.run_dir, spec.context.storage_options)
        self.stage = spec.build()
        self.stage.setup()
        self.worker = worker_name()

    def run_shard(self, shard: str, source_spec: dict[str, Any] | None = None, *, cache: ShardCache | None = None,
                  quarantine: tuple[str, ...] = (), quarantine_detail: str = "", only: tuple[str, ...] | None = None,
                  commit: bool = True) -> ShardResult:
        """Compute and commit one shard. In a fused chain ``cache`` carries the previous stages' outputs;
        ``quarantine`` names samples that kill the worker (they get an error row and are not processed);
        ``only`` with ``commit=False`` is a probe: run these samples, write nothing."""
        t0 = time.perf_counter()
        spec, stage = self.spec, self.stage
        durations: list[float] = []
        if isinstance(stage, SourceStage):
            assert source_spec is not None
            no_input: Batch = {c: [] for c in CARRIED}
            parts = [complete_rows(no_input, part) for part in stage.read(source_spec) if part.get(SAMPLE_ID)]
            out = _concat(parts) if parts else {c: [] for c in (*CARRIED, STATUS, KEEP, REASON)}
            rows_in, input_shard = len(out[SAMPLE_ID]), None
            per = (time.perf_counter() - t0) * 1000 / max(rows_in, 1)
            durations = [per] * rows_in
        else:
            batch, input_shard = load_shard_input(self.store, spec.upstream, shard,
                                                  columns=stage.projected_columns(), cache=cache)
            if only is not None:
                batch = subset(batch, set(only))
            rows_in = len(batch[SAMPLE_ID])
            held: Batch | None = None
            if quarantine:
                batch, held = split_quarantined(batch, set(quarantine), quarantine_detail)
            parts = []
            for start in range(0, len(batch[SAMPLE_ID]), spec.batch_size):
                chunk = _slice(batch, start, start + spec.batch_size)
                t1 = time.perf_counter()
                part = process_isolated(stage, chunk)
                per = (time.perf_counter() - t1) * 1000 / max(len(part[SAMPLE_ID]), 1)
                durations.extend([per] * len(part[SAMPLE_ID]))
                parts.append(part)
            if held is not None:
                parts.append(held)
                durations.extend([0.0] * len(held[SAMPLE_ID]))
            out = _concat(parts) if parts else complete_rows(batch, {SAMPLE_ID: []})
        output_shard: str | None = None
        locations: dict[str, Any] = {}
        tar: TarRecord | None = None
        member_exts = member_columns(stage)
        members = take_members(out, member_exts) if member_exts else {}
        if (stage.writes_pixels or members) and commit:
            output_shard, locations, tar = write_pixels(self.store, spec, shard, out, members, member_exts)
        table = build_manifest(spec, stage, shard, out, input_shard, output_shard, locations, self.worker, durations)
        if commit:
            commit_manifest(self.store, spec, shard, table, tar)
        if cache is not None:
            cache_for_next_stage(cache, stage, spec.stage_id, table, out, wrote_tar=commit, members=members)
        return summarise(spec, shard, rows_in, out, time.perf_counter() - t0, self.worker)
