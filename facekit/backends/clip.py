"""open_clip backend: L2-normed image and text embeddings and zero-shot probabilities.

Weights come from a local file, a ``local-dir:`` folder (open_clip_config.json + weights, the layout
of open_clip's Hub repos) or the Hugging Face cache; a download happens only with
``allow_download: true``. Checkpoints load through open_clip's own ``create_model`` and
``load_checkpoint`` with ``weights_only=True``; safetensors are preferred where both exist.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field

from facekit.backends.base import file_sha256
from facekit.common import ModelInfo, Params

LOCAL_DIR = "local-dir:"
HF_HUB = "hf-hub:"
CONFIG_NAME = "open_clip_config.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt")


class ClipSpec(Params):
    """Which open_clip model and weights. ``pretrained`` is a tag (``laion2b_s34b_b79k``) or a file."""

    model: str = Field("ViT-B-32", description="open_clip architecture name, or local-dir:/path, or hf-hub:org/repo")
    pretrained: str | None = Field(
        "laion2b_s34b_b79k", description=
        "open_clip pretrained tag (or a checkpoint path); null: the architecture's own weights file")
    model_config_file: str | None = Field(
        None, description="JSON architecture for a custom model, registered under its file stem")
    allow_download: bool = Field(
        False, description="let open_clip download the weights; off: local files and the HF cache only")
    cache_dir: str | None = Field(None, description="HF cache root; null: HF_HUB_CACHE or ~/.cache/huggingface/hub")
    device: str = Field("auto", description="'auto': cuda when available, else cpu")
    precision: Literal["fp32", "fp16", "bf16"] = Field(
        "fp32", description="inference precision (fp16 / bf16 on GPU only)")
    batch_size: int = Field(64, ge=1, description="images per forward pass")


class ClipWeightsError(FileNotFoundError):
    """Weights or config not found locally; the message names where it looked and the fix."""


@dataclass
class Resolved:
    """What to hand to ``open_clip.create_model``, worked out without touching the network."""

    model_name: str
    pretrained: str | None
    weights_file: str | None
    preprocess: dict[str, Any] = field(default_factory=dict)
    quick_gelu: bool = False


def as_spec(spec: ClipSpec | Mapping[str, Any]) -> ClipSpec:
    return spec if isinstance(spec, ClipSpec) else ClipSpec.model_validate(dict(spec))


def _weights_in(folder: Path) -> list[Path]:
    return sorted((p for p in folder.iterdir() if p.suffix in WEIGHT_SUFFIXES),
                  key=lambda p: (p.suffix != ".safetensors", p.name))


def _register_config(spec: ClipSpec) -> None:
    import open_clip

    if spec.model_config_file is None:
        return
    path = Path(spec.model_config_file).expanduser()
    if not path.is_file():
        raise ClipWeightsError(f"open_clip model_config_file {path} does not exist")
    if path.stem != spec.model:
        raise ClipWeightsError(f"model_config_file {path.name} registers model {path.stem!r}, "
                               f"but model is {spec.model!r}; name the file {spec.model}.json")
    if spec.model not in open_clip.list_models():
        open_clip.add_model_config(path)


def _from_hub_cache(repo: str, names: Sequence[str], cache_dir: str | None) -> str | None:
    from huggingface_hub import try_to_load_from_cache

    for name in names:
        hit = try_to_load_from_cache(repo, name, cache_dir=cache_dir)
        if isinstance(hit, str):
            return hit
    return None


def _resolve_local_dir(spec: ClipSpec, folder: Path) -> Resolved:
    if not (folder / CONFIG_NAME).is_file():
        raise ClipWeightsError(f"open_clip: no {CONFIG_NAME} in {folder}; a local-dir model folder holds "
                               f"{CONFIG_NAME} and open_clip_model.safetensors (as on its Hub repos)")
    weights = _weights_in(folder)
    if not weights:
        raise ClipWeightsError(f"open_clip: no weights ({', '.join(WEIGHT_SUFFIXES)}) in {folder}")
    return Resolved(f"{LOCAL_DIR}{folder}", None, str(weights[0]))


def _resolve_tag(spec: ClipSpec, tag: str) -> Resolved:
    from open_clip.pretrained import get_pretrained_cfg, list_pretrained_tags_by_model

    cfg = get_pretrained_cfg(spec.model, tag)
    if not cfg:
        known = ", ".join(list_pretrained_tags_by_model(spec.model)) or "none"
        raise ClipWeightsError(f"open_clip: pretrained {tag!r} is neither a file nor a known tag of "
                               f"{spec.model} (known tags: {known})")
    preprocess = {k: cfg[k] for k in ("mean", "std", "interpolation", "resize_mode") if cfg.get(k)}
    quick_gelu = bool(cfg.get("quick_gelu", False))
    found, where = None, ""
    if cfg.get("hf_hub"):
        repo, fname = os.path.split(cfg["hf_hub"])  # 'org/repo/' (default file) or 'org/repo/file'
        names = [fname] if fname else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
        if fname.endswith((".bin", ".pth")):
            names.insert(0, fname[:-4] + ".safetensors")
        found = _from_hub_cache(repo, names, spec.cache_dir)
        where = f"the Hugging Face cache ({spec.cache_dir or 'default'}) for {repo}/{'|'.join(names)}"
        fix = f"hf download {repo} {names[0]}"
    else:
        folder = Path(spec.cache_dir or "~/.cache/clip").expanduser()
        path = folder / os.path.basename(cfg["url"])
        found = str(path) if path.is_file() else None
        where, fix = str(path), f"download {cfg['url']} to {folder}"
    if found:
        return Resolved(spec.model, found, found, preprocess, quick_gelu)
    if spec.allow_download:
        return Resolved(spec.model, tag, None, preprocess, quick_gelu)
    raise ClipWeightsError(f"open_clip {spec.model}/{tag}: weights not found in {where}; run `{fix}` on a "
                           "machine with network access, set pretrained to a local file, or allow_download")


def resolve(spec: ClipSpec) -> Resolved:
    """Find config and weights locally; raise ClipWeightsError saying where it looked and the fix."""
    import open_clip

    if spec.model.startswith(LOCAL_DIR):
        folder = Path(spec.model[len(LOCAL_DIR):]).expanduser()
        if not folder.is_dir():
            raise ClipWeightsError(f"open_clip: local-dir {folder} does not exist")
        return _resolve_local_dir(spec, folder)
    if spec.model.startswith(HF_HUB):
        repo = spec.model[len(HF_HUB):]
        config = _from_hub_cache(repo, [CONFIG_NAME], spec.cache_dir)
        if config:
            return _resolve_local_dir(spec, Path(config).parent)
        if spec.allow_download:
            return Resolved(spec.model, None, None)
        raise ClipWeightsError(f"open_clip {spec.model}: {CONFIG_NAME} not in the Hugging Face cache "
                               f"({spec.cache_dir or 'default'}); run `hf download {repo}` "
                               "on a machine with network access, or allow_download")
    _register_config(spec)
    if open_clip.get_model_config(spec.model) is None:
        raise ClipWeightsError(f"open_clip: unknown architecture {spec.model!r}; use a name from "
                               "open_clip.list_models(), local-dir:/path, or model_config_file")
    if not spec.pretrained:
        raise ClipWeightsError(f"open_clip {spec.model}: no pretrained weights given (a tag or a file)")
    path = Path(spec.pretrained).expanduser()
    if path.is_file():
        return Resolved(spec.model, str(path), str(path))
    if path.suffix in WEIGHT_SUFFIXES:
        raise ClipWeightsError(f"open_clip {spec.model}: checkpoint {path} does not exist")
    return _resolve_tag(spec, spec.pretrained)


def check_files(spec: ClipSpec | Mapping[str, Any]) -> list[str]:
    """Problems that would stop loading (empty: loadable offline or downloads allowed). For ``doctor``."""
    try:
        resolve(as_spec(spec))
    except ClipWeightsError as exc:
        return [str(exc)]
    return []


def file_digest(path: str) -> str:
    return file_sha256(Path(path))[:16]


def space_label(spec: ClipSpec) -> str:
    """Names the embedding space: architecture + weights, since vectors compare only within one."""
    if spec.model.startswith((LOCAL_DIR, HF_HUB)):
        return spec.model.split(":", 1)[1].rstrip("/").split("/")[-1]
    weights = spec.pretrained or "random"
    if Path(weights).suffix in WEIGHT_SUFFIXES:
        weights = Path(weights).stem
    return f"{spec.model}-{weights}"


def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


class ClipModel:
    """One loaded open_clip model; embeddings are float32 and L2-normalised."""

    def __init__(self, spec: ClipSpec | Mapping[str, Any]) -> None:
        import open_clip
        import torch

        self.spec = as_spec(spec)
        self.resolved = resolve(self.spec)
        self.device = _device(self.spec.device)
        pp = self.resolved.preprocess  # the tag's own normalisation when weights come from the cache
        model, _, preprocess = open_clip.create_model_and_transforms(
            self.resolved.model_name, pretrained=self.resolved.pretrained, precision=self.spec.precision,
            device=self.device, force_quick_gelu=self.resolved.quick_gelu,
            image_mean=pp.get("mean"), image_std=pp.get("std"), image_interpolation=pp.get("interpolation"),
            image_resize_mode=pp.get("resize_mode"), cache_dir=self.spec.cache_dir,
            weights_only=True, require_pretrained=True,
        )
        self.model = model.eval()
        self.preprocess = preprocess
        self.tokenizer = open_clip.get_tokenizer(self.resolved.model_name)
        self.dtype = next(self.model.parameters()).dtype
        with torch.inference_mode():
            self.logit_scale = float(min(self.model.logit_scale.exp().item(), 100.0))
        self.dim = int(self.embed_texts(["a"]).shape[1])
        self.space = f"clip-{space_label(self.spec)}-{self.dim}"

    def embed_images(self, images: Sequence[np.ndarray]) -> np.ndarray:
        import torch
        from PIL import Image

        out = []
        for i in range(0, len(images), self.spec.batch_size):
            chunk = [self.preprocess(Image.fromarray(a)) for a in images[i : i + self.spec.batch_size]]
            with torch.inference_mode():
                x = torch.stack(chunk).to(self.device, self.dtype)
                out.append(self.model.encode_image(x, normalize=True).float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, getattr(self, "dim", 0)), np.float32)

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        import torch

        with torch.inference_mode():
            tokens = self.tokenizer(list(texts)).to(self.device)
            return self.model.encode_text(tokens, normalize=True).float().cpu().numpy()

    def probabilities(self, image_emb: np.ndarray, text_emb: np.ndarray) -> np.ndarray:
        """Softmax over the prompts of CLIP's scaled cosine similarities: (images, prompts), rows sum to 1."""
        logits = self.logit_scale * (image_emb.astype(np.float64) @ text_emb.astype(np.float64).T)
        logits -= logits.max(axis=1, keepdims=True)
        e = np.exp(logits)
        return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)

    def model_info(self) -> ModelInfo:
        w = self.resolved.weights_file
        tag = Path(w).name if w else (self.spec.pretrained or "")
        return ModelInfo(name=f"open_clip:{self.spec.model}:{tag}", revision=file_digest(w) if w else tag)
