"""Offline face models side by side: YuNet + SFace (OpenCV Zoo, onnxruntime) vs dlib HOG + ResNet.

1. speed: faces per second per core of detect -> align -> embed on the same images (renders and the
   photos that ship offline: insightface's t1.jpg and Tom_Hanks, scikit-image's astronaut), one thread
   each (onnxruntime intra-op 1; dlib is single-threaded), interleaved rounds, best round kept. "Per
   core" is faces per CPU-second of this single-threaded process (time.process_time), which stays
   meaningful on a shared machine; wall-clock figures are printed beside it.
2. hard faces: faces found by YuNet at 640 px vs HOG (upsample 1, images reduced to 1024 px) on what
   HOG misses: the group photo downscaled (small faces), rotated (in-plane roll), scikit-image's
   cameraman (a turned head), and renders turned up to 60 degrees.
3. renders: detection rate, 1-NN identity accuracy, and average-linkage grouping purity / inverse
   purity at the threshold fitted at FAR 1e-3 on the renders' own labelled pairs.
4. photos: t1.jpg's six people plus mirrored / 0.5x / JPEG-40 / 10-degree-rotated copies: the worst
   same-person and the best different-person score, in each space's own metric.

Prints one JSON line.

    python bench/bench_face_models.py [--identities 16] [--per-identity 5] [--rounds 2]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import cv2
import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from facekit.backends.dlib import DlibDetector, DlibEmbedder
from facekit.backends.opencv_zoo import SFaceEmbedder, YuNetDetector
from facekit.geometry import align_to_template, warp
from facekit.identities.gaussian import perturb, sample_gaussian_identities
from facekit.renderer.render import render_sample
from facekit.thresholds import Metric, fit_at_far, pair_scores_from_labels


def _rgb(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def offline_photos() -> dict[str, np.ndarray]:
    import insightface
    from skimage import data as skdata

    root = Path(insightface.__file__).parent / "data" / "images"
    out = {p.stem: _rgb(p) for p in sorted(root.iterdir()) if p.suffix.lower() in (".jpg", ".png")}
    out["astronaut"] = np.asarray(skdata.astronaut())
    out["cameraman"] = cv2.cvtColor(np.asarray(skdata.camera()), cv2.COLOR_GRAY2RGB)
    return out


def renders(identities: int, per: int, max_yaw: float = 20.0, seed: int = 0) -> tuple[list[np.ndarray], np.ndarray]:
    ids = sample_gaussian_identities(identities, 512, 0.35, seed).vectors
    images, labels = [], []
    sigmas = (0.3, 0.5, 0.7)
    for i, vec in enumerate(ids):
        for k in range(per):
            s = sigmas[k % 3]
            img, _ = render_sample(vec, perturb(vec, s, 1000 * i + k), 7919 * i + k, 256, s, max_yaw)
            images.append(img)
            labels.append(i)
    return images, np.asarray(labels)


def rotate(rgb: np.ndarray, degrees: float) -> np.ndarray:
    h, w = rgb.shape[:2]
    m = cv2.getRotationMatrix2D((w / 2, h / 2), degrees, 1.0)
    return cv2.warpAffine(rgb, m, (w, h), borderMode=cv2.BORDER_REPLICATE)


def scaled(rgb: np.ndarray, f: float) -> np.ndarray:
    return cv2.resize(rgb, None, fx=f, fy=f, interpolation=cv2.INTER_AREA)


def jpeg(rgb: np.ndarray, q: int) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=q)
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))


def pipeline_pass(det: object, emb: object, images: list[np.ndarray]) -> tuple[int, float, float, float]:
    """(faces, detect CPU s, align+embed CPU s, wall s) over ``images``: every face found is embedded."""
    w0, t0 = time.perf_counter(), time.process_time()
    found = [det.detect(img) for img in images]  # type: ignore[attr-defined]
    t1 = time.process_time()
    crops = [warp(img, align_to_template(f.landmarks5).matrix, 112) for img, faces in zip(images, found, strict=True)
             for f in faces]
    if crops:
        emb.embed(crops)  # type: ignore[attr-defined]
    t2 = time.process_time()
    return len(crops), t1 - t0, t2 - t1, time.perf_counter() - w0


def speed(models: dict[str, tuple[object, object]], images: list[np.ndarray], rounds: int) -> dict[str, object]:
    best: dict[str, tuple[int, float, float, float]] = {}
    for _ in range(rounds):
        for name, (det, emb) in models.items():
            faces, td, te, wall = pipeline_pass(det, emb, images)
            if name not in best or td + te < best[name][1] + best[name][2]:
                best[name] = (faces, td, te, wall)
    out: dict[str, object] = {}
    for name, (faces, td, te, wall) in best.items():
        out[name] = {"images": len(images), "faces": faces, "detect_ms_per_image": round(1000 * td / len(images), 1),
                     "embed_ms_per_face": round(1000 * te / max(faces, 1), 1),
                     "faces_per_s_per_core": round(faces / (td + te), 2), "wall_s": round(wall, 2)}
    y, d = out["yunet+sface"], out["dlib"]
    out["speedup_faces_per_s"] = round(y["faces_per_s_per_core"] / max(d["faces_per_s_per_core"], 1e-9), 2)  # type: ignore[index]
    return out


def hard_faces(yunet: YuNetDetector, hog: DlibDetector, photos: dict[str, np.ndarray]) -> dict[str, object]:
    t1 = photos["t1"]
    cases = {
        "t1": t1, "t1_x0.5": scaled(t1, 0.5), "t1_x0.35": scaled(t1, 0.35), "t1_x0.25": scaled(t1, 0.25),
        "t1_rot20": rotate(t1, 20), "t1_rot35": rotate(t1, 35), "t1_rot20_x0.5": scaled(rotate(t1, 20), 0.5),
        "cameraman": photos["cameraman"],
    }
    turned, _ = renders(6, 2, max_yaw=60.0, seed=3)
    out: dict[str, object] = {}
    for name, img in cases.items():
        out[name] = {"yunet": len(yunet.detect(img)), "hog": len(hog.detect(img))}
    out["renders_yaw_to_60"] = {"images": len(turned), "yunet": sum(len(yunet.detect(i)) > 0 for i in turned),
                                "hog": sum(len(hog.detect(i)) > 0 for i in turned)}
    out["total"] = {"yunet": sum(v["yunet"] for v in out.values()),  # type: ignore[index]
                    "hog": sum(v["hog"] for v in out.values())}  # type: ignore[index]
    return out


def render_identities(models: dict[str, tuple[object, object]], images: list[np.ndarray],
                      labels: np.ndarray) -> dict[str, object]:
    from sklearn.cluster import AgglomerativeClustering

    from facekit.identities.cluster_metrics import cluster_scores

    out: dict[str, object] = {}
    for name, (det, emb) in models.items():
        faces = [det.detect(img) for img in images]  # type: ignore[attr-defined]
        ok = np.array([bool(f) for f in faces])
        crops = [warp(img, align_to_template(f[0].landmarks5).matrix, 112) for img, f in zip(images, faces, strict=True)
                 if f]
        x = np.asarray(emb.embed(crops), dtype=np.float64)  # type: ignore[attr-defined]
        lab = labels[ok]
        metric = Metric(emb.metric)  # type: ignore[attr-defined]
        gen, imp = pair_scores_from_labels(x, lab, metric)
        fit = fit_at_far(gen, imp, metric, 1e-3)
        sim = x @ x.T if metric.higher_is_same else -np.linalg.norm(x[:, None] - x[None], axis=2)
        np.fill_diagonal(sim, -np.inf)
        cut = 1.0 - fit.threshold if metric.higher_is_same else fit.threshold
        groups = AgglomerativeClustering(n_clusters=None, distance_threshold=cut, linkage="average",
                                         metric="cosine" if metric.higher_is_same else "euclidean").fit_predict(x)
        scored = cluster_scores(groups, lab)
        out[name] = {"detection_rate": round(float(ok.mean()), 3), "nn1_accuracy": round(float(np.mean(
            lab[sim.argmax(axis=1)] == lab)), 3), "genuine_mean": round(float(gen.mean()), 3),
            "impostor_mean": round(float(imp.mean()), 3), "threshold_far1e-3": round(fit.threshold, 3),
            "frr_at_far1e-3": round(fit.frr, 3), "purity": round(float(scored["purity"]), 3),
            "inverse_purity": round(float(scored["inverse_purity"]), 3),
            "bcubed_f": round(float(scored["bcubed_f"]), 3), "groups": len(set(groups)),
            "identities": len(set(lab))}
    return out


def photo_identities(models: dict[str, tuple[object, object]], t1: np.ndarray) -> dict[str, object]:
    """t1's six people, and copies: worst same-person vs best different-person score per space."""
    variants = [t1, t1[:, ::-1].copy(), scaled(t1, 0.5), jpeg(t1, 40), rotate(t1, 10)]
    out: dict[str, object] = {}
    for name, (det, emb) in models.items():
        base = det.detect(t1)  # type: ignore[attr-defined]
        centres = [f.landmarks5.mean(axis=0) for f in base]
        vecs, labs = [], []
        for v, img in enumerate(variants):
            h, w = t1.shape[:2]
            for f in det.detect(img):  # type: ignore[attr-defined]
                c = f.landmarks5.mean(axis=0)
                # back to t1 coordinates to know who this is
                if v == 1:
                    c = np.array([w - 1 - c[0], c[1]])
                elif v == 2:
                    c = c / 0.5
                elif v == 4:
                    m = cv2.invertAffineTransform(cv2.getRotationMatrix2D((w / 2, h / 2), 10, 1.0))
                    c = m[:, :2] @ c + m[:, 2]
                who = int(np.argmin([np.linalg.norm(c - b) for b in centres]))
                vecs.append(emb.embed([warp(img, align_to_template(f.landmarks5).matrix, 112)])[0])  # type: ignore[attr-defined]
                labs.append(who)
        x, lab = np.asarray(vecs, dtype=np.float64), np.asarray(labs)
        metric = Metric(emb.metric)  # type: ignore[attr-defined]
        s = x @ x.T if metric.higher_is_same else np.linalg.norm(x[:, None] - x[None], axis=2)
        same = (lab[:, None] == lab[None]) & ~np.eye(len(lab), dtype=bool)
        diff = lab[:, None] != lab[None]
        worst_same = s[same].min() if metric.higher_is_same else s[same].max()
        best_diff = s[diff].max() if metric.higher_is_same else s[diff].min()
        out[name] = {"faces": len(lab), "people": len(set(lab)), "metric": metric.value,
                     "worst_same_person": round(float(worst_same), 3), "best_different_person": round(float(best_diff),
                                                                                                      3),
                     "separated": bool(metric.closer(worst_same, best_diff))}
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--identities", type=int, default=16)
    ap.add_argument("--per-identity", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    photos = offline_photos()
    imgs, labels = renders(args.identities, args.per_identity)
    yunet, sface = YuNetDetector({"threads": 1}), SFaceEmbedder({"threads": 1})
    hog, resnet = DlibDetector({"upsample": 1}), DlibEmbedder()
    models: dict[str, tuple[object, object]] = {"yunet+sface": (yunet, sface), "dlib": (hog, resnet)}
    same_images = [*imgs[: 2 * args.per_identity], photos["t1"], photos["Tom_Hanks_54745"], photos["astronaut"]]
    result = {
        "bench": "face_models",
        "speed": speed(models, same_images, args.rounds),
        "hard_faces": hard_faces(yunet, hog, photos),
        "renders": render_identities(models, imgs, labels),
        "photos_t1": photo_identities(models, photos["t1"]),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    print(json.dumps(result, sort_keys=True))


if __name__ == "__main__":
    main()
