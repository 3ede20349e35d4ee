"""Arc2Face (Papantoniou et al., ECCV 2024) through diffusers: loading, identity projection, generation.

Arc2Face is Stable Diffusion 1.5 with a fine-tuned UNet (the release's ``arc2face/`` folder) and a
fine-tuned CLIP text encoder (``encoder/``); VAE, tokenizer and scheduler come from the SD-1.5 base
model. The only conditioning is an ArcFace identity vector: unit-normalised, zero-padded to the text
width (768 for SD-1.5) and written over the token embedding of ``id`` in "photo of a id person"
before the text transformer runs. There is no free-text prompt. The optional ControlNet of the
release conditions on a pose image (a rendered FLAME normal map in the authors' demo), not on text.

Differences from the reference code, and why:

- Several identities are projected in one encoder call (the reference does one per call); a test
  proves the result equals the one-at-a-time projection exactly.
- The token embedding is replaced by a forward hook on the encoder's own embedding layer, so the
  library's forward (causal mask, attention backend) runs unchanged on any transformers version.
- Each sample has its own seed and its own CPU ``torch.Generator`` for its starting noise, so a
  sample's pixels depend on its seed only, not on which other samples share its batch, and the
  starting noise is the same on any device.
- Weights load from safetensors only. The release ships the encoder as ``pytorch_model.bin``;
  ``convert_bin_to_safetensors`` converts it once, unpickling with ``weights_only=True``.
"""

from __future__ import annotations

import hashlib
import importlib.util
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field

from facekit.backends.base import file_sha256
from facekit.common import ModelInfo, Params

PROMPT = "photo of a id person"
ID_TOKEN = "id"
ID_DIM = 512
BASE_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
RELEASE_REPO = "FoivosPar/Arc2Face"
# What Arc2Face takes from the base model (its UNet and text encoder are replaced).
BASE_PATTERNS = (
    "model_index.json",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
    "tokenizer/*",
    "scheduler/*",
)

DType = Literal["fp32", "fp16", "bf16"]


class Arc2FaceSpec(Params):
    """Where the weights are and how to run them (the generation settings belong to the caller)."""

    arc2face_dir: str = Field(description="the release's arc2face/ folder (UNet config + safetensors)")
    encoder_dir: str = Field(
        description="the release's encoder/ folder (CLIP text model config + safetensors)"
    )
    base_model: str = Field(
        BASE_MODEL, description="SD-1.5 folder or Hugging Face id (vae, tokenizer, scheduler)"
    )
    controlnet_dir: str | None = Field(None, description="the release's controlnet/ folder (pose), optional")
    allow_download: bool = Field(
        False, description="let a hub id download; off: local files and HF cache only"
    )
    dtype: DType = Field(
        "fp16", description="weights' precision on the GPU: fp16 (Arc2Face's own), bf16 or fp32 (fp32 on CPU)")
    device: str = Field("auto", description="'auto': cuda when present, else cpu")
    compile: bool = Field(False, description="torch.compile the UNet (GPU; first batch pays the compile)")


class ModelFilesError(FileNotFoundError):
    """A model folder is missing or incomplete; the message names the path and the fix."""


def _download_hint(what: str) -> str:
    return (
        f"download {what} from https://huggingface.co/{RELEASE_REPO} on a machine with network access "
        "(see its model card) and point the config at the folder"
    )


def check_folder(folder: Path, role: str, config_name: str = "config.json") -> list[Path]:
    """The folder's config and safetensors files, or ModelFilesError naming what is missing and the fix."""
    if not folder.is_dir():
        raise ModelFilesError(
            f"arc2face {role}: folder {folder} does not exist; {_download_hint(role + '/')}"
        )
    config = folder / config_name
    if not config.is_file():
        raise ModelFilesError(f"arc2face {role}: no {config_name} in {folder}; {_download_hint(role + '/')}")
    weights = sorted(folder.glob("*.safetensors"))
    if not weights:
        pickled = sorted(p.name for p in folder.glob("*.bin"))
        if pickled:
            raise ModelFilesError(
                f"arc2face {role}: {folder} holds only {', '.join(pickled)} (pickle); weights are loaded "
                f"from safetensors only. Convert once with: python -m facekit.backends.arc2face convert {folder}"
            )
        raise ModelFilesError(
            f"arc2face {role}: no .safetensors weights in {folder}; {_download_hint(role + '/')}"
        )
    return [config, *weights]


