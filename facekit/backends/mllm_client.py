"""Client for any OpenAI-compatible chat-completions server (vLLM, SGLang, ...) with structured answers.

One request per (prompt, image): the image goes inline as a base64 data URL and the answer is
constrained by a JSON schema (``response_format: json_schema``, which vLLM and SGLang enforce with
guided decoding). Requests run concurrently up to a limit, time out, and are retried with
exponential backoff on timeouts, connection errors, 429 and 5xx. Answers are cached under the run
directory keyed by (model, prompt, schema, image sha256), so a resumed run never asks twice; a
failed request is not cached and is asked again on resume.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import random
import re
import threading
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from pydantic import Field

from facekit.common import Params, stable_hash

RETRY_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504})
MIME = {"png": "image/png", "jpg": "image/jpeg", "jpeg": "image/jpeg", "webp": "image/webp"}
RAW_LIMIT = 4000  # characters of a raw answer kept in a result (and in an error row's reason)
T = TypeVar("T")


class MLLMServerSpec(Params):
    """Where the server is and how hard to try. The API key is read from an environment variable."""

    base_url: str = Field(
        "http://127.0.0.1:8000/v1", description="the OpenAI-compatible server's /v1 URL (vLLM, SGLang)")
    model: str = Field(description="the model name the server serves")
    revision: str | None = Field(
        None, description=
        "what the server serves (e.g. the weights' HF commit): recorded in lineage and part of the cache key")
    api_key_env: str | None = Field(
        "OPENAI_API_KEY", description="environment variable holding the API key; null: no key sent")
    system_prompt: str | None = Field(None, description="a system message sent before each request")
    max_concurrency: int = Field(8, ge=1, description="requests in flight per worker")
    timeout_s: float = Field(60.0, gt=0, description="seconds one request may take")
    max_retries: int = Field(
        3, ge=0, description=
        "retries of a failed request (connection error, timeout, 5xx, 429) before the shard is retried")
    backoff_s: float = Field(1.0, ge=0, description="first retry delay in seconds; doubles each attempt, with jitter")
    backoff_max_s: float = Field(30.0, ge=0, description="longest retry delay in seconds")
    max_tokens: int = Field(512, ge=1, description="answer length limit")
    temperature: float = Field(0.0, ge=0, description="sampling temperature; 0 for repeatable answers")
    response_format: str = Field(
        "json_schema", pattern="^(json_schema|json_object|none)$", description=
        "json_schema (answers constrained to the questions' schema), json_object or none")


@dataclass(frozen=True)
class Request:
    prompt: str
    image: bytes
    image_ext: str
    schema: dict[str, Any]


@dataclass
class Result:
    """``answer`` when the server answered with JSON matching the schema; else ``error`` (+ ``raw``)."""

    answer: dict[str, Any] | None = None
    raw: str | None = None
    error: str | None = None
    cached: bool = False
    attempts: int = 0
    rule: str | None = None  # the stable rule name of ``error``: unparseable_answer, mllm_request_failed

    @property
    def ok(self) -> bool:
        return self.error is None


class RequestError(Exception):
    """A request the server refused for this sample (a non-retryable status such as 400 or 413)."""


class ServerUnavailable(RuntimeError):
    """The server gave no answer that says anything about the sample: down, connection refused, timed
    out, 5xx, 429 after the client's own bounded retries, or a 401/403/404 (key or endpoint wrong).
    Callers must not record it as the sample's result; the pipeline retries the shard later."""


# Statuses that say the server (or our access to it) is wrong, not the request: retried by the shard.
SERVER_SIDE_STATUS = frozenset({401, 403, 404})


def request_key(model: str, system: str | None, req: Request) -> str:
    """Cache key: what defines the question, never how it was transported."""
    image_sha = hashlib.sha256(req.image).hexdigest()
    return stable_hash({"model": model, "system": system, "prompt": req.prompt, "schema": req.schema,
                        "image_sha256": image_sha}, 32)


