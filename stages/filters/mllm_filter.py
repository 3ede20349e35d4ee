"""Stage "mllm_filter": ask a multimodal LLM questions about each image; store answers, apply pass rules.

All questions about one image go in one request whose JSON schema has one property per question,
so the image is encoded (and paid for in tokens) once. A question without a pass rule is a label:
its answer is stored and never drops a sample. Nothing is lost: an image that does not decode, a
request the server refuses for this sample and an answer that does not parse each give an error
row whose reason is a rule (the decoder's, ``mllm_request_failed``, ``unparseable_answer``) and whose
detail says what, with the raw answer text where there was one. A server that cannot answer at all
(down, connection refused, timeouts, 5xx, 429 after the client's own retries) says nothing about the
samples: the stage raises TransientError, nothing is recorded, and the engine retries the shard
(answers already received are cached, so the retry asks only what is still open). A failed pass
rule drops the sample with the rule ``mllm_<question>_failed``.
"""

from __future__ import annotations

import io
from typing import Any, ClassVar, Literal

import pyarrow as pa
from pydantic import Field, model_validator

from facekit.backends.mllm_client import (
    MLLMClient,
    MLLMServerSpec,
    Request,
    ResponseCache,
    Result,
    ServerUnavailable,
    check_server,
)
from facekit.backends.vlm_local import LocalVLMSpec
from facekit.imaging import ImageError, decode
from manifests.transient import is_transient
from stages.base import (
    IMAGE,
    IMAGE_EXT,
    SAMPLE_ID,
    Batch,
    FilterStage,
    ModelInfo,
    Params,
    Resources,
    Rows,
    TransientError,
)

DEFAULT_INSTRUCTIONS = (
    "You check images for a face dataset. Look at the image and answer every question. "
    "Reply with one JSON object whose keys are the question names."
)
ARROW_TYPES = {"boolean": pa.bool_(), "integer": pa.int32(), "choice": pa.string(), "text": pa.string()}


class Question(Params):
    """One question. Pass rules by type: ``pass_if`` (boolean), ``min_score`` (integer),
    ``pass_values`` (choice); none set means the answer is a label only."""

    name: str = Field(pattern=r"^[a-z][a-z0-9_]*$", description="the answer's key and column (mllm_<name>)")
    prompt: str = Field(description="the question asked about the image")
    type: Literal["boolean", "integer", "choice", "text"] = Field(
        "boolean", description="answer type: boolean, integer (min..max), choice (one of choices) or text")
    choices: tuple[str, ...] = Field((), description="the answers a choice question allows")
    min: int = Field(1, description="lowest answer of an integer question")
    max: int = Field(5, description="highest answer of an integer question")
    pass_if: bool | None = Field(None, description="boolean questions: the answer that passes")
    min_score: int | None = Field(None, description="integer questions: the lowest answer that passes")
    pass_values: tuple[str, ...] = Field((), description="choice questions: the answers that pass")

    @model_validator(mode="after")
    def _consistent(self) -> Question:
        if self.type == "choice" and not self.choices:
            raise ValueError(f"question {self.name!r}: type choice needs choices")
        if self.pass_if is not None and self.type != "boolean":
            raise ValueError(f"question {self.name!r}: pass_if is for boolean questions")
        if self.min_score is not None and self.type != "integer":
            raise ValueError(f"question {self.name!r}: min_score is for integer questions")
        if self.pass_values and (self.type != "choice" or not set(self.pass_values) <= set(self.choices)):
            raise ValueError(f"question {self.name!r}: pass_values must be a subset of its choices")
        return self

    def answer_schema(self) -> dict[str, Any]:
        if self.type == "boolean":
            return {"type": "boolean"}
        if self.type == "integer":
            return {"type": "integer", "minimum": self.min, "maximum": self.max}
        if self.type == "choice":
            return {"type": "string", "enum": list(self.choices)}
        return {"type": "string"}

    def hint(self) -> str:
        return {"boolean": "true or false", "integer": f"an integer from {self.min} to {self.max}",
                "choice": "one of: " + ", ".join(self.choices), "text": "a short text"}[self.type]

    def verdict(self, value: Any) -> str | None:
        """None when the answer passes (or there is no rule); else the reason."""
        if self.pass_if is not None and value is not self.pass_if:
            return f"mllm {self.name}={str(value).lower()} (want {str(self.pass_if).lower()})"
        if self.min_score is not None and value < self.min_score:
            return f"mllm {self.name}={value} < {self.min_score}"
        if self.pass_values and value not in self.pass_values:
            return f"mllm {self.name}={value} not in {list(self.pass_values)}"
        return None


class MLLMFilterParams(Params):
    backend: Literal["server", "local"] = Field(
        "server", description="server: an OpenAI-compatible server; local: a transformers VLM in the worker")
    server: MLLMServerSpec | None = Field(None, description="the server to ask (backend: server)")
    local: LocalVLMSpec | None = Field(None, description="the local model (backend: local)")
    instructions: str = Field(DEFAULT_INSTRUCTIONS, description="text sent before the questions")
    questions: tuple[Question, ...] = Field(
        min_length=1, description="questions asked about every image; each answer is a column")
    max_side: int | None = Field(
        1024, ge=32, description="larger images are downscaled to this side before sending; null: sent as they are")
    cache: bool = Field(
        True, description="cache answers in the run directory, keyed by image, model, revision and questions")

    @model_validator(mode="after")
    def _backend_given(self) -> MLLMFilterParams:
        if getattr(self, self.backend) is None:
            raise ValueError(f"backend {self.backend!r} needs a {self.backend!r} block")
        names = [q.name for q in self.questions]
        if len(set(names)) != len(names):
            raise ValueError(f"question names must be unique, got {names}")
        return self


