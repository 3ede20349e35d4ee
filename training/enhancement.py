"""``facefoundry train enhancement``: a small U-Net that restores degraded face crops, on Ray Train.

Pairs come from the export (``<key>.degraded.png`` written from the degrade stage, ``<key>.png`` the
clean crop) or are degraded on the fly with the same function and ranges (``source: online``, as
GFPGAN and CodeFormer train). Loss is L1. Evaluation on held-out samples always reports the restored
output next to the degraded input: PSNR, SSIM and identity similarity (cosine between the
embeddings of the output and of the clean image).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol

import cv2
import numpy as np
import torch
from torch.nn import functional as F

from facekit.imaging import decode_rgb
from stages.base import sample_seed
from stages.mappers.degrade import degrade_rgb, draw_degradation
from training.checkpoints import load_checkpoint
from training.config import EnhancementDataConfig, EnhancementTrainConfig
from training.ddp import unwrap
from training.export_index import ExportIndex, load_export
from training.image_quality import psnr, ssim
from training.job_layout import TrainResult, write_json
from training.loop import Precision, WorkerJob
from training.ray_launch import absolute_url, launch_job
from training.shard_loader import Sample, ShardStream
from training.unet import UNet

KIND = "enhancement"


class PairDecoder:
    """(degraded, clean, key): float (3, S, S) in [0, 1]. ``train`` adds a paired mirror flip and, for
    online pairs, draws a fresh degradation each time; otherwise online pairs are seeded by key."""

    def __init__(self, data: EnhancementDataConfig, train: bool, seed: int = 0) -> None:
        self.data, self.train, self.seed = data, train, seed
        self._rng: np.random.Generator | None = None

    def _generator(self) -> np.random.Generator:
        if self._rng is None:  # created in the loader worker, seeded from torch's per-worker seed
            self._rng = np.random.default_rng(torch.initial_seed() % (1 << 63))
        return self._rng

    def __call__(self, sample: Sample) -> tuple[torch.Tensor, torch.Tensor, str]:
        key = sample["__key__"]
        clean = decode_rgb(sample[self.data.target_member])
        if self.data.source == "stored":
            degraded = decode_rgb(sample[self.data.input_member])
        else:
            rng = (
                self._generator()
                if self.train
                else np.random.default_rng(sample_seed(self.seed, key, "degrade"))
            )
            degraded = degrade_rgb(clean, draw_degradation(self.data.degradation, rng))
        pair = [_resize(clean, self.data.image_size), _resize(degraded, self.data.image_size)]
        if self.train and self.data.hflip > 0 and self._generator().random() < self.data.hflip:
            pair = [np.ascontiguousarray(p[:, ::-1]) for p in pair]
        clean_t, degraded_t = (
            torch.from_numpy(np.array(p)).permute(2, 0, 1).float().div_(255.0) for p in pair
        )
        return degraded_t, clean_t, key


def _resize(rgb: np.ndarray, size: int) -> np.ndarray:
    if rgb.shape[:2] == (size, size):
        return rgb
    return cv2.resize(rgb, (size, size), interpolation=cv2.INTER_AREA)


def train_enhancement(config: EnhancementTrainConfig, new: bool = False) -> TrainResult:
    """Train (or resume; with ``new``, start the job over) the restoration model; returns rank 0's
    summary (with the evaluation)."""
    export = load_export(config.data.export, config.data.storage_options)
    run_dir = absolute_url(config.output_dir or export.run_dir)
    identity_model = config.identity_model
    if identity_model not in (None, "dlib"):
        identity_model = absolute_url(identity_model)
    config = config.model_copy(
        update={
            "data": config.data.model_copy(update={"export": absolute_url(config.data.export)}),
            "output_dir": run_dir,
            "identity_model": identity_model,
        }
    )
    export.split(config.data.train_split)  # fail here, not on a worker
    return launch_job(enhancement_train_loop, config, KIND, export.sha256, run_dir, new)


def enhancement_train_loop(loop_config: dict[str, Any]) -> dict[str, Any] | None:
    job = WorkerJob(loop_config, EnhancementTrainConfig, KIND)
    cfg: EnhancementTrainConfig = job.cfg
    model, done = job.train(
        build=lambda: UNet(cfg.model.base_channels, cfg.model.levels),
        restore=lambda net, ckpt: net.load_state_dict(ckpt.tensors["model"]),
        decoder=PairDecoder(cfg.data, train=True, seed=cfg.seed),
        loss=lambda model, degraded, clean, _step: F.l1_loss(model(degraded).float(), clean),
        tensors=lambda net: {"model": net.state_dict()},
        precision=Precision(torch.bfloat16, scaled=False),
    )
    if not job.worker.is_chief:
        return None
    result = None
    if cfg.data.eval_split and cfg.data.eval_split in job.export.split_names:
        device = job.worker.device
        embedder = load_identity_embedder(cfg.identity_model, device)
        result = evaluate_enhancement(unwrap(model), job.export, cfg.data, embedder, device, cfg.seed)
        write_json(f"{job.jdir}/eval/enhancement-step-{done.step:08d}.json", result, job.storage)
        done.log.log_eval(done.step, _flatten(result), f"export:{cfg.data.eval_split}")
    return job.result(done, result)


# ---------------------------------------------------------------- evaluation


class IdentityEmbedder(Protocol):
    name: str

    def embed(self, crops: list[np.ndarray]) -> np.ndarray: ...


class DlibIdentityEmbedder:
    """dlib's ResNet (real weights from face_recognition_models): the offline default."""

    name = "dlib-resnet-128"

    def __init__(self) -> None:
        from facekit.backends.dlib import DlibEmbedder

        self._embedder = DlibEmbedder()

    def embed(self, crops: list[np.ndarray]) -> np.ndarray:
        return self._embedder.embed([_resize(c, 112) for c in crops])