def parse_answer(text: str | None, schema: dict[str, Any]) -> dict[str, Any]:
    """JSON object from the answer text (tolerating a ```json fence), validated against ``schema``."""
    import jsonschema

    if text is None:
        raise ValueError("empty answer")
    body = text.strip()
    fenced = re.fullmatch(r"```(?:json)?\s*(.*?)\s*```", body, flags=re.DOTALL)
    if fenced:
        body = fenced.group(1)
    value = json.loads(body)
    if not isinstance(value, dict):
        raise ValueError(f"answer is a JSON {type(value).__name__}, not an object")
    jsonschema.validate(value, schema)
    return value


def finish(raw: str | None, schema: dict[str, Any], attempts: int) -> Result:
    """A Result from an answer text: parsed, or an unparseable-answer error that keeps the raw text."""
    import jsonschema

    try:
        return Result(answer=parse_answer(raw, schema), raw=raw, attempts=attempts)
    except (ValueError, jsonschema.ValidationError) as exc:
        reason = exc.message if isinstance(exc, jsonschema.ValidationError) else str(exc)
        return Result(raw=(raw or "")[:RAW_LIMIT], error=f"unparseable answer ({reason})", attempts=attempts,
                      rule="unparseable_answer")


class ResponseCache:
    """Answers as JSON files under ``<run>/cache/mllm/`` through fsspec; written atomically."""

    def __init__(self, run_dir: str, storage_options: dict[str, Any] | None = None,
                 folder: tuple[str, ...] = ("cache", "mllm")) -> None:
        from manifests.storage import RunStorage

        self.store = RunStorage(run_dir, storage_options)
        self.folder = folder

    def get(self, key: str) -> dict[str, Any] | None:
        try:
            return json.loads(self.store.read_bytes(*self.folder, f"{key}.json"))
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def put(self, key: str, record: dict[str, Any]) -> None:
        data = json.dumps(record, sort_keys=True, ensure_ascii=False).encode()
        self.store.write_atomic(data, *self.folder, f"{key}.json")


