"""The MLLM filter against a protocol-level OpenAI-compatible server on 127.0.0.1, and a tiny local VLM.

The server speaks the chat-completions wire format and answers from the image it receives (bright
images are "real faces"), so decisions are real; its failure modes (500s, hangs, malformed bodies,
prose instead of JSON) are switched per test. Every test checks that no sample is lost.
"""

from __future__ import annotations

import base64
import io
import json
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image
from pydantic import ValidationError

from facekit.backends.mllm_client import MLLMServerSpec, check_server, parse_answer
from facekit.backends.vlm_local import check_files as vlm_check_files
from facekit.imaging import encode_png
from pipeline.engine.execution import StageSpec, build_manifest, process_isolated
from stages.base import STATUS_ERROR, STATUS_OK, Batch, Stage, StageContext, TransientError
from stages.filters.mllm_filter import MLLMFilterParams, MLLMFilterStage, Question

QUESTIONS = [
    {"name": "real_face", "prompt": "Is there one real human face?", "type": "boolean", "pass_if": True},
    {"name": "quality", "prompt": "Rate the image quality.", "type": "integer", "min": 1, "max": 5},
]
Reply = tuple[int, bytes] | None  # None: hang until the test ends
Behaviour = Callable[[int, dict[str, Any]], Reply]


def brightness(payload: dict[str, Any]) -> float:
    url = payload["messages"][-1]["content"][0]["image_url"]["url"]
    data = base64.b64decode(url.split(",", 1)[1])
    return float(np.asarray(Image.open(io.BytesIO(data)).convert("L")).mean())


def completion(content: str) -> tuple[int, bytes]:
    message = {"role": "assistant", "content": content}
    body = {"id": "x", "object": "chat.completion", "model": "m",
            "choices": [{"index": 0, "finish_reason": "stop", "message": message}]}
    return 200, json.dumps(body).encode()


def honest(payload: dict[str, Any]) -> Reply:
    level = brightness(payload)
    return completion(json.dumps({"real_face": level > 100, "quality": 4 if level > 100 else 2}))


class FakeServer:
    """Records every request; ``behaviour(n, payload)`` picks the reply to the n-th request (0-based).
    With ``api_key``, a model list asked for without that bearer key is answered 401."""

    def __init__(self, behaviour: Behaviour, port: int = 0, api_key: str | None = None) -> None:
        self.behaviour = behaviour
        self.requests: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        self.release = threading.Event()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with outer.lock:
                    n = len(outer.requests)
                    outer.requests.append({"path": self.path, **payload})
                reply = outer.behaviour(n, payload)
                if reply is None:
                    outer.release.wait(30)
                    return
                status, body = reply
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except OSError:
                    pass

            def do_GET(self) -> None:
                models = {"object": "list", "data": [{"id": "test-vlm", "object": "model"}]}
                body = json.dumps(models).encode()
                allowed = api_key is None or self.headers.get("Authorization") == f"Bearer {api_key}"
                self.send_response(404 if self.path != "/v1/models" else 200 if allowed else 401)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        ThreadingHTTPServer.allow_reuse_address = True
        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def close(self) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


Serve = Callable[..., FakeServer]


@pytest.fixture
def serve() -> Iterator[Serve]:
    servers: list[FakeServer] = []

    def start(behaviour: Behaviour, port: int = 0, api_key: str | None = None) -> FakeServer:
        servers.append(FakeServer(behaviour, port, api_key))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


def make_batch(levels: list[int], extra: dict[str, bytes] | None = None) -> Batch:
    ids = [f"s{i}" for i in range(len(levels))]
    images = [encode_png(np.full((48, 40, 3), v, np.uint8)) for v in levels]
    for sid, data in (extra or {}).items():
        ids.append(sid)
        images.append(data)
    n = len(ids)
    return {"sample_id": ids, "key": ids, "identity_id": ["id0"] * n, "parent_id": [None] * n,
            "image": images, "image_ext": ["png"] * n}