def build_prompt(instructions: str, questions: tuple[Question, ...]) -> str:
    lines = [instructions, ""] + [f"- {q.name}: {q.prompt} (answer {q.hint()})" for q in questions]
    return "\n".join(lines)


def build_schema(questions: tuple[Question, ...]) -> dict[str, Any]:
    return {"type": "object", "properties": {q.name: q.answer_schema() for q in questions},
            "required": [q.name for q in questions], "additionalProperties": False}


def prepare_image(data: bytes, ext: str, max_side: int | None) -> tuple[bytes, str]:
    """Check the bytes decode; send them as they are when any decoder shows them as the stages saw
    them (plain RGB, no orientation to apply) and they fit ``max_side``, else a PNG of the decoded
    pixels: a server's own decode would not turn an EXIF-rotated photo or scale a 16-bit one."""
    from PIL import Image

    decoded = decode(data)
    rgb = decoded.rgb
    h, w = rgb.shape[:2]
    if max_side is None or max(h, w) <= max_side:
        if decoded.as_stored:
            return data, ext
        img = Image.fromarray(rgb)
    else:
        scale = max_side / max(h, w)
        img = Image.fromarray(rgb).resize((max(1, round(w * scale)), max(1, round(h * scale))),
                                          Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)
    return buf.getvalue(), "png"


class MLLMFilterStage(FilterStage):
    """Asks a multimodal LLM questions about each image, stores the answers and applies their pass rules."""

    name: ClassVar[str] = "mllm_filter"
    version: ClassVar[str] = "1"
    params_model: ClassVar[type[Params]] = MLLMFilterParams
    resources: ClassVar[Resources] = Resources(cpus=0.5)  # server backend: waits on the network
    batch_size: ClassVar[int] = 32
    params: MLLMFilterParams

    @classmethod
    def doctor(cls, params: Params) -> list[str]:
        """Server: reachable and serving the model; local: weights found. Loads nothing."""
        assert isinstance(params, MLLMFilterParams)
        if params.backend == "server":
            assert params.server is not None
            return check_server(params.server)
        from facekit.backends.vlm_local import check_files

        assert params.local is not None
        return check_files(params.local)

    def output_fields(self) -> tuple[pa.Field, ...]:
        cols = [pa.field(f"mllm_{q.name}", ARROW_TYPES[q.type]) for q in self.params.questions]
        return (*cols, pa.field("mllm_raw", pa.string()))

    def setup(self) -> None:
        p = self.params
        cache = ResponseCache(self.context.run_dir, self.context.storage_options) if p.cache else None
        if p.backend == "server":
            assert p.server is not None
            self.asker: Any = MLLMClient(p.server, cache)
            self._info = ModelInfo(name=f"openai-compatible:{p.server.model}",
                                   revision=p.server.revision or "")
        else:
            from facekit.backends.vlm_local import LocalVLM

            assert p.local is not None
            self.asker = LocalVLM(p.local, cache)
            self._info = self.asker.model_info()
        self.prompt = build_prompt(p.instructions, p.questions)
        self.schema = build_schema(p.questions)

    def model_info(self) -> ModelInfo:
        return self._info

    def process(self, batch: Batch) -> Batch:
        n = len(batch[SAMPLE_ID])
        exts = batch.get(IMAGE_EXT) or ["png"] * n
        results: list[Result | None] = [None] * n
        requests, where = [], []
        for i in range(n):
            try:
                data, ext = prepare_image(batch[IMAGE][i], exts[i] or "png", self.params.max_side)
            except ImageError as exc:
                results[i] = Result(error=exc.detail, rule=exc.rule)
                continue
            requests.append(Request(self.prompt, data, ext, self.schema))
            where.append(i)
        try:
            answers = self.asker.ask(requests)
        except ServerUnavailable as exc:
            raise TransientError(f"mllm server unavailable: {exc}") from exc
        except OSError as exc:  # the answer cache lives in the run directory: a storage 5xx is no answer
            if is_transient(exc):
                raise TransientError(f"mllm answer cache: {type(exc).__name__}: {exc}") from exc
            raise
        for i, result in zip(where, answers, strict=True):
            results[i] = result
        return self._rows(batch[SAMPLE_ID], results)  # type: ignore[arg-type]

    def _rows(self, sample_ids: list[str], results: list[Result]) -> Batch:
        rows = Rows(sample_ids, [f.name for f in self.output_fields()])
        for i, r in enumerate(results):
            answer = r.answer or {}
            for q in self.params.questions:
                rows.set(i, **{f"mllm_{q.name}": answer.get(q.name)})
            rows.set(i, mllm_raw=r.raw)
            if not r.ok:
                detail = r.error if r.raw is None else f"{r.error}; raw answer: {r.raw!r}"
                rows.fail(i, r.rule or "mllm_error", detail)
                continue
            failed = [(q, v) for q in self.params.questions if (v := q.verdict(answer[q.name]))]
            if failed:
                rows.drop(i, f"mllm_{failed[0][0].name}_failed", "; ".join(v for _, v in failed))
        return rows.batch()


__all__ = ["MLLMFilterParams", "MLLMFilterStage", "Question", "build_prompt", "build_schema"]