# Pickled weight files and the safetensors names their libraries look for instead.
BIN_TO_SAFETENSORS = {
    "pytorch_model.bin": "model.safetensors",  # transformers (the released encoder/)
    "diffusion_pytorch_model.bin": "diffusion_pytorch_model.safetensors",  # diffusers
}


def convert_bin_to_safetensors(folder: str | Path) -> Path:
    """Write a folder's pickled weights as safetensors beside them (the released encoder is a .bin).

    ``torch.load(weights_only=True)`` only rebuilds tensors and plain containers, never arbitrary objects.
    """
    import torch
    from safetensors.torch import save_file

    folder = Path(folder)
    found = [
        (folder / src, folder / dst) for src, dst in BIN_TO_SAFETENSORS.items() if (folder / src).is_file()
    ]
    if not found:
        raise ModelFilesError(f"no {' or '.join(BIN_TO_SAFETENSORS)} in {folder}")
    source, target = found[0]
    state = torch.load(source, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{source} is not a state dict")
    # safetensors refuses shared storage: give each tensor its own.
    tensors = {k: v.detach().clone().contiguous() for k, v in state.items() if isinstance(v, torch.Tensor)}
    save_file(tensors, str(target), metadata={"format": "pt"})
    return target


def resolve_base_model(base_model: str, allow_download: bool) -> Path:
    """A local folder as is; a hub id through the HF cache (downloading only when allowed)."""
    path = Path(base_model).expanduser()
    if path.is_dir():
        return path
    if path.is_absolute() or base_model.startswith((".", "~")) or base_model.count("/") != 1:
        raise ModelFilesError(f"arc2face base_model: folder {base_model} does not exist")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        folder = snapshot_download(
            base_model, allow_patterns=list(BASE_PATTERNS), local_files_only=not allow_download
        )
    except (LocalEntryNotFoundError, HFValidationError) as exc:
        why = "allow_download is off" if not allow_download else f"it could not be downloaded ({exc})"
        include = " ".join(f"--include '{p}'" for p in BASE_PATTERNS)
        raise ModelFilesError(
            f"arc2face base_model: {base_model} is not in the Hugging Face cache and {why}; run "
            f"`hf download {base_model} {include}` where there is network access, "
            "or set base_model to a local SD-1.5 folder"
        ) from exc
    return Path(folder)


def files_sha256(files: Sequence[Path], root_names: Sequence[str]) -> str:
    """One digest over (role/name, content) of every file that shapes the output."""
    total = hashlib.sha256()
    for path, role in zip(files, root_names, strict=True):
        total.update(f"{role}/{path.name}:{file_sha256(path)}\n".encode())
    return total.hexdigest()


def torch_dtype(name: DType) -> Any:
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


def pick_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


@dataclass(frozen=True)
class GenerationSettings:
    steps: int = 25
    guidance: float = 3.0
    height: int = 512
    width: int = 512


class Arc2Face:
    """A loaded pipeline plus what projection needs: prompt ids, the ``id`` position, the empty prompt."""

    def __init__(self, pipe: Any, info: ModelInfo, has_controlnet: bool) -> None:
        import torch

        self.pipe = pipe
        self.info = info
        self.has_controlnet = has_controlnet
        tokenizer, encoder = pipe.tokenizer, pipe.text_encoder
        self.width = int(encoder.config.hidden_size)
        id_ids = tokenizer.encode(ID_TOKEN, add_special_tokens=False)
        if len(id_ids) != 1:
            raise ModelFilesError(f"arc2face tokenizer: {ID_TOKEN!r} is not a single token ({id_ids})")
        length = tokenizer.model_max_length
        ids = tokenizer(
            PROMPT, padding="max_length", max_length=length, truncation=True, return_tensors="pt"
        ).input_ids
        self.id_position = (ids[0] == id_ids[0]).nonzero().flatten()
        if len(self.id_position) != 1:
            raise ModelFilesError(
                f"arc2face tokenizer: {ID_TOKEN!r} occurs {len(self.id_position)} times in {PROMPT!r}"
            )
        self.prompt_ids = ids.to(pipe.device)
        empty = tokenizer("", padding="max_length", max_length=length, truncation=True, return_tensors="pt")
        with torch.no_grad():
            # What diffusers computes for the unconditional branch of classifier-free guidance.
            self.negative_embeds = encoder(empty.input_ids.to(pipe.device))[0]

    @classmethod
    def load(cls, spec: Arc2FaceSpec) -> Arc2Face:
        import torch
        from diffusers import (
            AutoencoderKL,
            ControlNetModel,
            DPMSolverMultistepScheduler,
            StableDiffusionControlNetPipeline,
            StableDiffusionPipeline,
            UNet2DConditionModel,
        )
        from transformers import CLIPTextModel, CLIPTokenizer

        dtype = torch_dtype(spec.dtype)
        device = pick_device(spec.device)
        # Without accelerate, diffusers warns and loads the plain way; ask for that plain way explicitly.
        lean = {"low_cpu_mem_usage": importlib.util.find_spec("accelerate") is not None}
        base = resolve_base_model(spec.base_model, spec.allow_download)
        unet_dir, encoder_dir = Path(spec.arc2face_dir).expanduser(), Path(spec.encoder_dir).expanduser()
        files: list[tuple[str, list[Path]]] = [
            ("arc2face", check_folder(unet_dir, "arc2face")),
            ("encoder", check_folder(encoder_dir, "encoder")),
            ("vae", check_folder(base / "vae", "vae")),
            ("scheduler", [base / "scheduler" / "scheduler_config.json"]),
            ("tokenizer", sorted(p for p in (base / "tokenizer").glob("*") if p.is_file())),
        ]
        for role, paths in files[3:]:
            if not paths or not all(p.is_file() for p in paths):
                raise ModelFilesError(
                    f"arc2face {role}: missing files in {base / role}; base_model must be SD-1.5"
                )
        control_dir = Path(spec.controlnet_dir).expanduser() if spec.controlnet_dir else None
        if control_dir is not None:
            files.append(("controlnet", check_folder(control_dir, "controlnet")))

        unet = UNet2DConditionModel.from_pretrained(unet_dir, torch_dtype=dtype, use_safetensors=True, **lean)
        encoder = CLIPTextModel.from_pretrained(encoder_dir, dtype=dtype, use_safetensors=True)
        vae = AutoencoderKL.from_pretrained(
            base, subfolder="vae", torch_dtype=dtype, use_safetensors=True, **lean
        )
        tokenizer = CLIPTokenizer.from_pretrained(base, subfolder="tokenizer")
        # Arc2Face samples with DPM-Solver++ built from the base model's scheduler config.
        scheduler = DPMSolverMultistepScheduler.from_pretrained(base, subfolder="scheduler")
        common: dict[str, Any] = dict(
            vae=vae,
            text_encoder=encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        if control_dir is not None:
            controlnet = ControlNetModel.from_pretrained(
                control_dir, torch_dtype=dtype, use_safetensors=True, **lean
            )
            pipe: Any = StableDiffusionControlNetPipeline(controlnet=controlnet, **common)
        else:
            pipe = StableDiffusionPipeline(**common)
        pipe = pipe.to(device)
        pipe.set_progress_bar_config(disable=True)
        if spec.compile:
            pipe.unet = torch.compile(pipe.unet)
        flat = [p for _, paths in files for p in paths]
        roles = [role for role, paths in files for _ in paths]
        name = "arc2face+controlnet" if control_dir is not None else "arc2face"
        return cls(
            pipe,
            ModelInfo(name=name, revision="sha256:" + files_sha256(flat, roles)),
            control_dir is not None,
        )

    # -- identity projection -------------------------------------------------------------------------------

    def _padded(self, vectors: np.ndarray) -> Any:
        """(N, d) identity vectors -> unit norm, zero-padded to the text width, in the encoder's dtype."""
        import torch

        v = torch.from_numpy(np.ascontiguousarray(vectors, dtype=np.float32))
        if v.ndim != 2 or v.shape[1] > self.width:
            raise ValueError(
                f"identity vectors must be (N, d) with d <= text width {self.width}, got {tuple(v.shape)}"
            )
        norms = v.norm(dim=1, keepdim=True)
        if not bool(torch.isfinite(v).all()) or bool((norms == 0).any()):
            raise ValueError("identity vectors must be finite and non-zero")
        v = torch.nn.functional.pad(v / norms, (0, self.width - v.shape[1]))
        return v.to(device=self.pipe.device, dtype=self.pipe.text_encoder.dtype)

    @contextmanager
    def _id_token_replaced(self, padded: Any) -> Iterator[None]:
        """While active, the token embedding at the ``id`` position is the identity vector, row by row."""
        position = int(self.id_position[0])

        def hook(_module: Any, _inputs: Any, output: Any) -> Any:
            out = output.clone()
            out[:, position] = padded
            return out

        handle = self.pipe.text_encoder.get_input_embeddings().register_forward_hook(hook)
        try:
            yield
        finally:
            handle.remove()

    def project(self, vectors: np.ndarray) -> Any:
        """Identity vectors (N, d) -> prompt embeddings (N, L, width), all identities in one encoder call."""
        import torch

        padded = self._padded(vectors)
        ids = self.prompt_ids.expand(padded.shape[0], -1)
        with torch.no_grad(), self._id_token_replaced(padded):
            return self.pipe.text_encoder(ids)[0]

    # -- generation ----------------------------------------------------------------------------------------

    def initial_noise(self, seeds: Sequence[int], height: int, width: int) -> Any:
        """One CPU generator per sample: its noise depends on its seed only, on any device and batch."""
        import torch

        scale = self.pipe.vae_scale_factor
        shape = (1, self.pipe.unet.config.in_channels, height // scale, width // scale)
        noise = [torch.randn(shape, generator=torch.Generator("cpu").manual_seed(int(s))) for s in seeds]
        return torch.cat(noise).to(device=self.pipe.device, dtype=self.pipe.unet.dtype)

    def generate(
        self,
        vectors: np.ndarray,
        seeds: Sequence[int],
        settings: GenerationSettings = GenerationSettings(),
        pose_images: Sequence[np.ndarray] | None = None,
    ) -> np.ndarray:
        """One image per identity vector, as (N, H, W, 3) uint8. ``pose_images`` (RGB) are required when a
        ControlNet is loaded and refused otherwise."""
        import torch
        from PIL import Image

        n = len(seeds)
        if len(vectors) != n:
            raise ValueError(f"{len(vectors)} identity vectors but {n} seeds")
        scale = self.pipe.vae_scale_factor
        if settings.height % scale or settings.width % scale:
            raise ValueError(f"height and width must be multiples of {scale}")
        if self.has_controlnet != (pose_images is not None):
            raise ValueError("pose_images are needed exactly when a ControlNet is loaded")
        kwargs: dict[str, Any] = {}
        if pose_images is not None:
            if len(pose_images) != n:
                raise ValueError(f"{len(pose_images)} pose images for {n} samples")
            kwargs["image"] = [Image.fromarray(np.asarray(p, dtype=np.uint8)) for p in pose_images]
        embeds = self.project(vectors)
        generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
        with torch.no_grad():
            out = self.pipe(
                prompt_embeds=embeds,
                negative_prompt_embeds=self.negative_embeds.expand(n, -1, -1),
                latents=self.initial_noise(seeds, settings.height, settings.width),
                generator=generators,  # only stochastic schedulers (SDE variants) draw from these
                num_inference_steps=settings.steps,
                guidance_scale=settings.guidance,
                height=settings.height,
                width=settings.width,
                output_type="np",
                **kwargs,
            ).images
        return (np.asarray(out) * 255).round().clip(0, 255).astype(np.uint8)


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m facekit.backends.arc2face")
    sub = parser.add_subparsers(dest="command", required=True)
    conv = sub.add_parser("convert", help="write encoder/pytorch_model.bin as model.safetensors beside it")
    conv.add_argument("folder")
    args = parser.parse_args(argv)
    print(convert_bin_to_safetensors(args.folder))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