def manifest(stage: Stage, batch: Batch) -> pa.Table:
    """The stage's rows as the runner commits them (its own code, no Ray): proves the schema fits."""
    spec = StageSpec(stage_id=stage.context.stage_id, cls=type(stage), params=stage.params, batch_size=64,
                     fingerprint="f", params_hash="p", upstream=(), context=stage.context)
    out = process_isolated(stage, batch)
    return build_manifest(spec, stage, "000000", out, None, None, {}, "test", [])


def make_stage(run_dir: Path, url: str, **server: Any) -> MLLMFilterStage:
    spec = {"base_url": url, "model": "test-vlm", "backoff_s": 0.01, "max_concurrency": 3, **server}
    params = MLLMFilterParams.model_validate({"server": spec, "questions": QUESTIONS})
    stage = MLLMFilterStage(params, StageContext(run_dir=str(run_dir), stage_id="mllm", seed=0))
    stage.setup()
    return stage


def test_answers_are_stored_and_pass_rules_decide_with_a_reason(serve: Serve, tmp_path: Path) -> None:
    server = serve(lambda n, p: honest(p))
    batch = make_batch([200, 30, 220], extra={"broken": b"not an image"})
    out = make_stage(tmp_path, server.url).process(batch)
    assert out["sample_id"] == batch["sample_id"]
    assert out["status"] == [STATUS_OK, STATUS_OK, STATUS_OK, STATUS_ERROR]
    assert out["keep"] == [True, False, True, False]
    assert out["reason"][1] == "mllm_real_face_failed" and out["detail"][1] == "mllm real_face=false (want true)"
    assert out["reason"][3] == "not_an_image"
    assert out["mllm_real_face"][:3] == [True, False, True] and out["mllm_quality"][:3] == [4, 2, 4]
    assert len(server.requests) == 3  # the broken image was never sent
    req = server.requests[0]
    assert req["path"] == "/v1/chat/completions" and req["model"] == "test-vlm"
    schema = req["response_format"]["json_schema"]["schema"]
    assert req["response_format"]["type"] == "json_schema" and schema["required"] == ["real_face", "quality"]
    assert req["messages"][-1]["content"][0]["image_url"]["url"].startswith("data:image/png;base64,")
    table = manifest(make_stage(tmp_path, server.url), batch)  # answers come from the cache now
    quality = table.column("mllm_quality")
    assert quality.type == pa.int32() and quality.to_pylist()[:3] == [4, 2, 4]
    assert table.column("status").to_pylist() == out["status"] and len(server.requests) == 3


def test_a_16_bit_or_turned_image_reaches_the_server_as_the_pixels_the_stages_saw(serve: Serve,
                                                                                  tmp_path: Path) -> None:
    server = serve(lambda n, p: honest(p))
    grey16, turned = io.BytesIO(), io.BytesIO()
    Image.fromarray(np.full((48, 40), 60 * 257, np.uint16)).save(grey16, format="PNG")  # decoders that clip: white
    top_dark = np.full((40, 48, 3), 240, np.uint8)
    top_dark[:20] = 10
    exif = Image.Exif()
    exif[0x0112] = 6  # stored a quarter turn away: the dark half is on the right until turned
    Image.fromarray(top_dark).transpose(Image.Transpose.ROTATE_90).save(turned, format="PNG", exif=exif)
    plain = make_batch([200])
    batch = make_batch([], extra={"grey16": grey16.getvalue(), "turned": turned.getvalue(), "plain": plain["image"][0]})
    make_stage(tmp_path, server.url).process(batch)
    sent = [base64.b64decode(req["messages"][-1]["content"][0]["image_url"]["url"].split(",", 1)[1])
            for req in server.requests]
    assert bytes(plain["image"][0]) in sent  # plain RGB goes as it is
    # A server's own decode (here PIL's, which neither turns nor scales) sees the stages' pixels.
    seen = sorted((np.asarray(Image.open(io.BytesIO(d)).convert("L")) for d in sent), key=lambda v: float(v.mean()))
    assert [round(float(v.mean())) for v in seen] == [60, 125, 200]
    assert seen[1].shape == (40, 48) and seen[1][:20].mean() < 20 < 230 < seen[1][20:].mean()