def run_sync(make: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run a coroutine from sync code, also when the caller already sits in an event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(make())
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = asyncio.run(make())
        except BaseException as exc:
            box["error"] = exc

    thread = threading.Thread(target=target)
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


class MLLMClient:
    """Asks many (prompt, image) questions concurrently; returns one Result per request, in order."""

    def __init__(self, spec: MLLMServerSpec, cache: ResponseCache | None = None) -> None:
        self.spec = spec
        self.cache = cache

    def _payload(self, req: Request) -> dict[str, Any]:
        url = f"data:{MIME.get(req.image_ext.lower().lstrip('.'), 'image/png')};base64,"
        url += base64.b64encode(req.image).decode()
        messages: list[dict[str, Any]] = []
        if self.spec.system_prompt:
            messages.append({"role": "system", "content": self.spec.system_prompt})
        messages.append({"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url}},
            {"type": "text", "text": req.prompt},
        ]})
        payload: dict[str, Any] = {"model": self.spec.model, "messages": messages,
                                   "max_tokens": self.spec.max_tokens, "temperature": self.spec.temperature}
        if self.spec.response_format == "json_schema":
            payload["response_format"] = {"type": "json_schema", "json_schema": {
                "name": "answer", "schema": req.schema, "strict": True}}
        elif self.spec.response_format == "json_object":
            payload["response_format"] = {"type": "json_object"}
        return payload

    def _headers(self) -> dict[str, str]:
        key = os.environ.get(self.spec.api_key_env, "") if self.spec.api_key_env else ""
        return {"Authorization": f"Bearer {key}"} if key else {}

    def _delay(self, attempt: int, retry_after: str | None) -> float:
        cap = self.spec.backoff_max_s
        if retry_after:
            try:
                return min(float(retry_after), cap)
            except ValueError:
                pass
        base = min(self.spec.backoff_s * (2**attempt), cap)
        return base * (0.5 + random.random() / 2)  # jitter spreads retries of a concurrent batch

    async def _post(self, client: Any, req: Request) -> tuple[str | None, int]:
        """Content of the first choice and the attempts it took. Raises RequestError when the server
        refuses this request, ServerUnavailable when it cannot answer at all (after the retries)."""
        import httpx

        url = self.spec.base_url.rstrip("/") + "/chat/completions"
        payload = self._payload(req)
        last = ""
        for attempt in range(self.spec.max_retries + 1):
            retry_after = None
            try:
                resp = await client.post(url, json=payload, headers=self._headers())
            except httpx.TimeoutException:
                last = f"timed out after {self.spec.timeout_s:g} s"
            except httpx.TransportError as exc:
                last = f"connection error: {type(exc).__name__}: {exc}"
            else:
                if resp.status_code == 200:
                    try:
                        body = resp.json()
                        return body["choices"][0]["message"]["content"], attempt + 1
                    except (ValueError, KeyError, IndexError, TypeError) as exc:
                        raise RequestError(f"malformed response body ({type(exc).__name__}): "
                                           f"{resp.text[:500]!r}") from exc
                last = f"HTTP {resp.status_code}: {resp.text[:300]}"
                if resp.status_code in SERVER_SIDE_STATUS:
                    raise ServerUnavailable(f"{url}: {last}")
                if resp.status_code not in RETRY_STATUS:
                    raise RequestError(last)
                retry_after = resp.headers.get("retry-after")
            if attempt < self.spec.max_retries:
                await asyncio.sleep(self._delay(attempt, retry_after))
        raise ServerUnavailable(f"{url}: gave up after {self.spec.max_retries + 1} attempts; last: {last}")

    async def _ask(self, client: Any, gate: asyncio.Semaphore, req: Request) -> Result:
        model = f"{self.spec.model}@{self.spec.revision}" if self.spec.revision else self.spec.model
        key = request_key(model, self.spec.system_prompt, req)
        if self.cache is not None:  # file IO off the event loop: on object stores it is slow
            hit = await asyncio.to_thread(self.cache.get, key)
            if hit is not None:
                result = finish(hit.get("raw"), req.schema, 0)
                result.cached = True
                return result
        async with gate:
            try:
                raw, attempts = await self._post(client, req)
            except RequestError as exc:
                return Result(error=f"mllm request failed: {exc}", rule="mllm_request_failed")
        if self.cache is not None:
            record = {"model": self.spec.model, "prompt": req.prompt, "raw": raw}
            await asyncio.to_thread(self.cache.put, key, record)
        return finish(raw, req.schema, attempts)

    async def ask_async(self, requests: Sequence[Request]) -> list[Result]:
        import httpx

        limits = httpx.Limits(max_connections=self.spec.max_concurrency)
        gate = asyncio.Semaphore(self.spec.max_concurrency)
        async with httpx.AsyncClient(timeout=self.spec.timeout_s, limits=limits) as client:
            # Every request runs to its end (answers are cached) before one that found the server
            # unavailable fails the batch: the retried shard then asks only what is still open.
            results = await asyncio.gather(*(self._ask(client, gate, r) for r in requests), return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException):
                raise r
        return [r for r in results if isinstance(r, Result)]

    def ask(self, requests: Sequence[Request]) -> list[Result]:
        return run_sync(lambda: self.ask_async(requests))


def check_server(spec: MLLMServerSpec, timeout_s: float = 5.0) -> list[str]:
    """Problems reaching the server or finding the model in its ``/models`` list. For ``doctor``."""
    import httpx

    url = spec.base_url.rstrip("/") + "/models"
    headers = MLLMClient(spec)._headers()
    try:
        resp = httpx.get(url, headers=headers, timeout=timeout_s)
    except httpx.HTTPError as exc:
        return [f"mllm server {url}: unreachable ({type(exc).__name__}: {exc}); start it or fix base_url"]
    if resp.status_code in (401, 403):
        var = spec.api_key_env
        key = (f"{var} is {'set but refused' if os.environ.get(var) else 'not set'} here: export {var}=<the server's "
               f"key> on every node") if var else "server.api_key_env is null, so no key is sent: name the variable"
        return [f"mllm server {url}: HTTP {resp.status_code}, the server wants an API key; {key}"]
    if resp.status_code != 200:
        return [f"mllm server {url}: HTTP {resp.status_code} {resp.text[:200]}"]
    try:
        served = [m["id"] for m in resp.json()["data"]]
    except (ValueError, KeyError, TypeError):
        return [f"mllm server {url}: /models answered something that is not an OpenAI model list"]
    if spec.model not in served:
        return [f"mllm server {url} does not serve model {spec.model!r}; it serves {served}"]
    return []


__all__ = ["MLLMClient", "MLLMServerSpec", "Request", "ResponseCache", "Result", "check_server", "finish",
           "request_key"]
