"""End to end against what a user would write instead: the same images, the same dlib models.

Every entry flow of a run detects (dlib HOG + 68 landmarks), aligns (5 points onto the ArcFace 112
template) and embeds (dlib ResNet 128-d) the same rendered faces, entering in one of three ways:

- ``tars``: the images as WebDataset tars (``ingest`` in tar mode);
- ``folder``: the same images as loose PNG files in a folder (``ingest`` in folder mode);
- ``render``: the images rendered by the run itself (``render``), as many as the other flows hold.

Each flow is measured against the same bare loop, a ``multiprocessing.Pool(cpus)`` doing the same
work over the same input (reading the tars, reading the files, or rendering with facekit's renderer),
one Parquet file of vectors per part. The ``tars`` flow can also run ``raydata``
(``ray.data.read_webdataset`` -> ``map_batches`` with an actor class -> ``write_parquet``).

Each way runs in its own fresh Python process (imports and start-up included), the ways alternate
``--repeat`` times and the best wall time of each is reported, and the median over the repeats of the
ratio of runs made back to back (on a shared machine whose speed drifts, the steadier figure).
"steady" is the output rate between the first and the last output (after start-up and the first
shard), as a ratio to the bare loop's. Prints one JSON line per flow.

    python bench/bench_e2e.py --images 2048 --repeat 2 [--flows tars,folder,render]
        [--ways bare,facefoundry[,raydata]] [--bytes]
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


# ---------------------------------------------------------------- the images


def render_images(n: int, cache: Path) -> list[str]:
    """The quickstart's renderer, ``n`` images (8 per identity) in tars of 64: made once, then reused."""
    tars = sorted(glob.glob(str(cache / "run" / "shards" / "render" / "*.tar")))
    if len(tars) == (n + 63) // 64:
        return tars
    from pipeline.config import load_config
    from pipeline.engine.runner import Runner

    raw = {"name": "bench-e2e-images", "run": {"seed": 0, "shard_size": 64},
           "identities": {"count": n // 8, "images_per_identity": 8, "dim": 512, "max_cosine": 0.35},
           "stages": [{"stage": "render", "params": {"size": 256, "max_yaw": 20}}],
           "export": {"enabled": False}}
    cfg, stages = load_config(raw=raw)
    res = Runner(cfg, stages, str(cache / "run"), show_progress=False).run(new=True, num_cpus=os.cpu_count() or 2)
    assert res.complete, res
    return sorted(glob.glob(str(cache / "run" / "shards" / "render" / "*.tar")))


# ---------------------------------------------------------------- the work, as a user writes it


class FaceWork:
    """Detect, align and embed one decoded image with facekit's dlib backends."""

    def __init__(self) -> None:
        from facekit.backends.dlib import DlibDetector, DlibEmbedder

        self.det = DlibDetector({"upsample": 1})
        self.emb = DlibEmbedder({})

    def __call__(self, png: bytes) -> list[float] | None:
        from facekit.imaging import decode_rgb

        return self.rgb(decode_rgb(png))

    def rgb(self, rgb: Any) -> list[float] | None:
        from facekit.geometry import align_to_template, warp

        faces = self.det.detect(rgb)
        if not faces:
            return None
        fit = align_to_template(faces[0].landmarks5)
        crop = warp(rgb, fit.for_size(112), 112)
        return [float(v) for v in self.emb.embed([crop])[0]]


def _write_part(out: str, name: str, keys: list[str], vecs: list[Any]) -> tuple[float, int]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"key": keys, "embedding": vecs}), f"{out}/{name}.parquet")
    return (time.time(), len(keys))


def _bare_tars(args: tuple[list[str], str]) -> list[tuple[float, int]]:
    import webdataset as wds

    tars, out = args
    work = FaceWork()
    done = []
    for tar in tars:
        keys, vecs = [], []
        for s in wds.WebDataset([tar], shardshuffle=False, empty_check=False):
            keys.append(s["__key__"])
            vecs.append(work(s["png"]))
        done.append(_write_part(out, Path(tar).stem, keys, vecs))
    return done


def _bare_folder(args: tuple[list[str], str]) -> list[tuple[float, int]]:
    """Parts of 64 files, as the tars hold them."""
    files, out = args
    work = FaceWork()
    done = []
    for i in range(0, len(files), 64):
        part = files[i : i + 64]
        vecs = [work(Path(f).read_bytes()) for f in part]
        done.append(_write_part(out, f"part-{i:06d}", [Path(f).stem for f in part], vecs))
    return done