def test_a_500_is_retried_with_backoff_until_the_server_answers(serve: Serve, tmp_path: Path) -> None:
    server = serve(lambda n, p: (500, b"overloaded") if n < 2 else honest(p))
    out = make_stage(tmp_path, server.url, max_retries=3).process(make_batch([200, 200, 30]))
    assert out["status"] == [STATUS_OK] * 3 and out["keep"] == [True, True, False]
    assert len(server.requests) == 3 + 2


def test_a_server_that_keeps_failing_raises_transient_error_after_its_retries_and_records_nothing(
    serve: Serve, tmp_path: Path
) -> None:
    server = serve(lambda n, p: (500, b"internal error"))
    with pytest.raises(TransientError, match=r"gave up after 3 attempts.*HTTP 500: internal error"):
        make_stage(tmp_path, server.url, max_retries=2).process(make_batch([200, 30]))
    assert len(server.requests) == 2 * 3
    assert not list(tmp_path.glob("cache/mllm/*.json"))  # no failure is cached as an answer


@pytest.mark.parametrize("status", [429, 503])
def test_a_throttling_or_unavailable_server_raises_transient_error_and_the_retried_shard_completes(
    serve: Serve, tmp_path: Path, status: int
) -> None:
    up = threading.Event()
    server = serve(lambda n, p: honest(p) if up.is_set() else (status, b"come back later"))
    stage = make_stage(tmp_path, server.url, max_retries=1)
    batch = make_batch([200, 30, 220])
    with pytest.raises(TransientError, match=f"HTTP {status}"):
        stage.process(batch)
    up.set()
    table = manifest(stage, batch)  # the engine's retry of the shard, committed as the runner does
    assert table.column("status").to_pylist() == [STATUS_OK] * 3
    assert table.column("keep").to_pylist() == [True, False, True]


def test_a_server_that_is_down_raises_transient_error_then_the_shard_completes_when_it_is_back(
    serve: Serve, tmp_path: Path
) -> None:
    first = serve(lambda n, p: honest(p))
    port = first.httpd.server_address[1]
    first.close()  # connection refused from now on
    stage = make_stage(tmp_path, first.url, max_retries=1)
    batch = make_batch([200, 30])
    with pytest.raises(TransientError, match="connection error"):
        stage.process(batch)
    assert not list(tmp_path.glob("cache/mllm/*.json"))
    back = serve(lambda n, p: honest(p), port)
    table = manifest(stage, batch)
    assert table.column("status").to_pylist() == [STATUS_OK] * 2 and len(back.requests) == 2
    assert table.column("reason").to_pylist() == [None, "mllm_real_face_failed"]


def test_a_client_error_is_not_retried(serve: Serve, tmp_path: Path) -> None:
    server = serve(lambda n, p: (400, b'{"error": "model does not support images"}'))
    out = make_stage(tmp_path, server.url, max_retries=3).process(make_batch([200]))
    assert out["status"] == [STATUS_ERROR] and out["reason"] == ["mllm_request_failed"]
    assert "HTTP 400" in out["detail"][0]
    assert len(server.requests) == 1


def test_a_server_that_times_out_raises_transient_error_and_keeps_the_answers_it_gave(
    serve: Serve, tmp_path: Path
) -> None:
    server = serve(lambda n, p: None if brightness(p) < 100 else honest(p))
    with pytest.raises(TransientError, match=r"gave up after 2 attempts; last: timed out after 0.3 s"):
        make_stage(tmp_path, server.url, timeout_s=0.3, max_retries=1).process(make_batch([200, 30, 220]))
    assert len(list(tmp_path.glob("cache/mllm/*.json"))) == 2  # the retried shard asks only the third