class CheckpointIdentityEmbedder:
    """A recognition model trained by this project (flip-summed embeddings, as in verification)."""

    def __init__(self, checkpoint: str, device: torch.device | str = "cpu") -> None:
        from training.recognition_model import load_backbone

        self.model, meta = load_backbone(checkpoint, device=device)
        self.input_size = int(meta["config"]["data"]["input_size"])
        self.device = device
        self.name = f"recognition:{meta['checkpoint_path']}"

    @torch.inference_mode()
    def embed(self, crops: list[np.ndarray]) -> np.ndarray:
        x = torch.stack([torch.from_numpy(_resize(c, self.input_size)).permute(2, 0, 1) for c in crops])
        x = (x.float().div(255.0) - 0.5).div(0.5).to(self.device)
        e = self.model(x) + self.model(torch.flip(x, dims=[-1]))
        return F.normalize(e.float(), dim=1).cpu().numpy()


def load_identity_embedder(spec: str | None, device: torch.device | str = "cpu") -> IdentityEmbedder | None:
    if spec is None:
        return None
    if spec == "dlib":
        return DlibIdentityEmbedder()
    return CheckpointIdentityEmbedder(spec, device)


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    return np.sum(a * b, axis=1)


def _eval_pairs(export: ExportIndex, data: EnhancementDataConfig, seed: int) -> Iterator[tuple]:
    stream = ShardStream(
        export.split(data.eval_split or "val").shards,
        PairDecoder(data, train=False, seed=seed),
        shuffle=False,
        repeat=False,
        storage_options=export.storage_options,
    )
    for n, item in enumerate(stream):
        if n >= data.eval_samples:
            return
        yield item


@torch.inference_mode()
def evaluate_enhancement(
    model: torch.nn.Module,
    export: ExportIndex,
    data: EnhancementDataConfig,
    embedder: IdentityEmbedder | None = None,
    device: torch.device | str = "cpu",
    seed: int = 0,
    batch_size: int = 32,
) -> dict[str, Any]:
    """Restored vs degraded input, both against the clean image, on the first ``eval_samples``
    held-out pairs (export order, so every run scores the same samples)."""
    model.eval()
    scores: dict[str, list[np.ndarray]] = {
        k: []
        for k in (
            "psnr_degraded",
            "psnr_restored",
            "ssim_degraded",
            "ssim_restored",
            "id_degraded",
            "id_restored",
        )
    }
    items = list(_eval_pairs(export, data, seed))
    if not items:
        raise ValueError(f"split {data.eval_split!r} has no pairs to evaluate")
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        degraded = torch.stack([c[0] for c in chunk]).to(device)
        clean = torch.stack([c[1] for c in chunk]).to(device)
        restored = model(degraded).float().clamp(0.0, 1.0)
        for name, image in (("degraded", degraded), ("restored", restored)):
            scores[f"psnr_{name}"].append(psnr(image, clean).cpu().numpy())
            scores[f"ssim_{name}"].append(ssim(image, clean).cpu().numpy())
        if embedder is not None:
            as_uint8 = [_to_uint8(t) for t in (clean, degraded, restored)]
            e_clean, e_degraded, e_restored = (embedder.embed(batch) for batch in as_uint8)
            scores["id_degraded"].append(_cosine(e_degraded, e_clean))
            scores["id_restored"].append(_cosine(e_restored, e_clean))
    model.train()
    mean = {k: float(np.mean(np.concatenate(v))) for k, v in scores.items() if v}
    out: dict[str, Any] = {"samples": len(items), "dataset": f"export:{data.eval_split}"}
    for metric, label in (("psnr", "psnr"), ("ssim", "ssim"), ("id", "identity_cosine")):
        if f"{metric}_restored" in mean:
            out[label] = {"degraded": mean[f"{metric}_degraded"], "restored": mean[f"{metric}_restored"]}
    out["identity_model"] = embedder.name if embedder is not None else None
    return out


def _to_uint8(batch: torch.Tensor) -> list[np.ndarray]:
    arr = (batch.clamp(0, 1) * 255.0 + 0.5).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [np.ascontiguousarray(a) for a in arr]


def _flatten(result: dict[str, Any]) -> dict[str, float]:
    flat = {"samples": float(result["samples"])}
    for key in ("psnr", "ssim", "identity_cosine"):
        if key in result:
            flat.update({f"{key}_{k}": v for k, v in result[key].items()})
    return flat


def load_enhancer(
    checkpoint: str, storage_options: dict[str, Any] | None = None, device: torch.device | str = "cpu"
) -> UNet:
    """The restoration network of an enhancement checkpoint (checkpoint or job folder), in eval mode."""
    ckpt = load_checkpoint(checkpoint, storage_options, stems=("model",))
    cfg = EnhancementTrainConfig.model_validate(ckpt.config)
    net = UNet(cfg.model.base_channels, cfg.model.levels)
    net.load_state_dict(ckpt.tensors["model"])
    return net.to(device).eval()