def _bare_render(args: tuple[list[int], str]) -> list[tuple[float, int]]:
    """Render (facekit's renderer, 256 px, the run's yaw range) and embed, 64 images per part."""
    import numpy as np

    from facekit.renderer.render import render_sample

    seeds, out = args
    work = FaceWork()
    done = []
    for i in range(0, len(seeds), 64):
        part = seeds[i : i + 64]
        vecs = []
        for seed in part:
            rng = np.random.default_rng(seed)
            ident = rng.standard_normal(512).astype(np.float32)
            img, _ = render_sample(ident, ident + 0.3 * rng.standard_normal(512).astype(np.float32), seed,
                                   size=256, max_yaw=20)
            vecs.append(work.rgb(img))
        done.append(_write_part(out, f"part-{seeds[i]:06d}", [str(s) for s in part], vecs))
    return done


BARE = {"tars": _bare_tars, "folder": _bare_folder, "render": _bare_render}


def way_bare(flow: str, inputs: list[Any], out: str, cpus: int) -> dict[str, Any]:
    import multiprocessing as mp

    with mp.get_context("spawn").Pool(cpus) as pool:
        parts = pool.map(BARE[flow], [(inputs[i::cpus] if flow == "tars" else
                                       inputs[i * len(inputs) // cpus : (i + 1) * len(inputs) // cpus], out)
                                      for i in range(cpus)])
    marks = sorted(m for p in parts for m in p)
    return {"samples": sum(k for _, k in marks), "marks": marks}


class _RayFace:
    def __init__(self) -> None:
        self.work = FaceWork()

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        vecs = [self.work(b) for b in batch["png"]]
        return {"key": list(batch["__key__"]), "embedding": vecs, "t": [time.time()] * len(vecs)}


def way_raydata(flow: str, tars: list[str], out: str, cpus: int) -> dict[str, Any]:
    if flow != "tars":
        raise SystemExit("raydata: tars flow only")
    import ray
    import ray.data

    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False, configure_logging=False,
             _temp_dir=tempfile.mkdtemp(prefix="ffray-", dir="/tmp"))
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    # Reads are I/O: without num_cpus=0 they wait for a core the two actors hold, and the run hangs.
    ds = ray.data.read_webdataset(tars, decoder=None, ray_remote_args={"num_cpus": 0})
    ds = ds.map_batches(_RayFace, concurrency=cpus, batch_size=16, num_cpus=1, batch_format="numpy")
    ds.write_parquet(out)
    ray.shutdown()
    import pyarrow.parquet as pq

    t = sorted(pq.read_table(out, columns=["t"]).column("t").to_pylist())
    marks: dict[float, int] = {}
    for v in t:
        marks[v] = marks.get(v, 0) + 1
    return {"samples": len(t), "marks": sorted(marks.items())}


def _entry(flow: str, inputs: list[Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The run's first stage for a flow, and its identities block (render only)."""
    if flow == "tars":
        return {"stage": "ingest", "params": {"tars": inputs}}, {}
    if flow == "folder":
        return {"stage": "ingest", "params": {"root": str(Path(inputs[0]).parent)}}, {}
    return ({"stage": "render", "params": {"size": 256, "max_yaw": 20}},
            {"identities": {"count": max(1, len(inputs) // 8), "images_per_identity": 8, "dim": 512,
                            "max_cosine": 0.35}})


def way_facefoundry(flow: str, inputs: list[Any], out: str, cpus: int) -> dict[str, Any]:
    import yaml

    first, extra = _entry(flow, inputs)
    cfg = {"name": "bench-e2e", "run": {"seed": 0, "shard_size": 64}, **extra,
           "stages": [first,
                      {"stage": "detect", "params": {"backend": "dlib", "options": {"upsample": 1},
                                                     "policy": "one_face_per_image"}},
                      {"stage": "align"}, {"stage": "embed"}],
           "export": {"enabled": False}}
    path = Path(out) / "bench.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", str(path), "--output", f"{out}/run",
                           "--no-progress", "--num-cpus", str(cpus)], cwd=REPO, env=env, capture_output=True,
                          text=True)
    if proc.returncode != 0:
        raise RuntimeError(proc.stdout[-3000:] + proc.stderr[-3000:])
    import pyarrow.parquet as pq

    marks = []
    for f in sorted(glob.glob(f"{out}/run/manifests/embed/*.parquet")):
        t = pq.read_table(f, columns=["processed_at"]).column("processed_at")
        marks.append((t[0].as_py().timestamp(), len(t)))
    return {"samples": sum(k for _, k in marks), "marks": sorted(marks)}


WAYS = {"bare": way_bare, "raydata": way_raydata, "facefoundry": way_facefoundry}


def _steady_rate(marks: list[tuple[float, int]]) -> float:
    """Samples per second from the first output to the last (start-up and the first output excluded)."""
    if len(marks) < 2 or marks[-1][0] <= marks[0][0]:
        return 0.0
    return sum(k for _, k in marks[1:]) / (marks[-1][0] - marks[0][0])


def _median(values: list[float]) -> float | None:
    if not values:
        return None
    v = sorted(values)
    mid = len(v) // 2
    return round(v[mid] if len(v) % 2 else (v[mid - 1] + v[mid]) / 2, 3)


def run_one(way: str, flow: str, inputs: list[Any], cpus: int) -> dict[str, Any]:
    """One way in a fresh process, so imports and start-up count as they do for a user."""
    out = tempfile.mkdtemp(prefix=f"ffe2e-{way}-")
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--child", way, "--flow", flow, "--out", out, "--cpus",
                           str(cpus), "--inputs-json", json.dumps(inputs)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{way} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    subprocess.run(["rm", "-rf", out], check=False)
    return {"wall": wall, "samples": res["samples"], "steady": _steady_rate([tuple(m) for m in res["marks"]])}


# ---------------------------------------------------------------- bytes read per shard per stage


def bytes_per_stage(tars: list[str], cpus: int) -> dict[str, Any]:
    """Bytes a stage reads from the run directory for one shard: separate actors (every upstream
    manifest the stage's columns need, verified whole, plus the pixel tar) vs a fused chain (measured
    by running the chain in this process on one shard of a finished run, counting every read through RunStorage)."""
    import shutil

    import ray

    from manifests import reader
    from manifests.storage import RunStorage
    from pipeline.config import load_config
    from pipeline.engine import execution
    from pipeline.engine.fused import FusedChain
    from pipeline.engine.runner import Runner

    counted: dict[str, int] = {"bytes": 0}
    real_cat, real_verified = RunStorage.read_bytes, reader.read_manifest_verified

    def read_bytes(self: RunStorage, *parts: str) -> bytes:
        data = real_cat(self, *parts)
        counted["bytes"] += len(data)
        return data

    def read_manifest_verified(store: RunStorage, stage_id: str, shard: str) -> Any:
        # A fragment is verified whole before use: every byte of it is read.
        counted["bytes"] += store.fs.size(store.path(*execution.manifest_path(stage_id, shard)))
        return real_verified(store, stage_id, shard)

    raw = {"name": "bench-bytes", "run": {"seed": 0, "shard_size": 64},
           "stages": [{"stage": "ingest", "params": {"tars": tars[:2]}},
                      {"stage": "detect", "params": {"backend": "dlib", "options": {"upsample": 1}}},
                      {"stage": "align"}, {"stage": "embed"}],
           "export": {"enabled": False}}
    tmp = Path(tempfile.mkdtemp(prefix="ffe2e-bytes-"))
    cfg, stages = load_config(raw=raw)
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False, configure_logging=False,
             _temp_dir=tempfile.mkdtemp(prefix="ffray-", dir="/tmp"))
    runner = Runner(cfg, stages, str(tmp / "run"), show_progress=False)
    assert runner.run().complete
    ray.shutdown()
    shard = "000000"
    RunStorage.read_bytes = read_bytes  # type: ignore[method-assign]
    reader.read_manifest_verified = read_manifest_verified
    try:
        before: dict[str, int] = {}
        for s in stages[1:]:
            counted["bytes"] = 0
            execution.load_shard_input(runner.store, runner.spec(s).upstream, shard)
            before[s.stage_id] = counted["bytes"]
        declared: dict[str, int] = {}
        uses = {"detect": set(), "align": {"landmarks5"}, "embed": set()}
        for s in stages[1:]:
            counted["bytes"] = 0
            execution.load_shard_input(runner.store, runner.spec(s).upstream, shard, columns=uses[s.stage_id])
            declared[s.stage_id] = counted["bytes"]
        shutil.copytree(tmp / "run", tmp / "fused")
        for s in stages[1:]:
            (tmp / "fused" / "manifests" / s.stage_id / f"{shard}.parquet").unlink()
        chain = FusedChain([runner.spec(s) for s in stages[1:]])
        fused: dict[str, int] = {}
        for ex in chain.prepared:
            ex.store = RunStorage(str(tmp / "fused"))
        from pipeline.engine.execution import ShardCache

        cache = ShardCache()
        for ex in chain.prepared:
            counted["bytes"] = 0
            ex.run_shard(shard, None, cache=cache)
            fused[ex.spec.stage_id] = counted["bytes"]
    finally:
        RunStorage.read_bytes = real_cat  # type: ignore[method-assign]
        reader.read_manifest_verified = real_verified
    return {"shard_samples": 64, "separate_actors": before, "separate_with_declared_reads": declared,
            "fused_chain": fused}


# ---------------------------------------------------------------- main


def folder_images(tars: list[str], cache: Path) -> list[str]:
    """The tars' PNGs as loose files in one folder: made once, then reused."""
    import webdataset as wds

    folder = cache / "folder"
    files = sorted(glob.glob(str(folder / "*.png")))
    if files:
        return files
    folder.mkdir(parents=True, exist_ok=True)
    for tar in tars:
        for s in wds.WebDataset([tar], shardshuffle=False, empty_check=False):
            (folder / f"{s['__key__']}.png").write_bytes(s["png"])
    return sorted(glob.glob(str(folder / "*.png")))


def measure_flow(flow: str, inputs: list[Any], ways: list[str], repeat: int, cpus: int, images: int
                 ) -> dict[str, Any]:
    """Each way of one flow ``repeat`` times, alternating their order; the summary line of the flow."""
    runs: dict[str, list[dict[str, Any]]] = {w: [] for w in ways}
    for rep in range(repeat):
        for w in ways if rep % 2 == 0 else list(reversed(ways)):
            r = run_one(w, flow, inputs, cpus)
            runs[w].append(r)
            print(f"[e2e] {flow:6s} {w:12s} run {rep + 1}: {r['wall']:7.1f} s  steady {r['steady']:6.2f} img/s",
                  flush=True)
    best = {w: min(rs, key=lambda r: r["wall"]) for w, rs in runs.items() if rs}
    steady = {w: max(r["steady"] for r in rs) for w, rs in runs.items() if rs}
    summary: dict[str, Any] = {"flow": flow, "images": images, "cpus": cpus, "repeat": repeat,
                               "wall_s": {w: round(b["wall"], 2) for w, b in best.items()},
                               "steady_img_s": {w: round(v, 3) for w, v in steady.items()}}
    if "bare" in best:
        summary["end_to_end_vs_bare"] = {w: round(best["bare"]["wall"] / b["wall"], 3) for w, b in best.items()}
        summary["steady_vs_bare"] = {w: round(v / steady["bare"], 3) if steady["bare"] else None
                                     for w, v in steady.items()}
        # Each repeat's ways ran back to back: their ratio holds when the machine's speed drifts between
        # repeats, which best-of does not (a fast minute for one way and a slow one for the other).
        summary["paired_end_to_end_vs_bare"] = {
            w: _median([runs["bare"][i]["wall"] / runs[w][i]["wall"] for i in range(repeat)]) for w in ways}
        summary["paired_steady_vs_bare"] = {
            w: _median([runs[w][i]["steady"] / runs["bare"][i]["steady"] for i in range(repeat)
                        if runs["bare"][i]["steady"]]) for w in ways}
    return summary


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=2048)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--cpus", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--flows", default="tars,folder,render")
    ap.add_argument("--ways", default="bare,facefoundry", help="raydata too: tars flow only")
    ap.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "ffe2e-images"))
    ap.add_argument("--bytes", action="store_true", help="also measure bytes read per shard per stage")
    ap.add_argument("--child")
    ap.add_argument("--flow", default="tars")
    ap.add_argument("--out")
    ap.add_argument("--inputs-json")
    a = ap.parse_args()
    if a.child:
        res = WAYS[a.child](a.flow, json.loads(a.inputs_json), a.out, a.cpus)
        print(json.dumps(res))
        return
    cache = Path(a.cache) / str(a.images)
    tars = render_images(a.images, cache)
    inputs: dict[str, list[Any]] = {"tars": tars, "folder": folder_images(tars, cache),
                                    "render": list(range(a.images))}
    for flow in a.flows.split(","):
        ways = [w for w in a.ways.split(",") if w != "raydata" or flow == "tars"]
        summary = measure_flow(flow, inputs[flow], ways, a.repeat, a.cpus, a.images)
        if a.bytes and flow == "tars":
            summary["bytes_read_per_shard"] = bytes_per_stage(tars, a.cpus)
        print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
