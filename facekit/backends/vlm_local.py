"""Local transformers VLM backend for the MLLM filter: same requests, results and cache as the server.

Any model ``AutoModelForImageTextToText`` knows (Qwen2.5-VL, LLaVA, SmolVLM, ...) loads from a local
folder or the Hugging Face cache, safetensors only. There is no guided decoding here, so the JSON
schema is spelled out in the prompt and an answer that does not match it is an error row, exactly
as with a server. Decoding is greedy, so a rerun on the same hardware gives the same answers.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from facekit.backends.mllm_client import Request, ResponseCache, Result, finish, request_key
from facekit.common import ModelInfo, Params

WEIGHT_GLOBS = ("*.safetensors",)


class LocalVLMSpec(Params):
    model: str = Field(description="a local folder, or a Hub repo id found in the HF cache")
    revision: str | None = Field(None, description="Hub revision to load (and record in lineage)")
    allow_download: bool = Field(
        False, description="let transformers download the model; off: local files and the HF cache only")
    device: str = Field("auto", description="'auto': cuda when available, else cpu")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto", description="weights' dtype; auto: the checkpoint's own")
    max_new_tokens: int = Field(256, ge=1, description="answer length limit")
    batch_size: int = Field(4, ge=1, description="images per generate call")


def model_revision(folder: Path) -> str:
    """Digest of config.json and the weight files' names and sizes: hashing tens of GB of weights
    on every worker start is too slow, and a swapped checkpoint changes these in practice."""
    digest = hashlib.sha256()
    config = folder / "config.json"
    if config.is_file():
        digest.update(config.read_bytes())
    for pattern in WEIGHT_GLOBS:
        for path in sorted(folder.glob(pattern)):
            digest.update(f"{path.name}:{path.stat().st_size}".encode())
    return digest.hexdigest()[:16]


def check_files(spec: LocalVLMSpec | Mapping[str, Any]) -> list[str]:
    """Problems that would stop loading offline (empty: loadable). For ``doctor``."""
    spec = spec if isinstance(spec, LocalVLMSpec) else LocalVLMSpec.model_validate(dict(spec))
    try:
        _resolve(spec)
    except FileNotFoundError as exc:
        return [str(exc)]
    return []


def _resolve(spec: LocalVLMSpec) -> str:
    """A local folder holding config.json and safetensors weights, or the repo id when downloading."""
    folder = Path(spec.model).expanduser()
    if folder.is_dir():
        if not (folder / "config.json").is_file() or not any(folder.glob("*.safetensors")):
            raise FileNotFoundError(f"local VLM folder {folder} needs config.json and *.safetensors weights")
        return str(folder)
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError

    try:
        hit = try_to_load_from_cache(spec.model, "config.json", revision=spec.revision)
    except HFValidationError:  # a path that does not exist, not a repo id
        raise FileNotFoundError(f"local VLM folder {folder} does not exist") from None
    if isinstance(hit, str):
        return str(Path(hit).parent)
    if spec.allow_download:
        return spec.model
    raise FileNotFoundError(f"local VLM {spec.model!r}: not a folder and not in the Hugging Face cache; run "
                            f"`hf download {spec.model}` on a machine with network access, "
                            "point model at a local folder, or set allow_download")


class LocalVLM:
    """Answers Requests with a transformers VLM, batch by batch; cached like the server client."""

    def __init__(self, spec: LocalVLMSpec | Mapping[str, Any], cache: ResponseCache | None = None) -> None:
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.spec = spec if isinstance(spec, LocalVLMSpec) else LocalVLMSpec.model_validate(dict(spec))
        self.cache = cache
        source = _resolve(self.spec)
        offline = not self.spec.allow_download
        self.device = ("cuda" if torch.cuda.is_available() else "cpu") if self.spec.device == "auto" \
            else self.spec.device
        self.processor = AutoProcessor.from_pretrained(source, revision=self.spec.revision,
                                                       local_files_only=offline)
        self.processor.tokenizer.padding_side = "left"  # decoder-only generation pads on the left
        model: Any = AutoModelForImageTextToText.from_pretrained(
            source, revision=self.spec.revision, local_files_only=offline, use_safetensors=True,
            dtype=self.spec.dtype if self.spec.dtype == "auto" else getattr(torch, self.spec.dtype),
        )
        self.model = model.to(self.device).eval()
        self.revision = model_revision(Path(source)) if Path(source).is_dir() else (self.spec.revision or "")
        self.cache_model = f"local:{self.spec.model}@{self.revision}"

    def model_info(self) -> ModelInfo:
        return ModelInfo(name=f"transformers:{self.spec.model}", revision=self.revision)

    def _prompt(self, req: Request) -> str:
        text = f"{req.prompt}\nReply with JSON matching this schema: {json.dumps(req.schema)}"
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
        return self.processor.apply_chat_template(messages, add_generation_prompt=True)

    def _generate(self, reqs: Sequence[Request]) -> list[str]:
        import torch
        from PIL import Image

        from facekit.imaging import decode_rgb

        images = [Image.fromarray(decode_rgb(r.image)) for r in reqs]
        inputs = self.processor(images=images, text=[self._prompt(r) for r in reqs], return_tensors="pt",
                                padding=True).to(self.device)
        with torch.inference_mode():
            out = self.model.generate(**inputs, max_new_tokens=self.spec.max_new_tokens, do_sample=False)
        new = out[:, inputs["input_ids"].shape[1]:]
        return self.processor.batch_decode(new, skip_special_tokens=True)

    def ask(self, requests: Sequence[Request]) -> list[Result]:
        results: list[Result | None] = [None] * len(requests)
        todo = []
        for i, req in enumerate(requests):
            hit = self.cache.get(request_key(self.cache_model, None, req)) if self.cache else None
            if hit is not None:
                results[i] = finish(hit.get("raw"), req.schema, 0)
                results[i].cached = True  # type: ignore[union-attr]
            else:
                todo.append(i)
        for start in range(0, len(todo), self.spec.batch_size):
            chunk = todo[start : start + self.spec.batch_size]
            try:
                texts = self._generate([requests[i] for i in chunk])
            except (RuntimeError, ValueError) as exc:  # e.g. CUDA OOM: those rows fail, the batch goes on
                for i in chunk:
                    results[i] = Result(error=f"local VLM failed: {type(exc).__name__}: {exc}")
                continue
            for i, text in zip(chunk, texts, strict=True):
                if self.cache is not None:
                    self.cache.put(request_key(self.cache_model, None, requests[i]),
                                   {"model": self.cache_model, "prompt": requests[i].prompt, "raw": text})
                results[i] = finish(text, requests[i].schema, 1)
        return results  # type: ignore[return-value]
