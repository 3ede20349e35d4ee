"""Config models of the training and evaluation jobs (pydantic, unknown keys are errors), from YAML.

Defaults are the published recipes where one exists (insightface arcface_torch for recognition:
SGD 0.1 / momentum 0.9 / weight decay 5e-4 / poly decay, ArcFace s=64 m=0.5, 112 px crops,
flip only) and CPU-sized where the job is ours (the enhancement U-Net).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, Field, ValidationError, model_validator

from facekit.common import Strict
from facekit.userconfig import ConfigError, format_errors, load_yaml_file
from stages.mappers.degrade import DegradeParams

JOB_NAME = r"^[A-Za-z0-9][A-Za-z0-9_\-]*$"


class ScalingConfig(Strict):
    """How Ray Train runs the loop. ``num_workers: 0`` runs it in this process (Ray Train local mode)."""

    num_workers: int = Field(1, ge=0, description="DDP ranks (Ray Train workers)")
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0.0)
    gpus_per_worker: float = Field(1.0, ge=0.0, description="used when use_gpu")
    torch_threads: int | None = Field(
        None, ge=1, description="intra-op threads per worker; None = torch default"
    )
    max_failures: int = Field(
        0, ge=0, description="worker-group restarts; each resumes from the last checkpoint"
    )


class AugmentConfig(Strict):
    """Train-time augmentation. insightface trains with flips only; synthetic-data papers (DCFace,
    Vec2Face, DigiFace-1M) add RandAugment and random erasing to close the synthetic-to-real gap."""

    hflip: float = Field(0.5, ge=0.0, le=1.0)
    randaugment: bool = False
    randaugment_ops: int = Field(2, ge=1)
    randaugment_magnitude: int = Field(9, ge=0, le=30)
    random_erasing: float = Field(0.0, ge=0.0, le=1.0, description="probability per image")
    erasing_scale: tuple[float, float] = (0.02, 0.2)


class CheckpointConfig(Strict):
    every_steps: int = Field(1000, ge=1)
    keep: int = Field(3, ge=0, description="newest checkpoints kept; 0 keeps all")
    resume: bool = Field(True, description="start from the job's latest checkpoint when there is one")


class OptimizerConfig(Strict):
    name: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(0.1, gt=0.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    weight_decay: float = Field(5e-4, ge=0.0)
    warmup_steps: int = Field(0, ge=0)
    schedule: Literal["poly", "cosine", "constant"] = "poly"
    grad_clip: float | None = Field(None, gt=0.0, description="max gradient norm; None = no clipping")


class RunLength(Strict):
    """Shared fields of the training jobs."""

    job: str = Field(pattern=JOB_NAME, description="name under <run>/train/ and <run>/metrics/")
    output_dir: str | None = Field(
        None, description="run folder for checkpoints and metrics; default: the export's"
    )
    seed: int = 0
    epochs: float | None = Field(None, gt=0.0)
    max_steps: int | None = Field(None, ge=1, description="overrides epochs")
    log_every: int = Field(50, ge=1)
    amp: bool = Field(True, description="mixed precision; only ever used on CUDA devices")
    checkpoint: CheckpointConfig = CheckpointConfig()
    scaling: ScalingConfig = ScalingConfig()

    @model_validator(mode="after")
    def _length(self) -> RunLength:
        if self.epochs is None and self.max_steps is None:
            raise ValueError("set epochs or max_steps")
        return self


class RecognitionDataConfig(Strict):
    export: str = Field(description="run folder or its export/ folder (path or fsspec URL)")
    train_split: str = "train"
    eval_split: str | None = Field(
        "val", description="held-out identities verified after training; None skips"
    )
    input_size: int = Field(112, ge=16, multiple_of=16, description="crops are resized to this side")
    batch_size: int = Field(128, ge=1, description="per worker")
    loader_workers: int = Field(2, ge=0)
    shuffle_buffer: int = Field(2000, ge=0)
    storage_options: dict[str, Any] = Field(default_factory=dict)
    augment: AugmentConfig = AugmentConfig()


class BackboneConfig(Strict):
    name: Literal["iresnet_tiny", "iresnet18", "iresnet34", "iresnet50", "iresnet100"] = "iresnet50"
    embedding_size: int = Field(512, ge=2)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)


class MarginLossConfig(Strict):
    """ArcFace (1, 0.5, 0) and CosFace (1, 0, 0.4) are presets; ``combined`` uses m1, m2, m3."""

    kind: Literal["arcface", "cosface", "combined"] = "arcface"
    scale: float = Field(64.0, gt=0.0)
    m1: float = Field(1.0, gt=0.0)
    m2: float = 0.5
    m3: float = 0.0
    sample_rate: float = Field(
        1.0, gt=0.0, le=1.0, description="PartialFC: fraction of class centres per step"
    )


class VerificationPairsConfig(Strict):
    pairs: int = Field(
        3000, ge=10, description="positive and as many negative pairs from held-out identities"
    )
    batch_size: int = Field(64, ge=1)
    flip: bool = Field(
        True, description="sum the embeddings of each image and its mirror (the standard protocol)"
    )


class RecognitionTrainConfig(RunLength):
    job: str = Field("recognition", pattern=JOB_NAME)
    data: RecognitionDataConfig
    model: BackboneConfig = BackboneConfig()
    loss: MarginLossConfig = MarginLossConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    eval: VerificationPairsConfig = VerificationPairsConfig()
    ddp_check: bool = Field(True, description="after the first step, compare weights across ranks (cheap)")

    def network(self) -> dict[str, Any]:
        """What shapes the checkpoint's tensors: a resume with any of it changed cannot load them."""
        return {**_flat("model", self.model.model_dump(mode="json")), "data.input_size": self.data.input_size}