def test_a_malformed_json_answer_is_an_error_row_holding_the_raw_text(serve: Serve, tmp_path: Path) -> None:
    def behaviour(n: int, p: dict[str, Any]) -> Reply:
        level = brightness(p)
        if level < 50:
            return completion("Sure! The face looks real to me.")
        if level < 150:
            return completion('{"real_face": "yes", "quality": 4}')  # JSON, but not the schema
        if level < 210:
            return 200, b'{"choices": [{"message": {"content": "{\\"real_face\\": tr'  # truncated body
        return completion('```json\n{"real_face": true, "quality": 5}\n```')

    server = serve(behaviour)
    out = make_stage(tmp_path, server.url).process(make_batch([30, 100, 180, 240]))
    assert out["status"] == [STATUS_ERROR, STATUS_ERROR, STATUS_ERROR, STATUS_OK]
    assert out["reason"][:3] == ["unparseable_answer", "unparseable_answer", "mllm_request_failed"]
    assert "Sure! The face looks real to me." in out["detail"][0]
    assert "'yes' is not of type 'boolean'" in out["detail"][1]
    assert "malformed response body" in out["detail"][2]
    assert out["mllm_quality"][3] == 5


def test_a_resumed_run_does_not_ask_answered_questions_again(serve: Serve, tmp_path: Path) -> None:
    def flaky(n: int, p: dict[str, Any]) -> Reply:
        level = brightness(p)
        if level < 50:
            return 503, b"busy"
        if level < 150:
            return completion("no idea")
        return honest(p)

    levels = [200, 30, 100, 220, 35]
    first_server = serve(flaky)
    with pytest.raises(TransientError, match="HTTP 503"):
        make_stage(tmp_path, first_server.url, max_retries=0).process(make_batch(levels))
    assert len(list((tmp_path / "cache" / "mllm").glob("*.json"))) == 3  # answers, not failures

    second_server = serve(lambda n, p: honest(p))
    second = make_stage(tmp_path, second_server.url).process(make_batch(levels))
    assert len(second_server.requests) == 2  # only the two failed requests are asked again
    assert sorted(brightness(r) for r in second_server.requests) == [30.0, 35.0]
    assert second["status"] == [STATUS_OK, STATUS_OK, STATUS_ERROR, STATUS_OK, STATUS_OK]
    assert second["reason"][2] == "unparseable_answer" and "no idea" in second["detail"][2]  # cached, not re-asked
    assert second["mllm_quality"][0] == second["mllm_quality"][3] == 4

    third_server = serve(lambda n, p: honest(p))
    make_stage(tmp_path, third_server.url).process(make_batch(levels))
    assert third_server.requests == []


def test_doctor_check_names_an_unserved_model_and_an_unreachable_server(serve: Serve) -> None:
    server = serve(lambda n, p: honest(p))
    assert check_server(MLLMServerSpec(base_url=server.url, model="test-vlm")) == []
    params = MLLMFilterParams.model_validate({"server": {"base_url": server.url, "model": "test-vlm"},
                                              "questions": QUESTIONS})
    assert MLLMFilterStage.doctor(params) == []
    (wrong,) = check_server(MLLMServerSpec(base_url=server.url, model="other"))
    assert "does not serve model 'other'" in wrong and "test-vlm" in wrong
    port = server.httpd.server_address[1]
    server.close()
    (down,) = check_server(MLLMServerSpec(base_url=f"http://127.0.0.1:{port}/v1", model="test-vlm"))
    assert "unreachable" in down


