"""Procedural face renderer: speed on one core, dlib HOG detection rate, identity separability.

    .venv/bin/python bench/bench_renderer.py                 # all three, default sizes
    .venv/bin/python bench/bench_renderer.py --only speed    # just images/s

Speed runs in this process pinned to one CPU with OpenCV limited to one thread (what one worker with
``cpus: 1`` gets); the best of several rounds is reported because other processes on a shared machine
only ever slow a round down. Separability uses the same data later stages see: each render has its own
perturbation (sigma 0.3 / 0.5 / 0.7) and nuisance seed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from facekit.identities.gaussian import perturb
from facekit.imaging import encode_png
from facekit.renderer.render import render_sample

SIGMAS = (0.3, 0.5, 0.7)


def unit_vectors(n: int, dim: int, seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal((n, dim))
    return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)


def bench_speed(size: int, n: int, rounds: int) -> None:
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    cv2.setNumThreads(1)
    vecs = unit_vectors(n, 512, seed=0)
    perts = [perturb(v, SIGMAS[i % 3], seed=i) for i, v in enumerate(vecs)]
    render_sample(vecs[0], perts[0], 0, size, 0.5)  # warm caches (projection matrix)
    for label, encode in (("render", False), ("render+png", True)):
        per_round = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            for i, (v, p) in enumerate(zip(vecs, perts, strict=True)):
                img, _ = render_sample(v, p, i, size, SIGMAS[i % 3])
                if encode:
                    encode_png(img)
            per_round.append(n / (time.perf_counter() - t0))
        print(f"speed  {label:<11} {size}px, 1 core: best {max(per_round):6.1f} img/s, "
              f"median {statistics.median(per_round):6.1f} img/s ({rounds} rounds x {n})")


def dlib_models() -> tuple:
    import warnings

    import dlib

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import face_recognition_models as frm
    return (dlib.get_frontal_face_detector(), dlib.shape_predictor(frm.pose_predictor_model_location()),
            dlib.face_recognition_model_v1(frm.face_recognition_model_location()))


def bench_detection(size: int, n: int, max_yaw: float) -> None:
    detector, _, _ = dlib_models()
    counts = np.zeros(n, int)
    scores = np.zeros(n)
    for i, v in enumerate(unit_vectors(n, 512, seed=11)):
        img, _ = render_sample(v, None, 1000 + i, size, 0.7, max_yaw)
        counts[i] = len(detector(img, 1))
        _, s, _ = detector.run(img, 1, -1.0)
        scores[i] = max(s) if len(s) else -1.0
    print(f"detect HOG upsample=1, {n} identities, |yaw|<={max_yaw:g}, full nuisance: exactly one face "
          f"{(counts == 1).mean():.3f}, none {(counts == 0).mean():.3f}, several {(counts > 1).mean():.3f}; "
          f"score mean {scores.mean():.2f}, p10 {np.percentile(scores, 10):.2f}")


def bench_separability(size: int, n_ids: int, per_id: int) -> None:
    detector, predictor, embedder = dlib_models()
    embs, labels, missed = [], [], 0
    for i, v in enumerate(unit_vectors(n_ids, 512, seed=21)):
        for j in range(per_id):
            sigma = SIGMAS[j % 3]
            img, _ = render_sample(v, perturb(v, sigma, seed=97 * i + j), 210_000 + 100 * i + j, size, sigma)
            faces = detector(img, 1)
            if not faces:
                missed += 1
                continue
            shape = predictor(img, max(faces, key=lambda r: r.area()))
            embs.append(np.asarray(embedder.compute_face_descriptor(img, shape)))
            labels.append(i)
    e, lab = np.asarray(embs), np.asarray(labels)
    dist = np.linalg.norm(e[:, None] - e[None], axis=-1)
    iu = np.triu_indices(len(e), 1)
    d, same = dist[iu], (lab[:, None] == lab[None])[iu]
    thresholds = np.unique(d)
    acc = [((d < t) == same).mean() for t in thresholds]
    bal = [0.5 * ((d[same] < t).mean() + (d[~same] >= t).mean()) for t in thresholds]
    k, kb = int(np.argmax(acc)), int(np.argmax(bal))
    print(f"embed  dlib ResNet-128, {n_ids} identities x {per_id} images ({missed} undetected): "
          f"intra {d[same].mean():.3f} (p95 {np.percentile(d[same], 95):.3f}), "
          f"inter {d[~same].mean():.3f} (p5 {np.percentile(d[~same], 5):.3f})")
    print(f"embed  best single threshold: pair accuracy {acc[k]:.3f} at {thresholds[k]:.3f}; "
          f"balanced accuracy {bal[kb]:.3f} at {thresholds[kb]:.3f} "
          f"({same.sum()} same-identity pairs, {(~same).sum()} different)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", choices=("speed", "detect", "embed"), default=None)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--speed-n", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--detect-n", type=int, default=200)
    ap.add_argument("--max-yaw", type=float, default=20.0)
    ap.add_argument("--ids", type=int, default=30)
    ap.add_argument("--per-id", type=int, default=6)
    args = ap.parse_args()
    if args.only in (None, "detect"):
        bench_detection(args.size, args.detect_n, args.max_yaw)
    if args.only in (None, "embed"):
        bench_separability(args.size, args.ids, args.per_id)
    if args.only in (None, "speed"):  # last: it pins this process to one CPU
        bench_speed(args.size, args.speed_n, args.rounds)


if __name__ == "__main__":
    main()