class EnhancementDataConfig(Strict):
    export: str = Field(description="run folder or its export/ folder (path or fsspec URL)")
    train_split: str = "train"
    eval_split: str | None = "val"
    source: Literal["stored", "online"] = Field(
        "stored",
        description="stored: the export's degraded member; online: degrade on the fly (as GFPGAN trains)",
    )
    input_member: str = Field("degraded.png", description="export member with the degraded image")
    target_member: str = Field("png", description="export member with the clean image")
    degradation: DegradeParams = Field(DegradeParams(), description="ranges for source: online")
    image_size: int = Field(112, ge=16, multiple_of=8)
    batch_size: int = Field(16, ge=1, description="per worker")
    loader_workers: int = Field(2, ge=0)
    shuffle_buffer: int = Field(500, ge=0)
    hflip: float = Field(0.5, ge=0.0, le=1.0)
    eval_samples: int = Field(256, ge=1, description="held-out pairs scored after training")
    storage_options: dict[str, Any] = Field(default_factory=dict)


class UNetConfig(Strict):
    base_channels: int = Field(32, ge=4)
    levels: int = Field(3, ge=1, le=5, description="down/up-sampling levels")


class EnhancementTrainConfig(RunLength):
    job: str = Field("enhancement", pattern=JOB_NAME)
    data: EnhancementDataConfig
    model: UNetConfig = UNetConfig()
    optimizer: OptimizerConfig = OptimizerConfig(name="adamw", lr=2e-4, weight_decay=0.0, schedule="cosine")
    identity_model: str | None = Field(
        "dlib", description="embedder for identity similarity: 'dlib', a recognition checkpoint path, or None"
    )

    def network(self) -> dict[str, Any]:
        """What shapes the checkpoint's tensors (the U-Net is convolutional: any image size loads them)."""
        return _flat("model", self.model.model_dump(mode="json"))


def _flat(prefix: str, section: dict[str, Any]) -> dict[str, Any]:
    return {f"{prefix}.{k}": v for k, v in section.items()}


class VerificationEvalConfig(Strict):
    """``facefoundry eval verification``: a recognition checkpoint against pair files and/or an export."""

    checkpoint: str = Field(description="checkpoint folder or a job folder (its latest checkpoint)")
    bin_files: tuple[str, ...] = Field(
        (), description="insightface .bin pair files (lfw.bin, cfp_fp.bin, ...)"
    )
    export: str | None = Field(None, description="run or export folder: pairs from its held-out identities")
    split: str = "val"
    pairs: VerificationPairsConfig = VerificationPairsConfig()
    seed: int = 0
    output: str | None = Field(None, description="JSON results path; default <checkpoint>/verification.json")
    storage_options: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _some_pairs(self) -> VerificationEvalConfig:
        if not self.bin_files and not self.export:
            raise ValueError("no pairs to score: give bin_files (insightface .bin files) and/or export (a run folder)")
        return self


class TrainConfigError(ConfigError):
    """A training config does not validate; the message names each key path and what was expected."""


ConfigT = TypeVar("ConfigT", bound=BaseModel)


def load_train_config(source: str | Path | dict[str, Any], model: type[ConfigT]) -> ConfigT:
    """Validate a YAML file (or an already-parsed dict) against a config model."""
    if isinstance(source, dict):
        raw, where = source, "config"
    else:
        where = str(source)
        raw = load_yaml_file(source) or {}
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise TrainConfigError(f"{where}: invalid {model.__name__}\n" + format_errors(exc)) from None