def test_doctor_check_names_the_api_key_variable_a_keyed_server_wants(serve: Serve,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    server = serve(lambda n, p: honest(p), api_key="sekret")
    spec = MLLMServerSpec(base_url=server.url, model="test-vlm", api_key_env="FF_TEST_VLM_KEY")
    monkeypatch.delenv("FF_TEST_VLM_KEY", raising=False)
    (missing,) = check_server(spec)
    assert "HTTP 401" in missing and "FF_TEST_VLM_KEY is not set" in missing and "export FF_TEST_VLM_KEY=" in missing
    monkeypatch.setenv("FF_TEST_VLM_KEY", "sekret")
    assert check_server(spec) == []


def test_parse_answer_accepts_a_fenced_object_and_refuses_other_json() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    assert parse_answer('```json\n{"a": 1}\n```', schema) == {"a": 1}
    with pytest.raises(ValueError, match="not an object"):
        parse_answer("[1, 2]", schema)


def test_question_rules_are_checked_against_the_question_type() -> None:
    with pytest.raises(ValidationError, match="subset of its choices"):
        Question(name="hair", prompt="Hair colour?", type="choice", choices=("black", "blond"),
                 pass_values=("red",))
    with pytest.raises(ValidationError, match="pass_if is for boolean"):
        Question(name="q", prompt="Score?", type="integer", pass_if=True)
    with pytest.raises(ValidationError, match="needs a 'server' block"):
        MLLMFilterParams.model_validate({"questions": QUESTIONS})


# ---------------------------------------------------------------- local transformers VLM


def build_tiny_llava(folder: Path) -> Path:
    """A random-weight LLaVA (CLIP vision tower + Llama) with a locally trained byte-level BPE
    tokenizer and a chat template, saved the way released checkpoints are."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        PreTrainedTokenizerFast,
    )

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<s>", "</s>", "<image>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(['{"real_face": true, "quality": 4}', "Is there one real human face?"], trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                        eos_token="</s>", extra_special_tokens={"image_token": "<image>"})
    template = ("{% for m in messages %}{{ m['role'] }}: {% for c in m['content'] %}"
                "{% if c['type'] == 'image' %}<image>{% else %}{{ c['text'] }}{% endif %}{% endfor %}\n"
                "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}")
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=tokenizer, patch_size=8, vision_feature_select_strategy="default", chat_template=template,
        num_additional_image_tokens=1)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                       num_attention_heads=2, image_size=32, patch_size=8),
        text_config=LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=32, intermediate_size=64,
                                num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                max_position_embeddings=512, pad_token_id=0, bos_token_id=1, eos_token_id=2),
        image_token_index=tok.token_to_id("<image>"), image_seq_length=16, vision_feature_layer=-1)
    torch.manual_seed(0)
    LlavaForConditionalGeneration(config).save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def test_local_vlm_loads_a_saved_checkpoint_and_never_loses_a_sample(tmp_path: Path) -> None:
    folder = build_tiny_llava(tmp_path / "tiny-llava")
    params = MLLMFilterParams.model_validate({
        "backend": "local", "local": {"model": str(folder), "max_new_tokens": 8, "batch_size": 2},
        "questions": QUESTIONS})
    assert MLLMFilterStage.doctor(params) == []
    assert vlm_check_files({"model": str(tmp_path / "missing")}) == [
        f"local VLM folder {tmp_path / 'missing'} does not exist"]
    run = tmp_path / "run"
    stage = MLLMFilterStage(params, StageContext(run_dir=str(run), stage_id="mllm", seed=0))
    stage.setup()
    assert type(stage.asker.model).__name__ == "LlavaForConditionalGeneration"
    assert stage.model_info().name == f"transformers:{folder}" and len(stage.model_info().revision) == 16
    batch = make_batch([200, 30, 120], extra={"broken": b""})
    out = stage.process(batch)
    assert out["sample_id"] == batch["sample_id"]
    # Random weights answer noise: every row is an error that keeps the raw text, none is lost.
    assert out["status"] == [STATUS_ERROR] * 4 and out["reason"][3] == "empty_file"
    assert out["reason"][:3] == ["unparseable_answer"] * 3 and all("raw answer:" in d for d in out["detail"][:3])
    again = stage.process(batch)  # greedy decoding + cache: identical, and answered from the cache
    assert again["reason"] == out["reason"] and again["detail"] == out["detail"]
    assert len(list((run / "cache" / "mllm").glob("*.json"))) == 3
