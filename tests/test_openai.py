"""The OpenAI-compatible API against real servers (demo model, vLLM's CPU engine), with the real ``openai`` SDK.

Most tests use one server with API_KEY and SERVED_MODEL_NAME set, token routing off and the ``sync`` front end
(LLMEngine on the step thread); a streaming test also runs against the session's server (``async``: AsyncLLM),
so both front ends' streaming paths are exercised.
"""

from __future__ import annotations

import json
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from tests.conftest import Service, demo_env, http_json, start_service, wait_for

KEY = "sk-test-0123456789"
NAME = "demo-served"
GREEDY = {"temperature": 0.0, "max_tokens": 24}
QUESTIONS = ["什么是CUDA？", "What is a warp?", "解释共享内存。", "What is coalescing?", "什么是线程块？",
             "Explain tiling.", "什么是原子操作？", "What is occupancy?"]


@pytest.fixture(scope="module")
def keyed_env(demo_model: Path) -> dict[str, str]:
    return demo_env(demo_model, API_KEY=KEY, SERVED_MODEL_NAME=NAME, DISABLE_TOKEN_ROUTING="1",
                    ENGINE_FRONTEND="sync", RESTART_LIMIT="3")


@pytest.fixture(scope="module")
def keyed(keyed_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    svc = start_service(tmp_path_factory.mktemp("openai"), keyed_env)
    try:
        svc.wait_ready()
        yield svc
    finally:
        svc.server.stop()


@pytest.fixture(scope="module")
def client(keyed: Service) -> openai.OpenAI:
    return openai.OpenAI(base_url=keyed.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def tokenizer(demo_model: Path):  # noqa: ANN201 - transformers' type
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(demo_model))


def chat_prompt(tokenizer, messages: list[dict[str, str]]) -> str:  # noqa: ANN001
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def test_models_lists_the_served_model(client: openai.OpenAI, keyed: Service) -> None:
    models = client.models.list().data
    assert [m.id for m in models] == [NAME]
    _, info = http_json("GET", keyed.url + "/info")
    assert models[0].model_extra["max_model_len"] == info["max_model_len"]


def test_completions_list_of_eight_prompts(client: openai.OpenAI, tokenizer) -> None:  # noqa: ANN001
    batch = client.completions.create(model=NAME, prompt=QUESTIONS, logprobs=0, **GREEDY)
    assert [c.index for c in batch.choices] == list(range(8))
    for question, choice in zip(QUESTIONS, batch.choices, strict=True):
        alone = client.completions.create(model=NAME, prompt=question, **GREEDY).choices[0]
        assert choice.text == alone.text  # greedy: the same text whether batched or alone
        assert choice.finish_reason in ("stop", "length")
        assert len(choice.logprobs.tokens) == len(choice.logprobs.token_logprobs) > 0
    # usage is the engine's count: the prompts' token ids and one log probability per generated token
    prompt_tokens = sum(len(tokenizer(q, add_special_tokens=False)["input_ids"]) for q in QUESTIONS)
    assert batch.usage.prompt_tokens == prompt_tokens
    assert batch.usage.completion_tokens == sum(len(c.logprobs.tokens) for c in batch.choices) > 0
    assert batch.usage.total_tokens == prompt_tokens + batch.usage.completion_tokens


def test_token_id_prompts_and_echo(client: openai.OpenAI, tokenizer) -> None:  # noqa: ANN001
    ids = tokenizer(QUESTIONS[0], add_special_tokens=False)["input_ids"]
    by_text = client.completions.create(model=NAME, prompt=QUESTIONS[0], **GREEDY).choices[0].text
    by_ids = client.completions.create(model=NAME, prompt=ids, **GREEDY)
    assert by_ids.choices[0].text == by_text and by_ids.usage.prompt_tokens == len(ids)
    echoed = client.completions.create(model=NAME, prompt=QUESTIONS[0], echo=True, logprobs=1, **GREEDY).choices[0]
    assert echoed.text == QUESTIONS[0] + by_text
    assert echoed.logprobs.token_logprobs[0] is None and len(echoed.logprobs.tokens) > len(ids)


def test_chat_with_a_system_message_is_the_templated_completion(client: openai.OpenAI, tokenizer) -> None:  # noqa: ANN001
    messages = [{"role": "system", "content": "You answer in one sentence."},
                {"role": "user", "content": "什么是CUDA？"}]
    chat = client.chat.completions.create(model=NAME, messages=messages, **GREEDY)
    raw = client.completions.create(model=NAME, prompt=chat_prompt(tokenizer, messages), **GREEDY)
    assert chat.choices[0].message.role == "assistant"
    assert chat.choices[0].message.content == raw.choices[0].text
    assert chat.usage.prompt_tokens == raw.usage.prompt_tokens
    assert chat.usage.completion_tokens == raw.usage.completion_tokens > 0


def _stream_matches(client: openai.OpenAI, model: str) -> None:
    messages = [{"role": "user", "content": "Explain shared memory in CUDA."}]
    whole = client.chat.completions.create(model=model, messages=messages, **GREEDY)
    chunks = list(client.chat.completions.create(model=model, messages=messages, stream=True,
                                                 stream_options={"include_usage": True}, **GREEDY))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content and text
    assert len([c for c in chunks if c.choices]) >= 3  # it streamed, not one block
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == whole.usage.model_dump()


def test_streaming_chat_joins_to_the_whole_text(client: openai.OpenAI) -> None:
    _stream_matches(client, NAME)


def test_streaming_chat_on_the_async_front_end(service: Service) -> None:
    _, info = http_json("GET", service.url + "/info")
    assert info["settings"]["ENGINE_FRONTEND"] == "async"
    plain = openai.OpenAI(base_url=service.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    _stream_matches(plain, plain.models.list().data[0].id)


def test_streaming_completions_of_several_prompts(client: openai.OpenAI) -> None:
    texts = {i: "" for i in range(3)}
    for chunk in client.completions.create(model=NAME, prompt=QUESTIONS[:3], stream=True, **GREEDY):
        for choice in chunk.choices:
            texts[choice.index] += choice.text
    whole = client.completions.create(model=NAME, prompt=QUESTIONS[:3], **GREEDY)
    assert [texts[i] for i in range(3)] == [c.text for c in whole.choices]


def test_api_key_is_enforced_on_v1_only(keyed: Service) -> None:
    for key in ("", "wrong-key"):
        bad = openai.OpenAI(base_url=keyed.url + "/v1", api_key=key or "x", max_retries=0)
        with pytest.raises(openai.AuthenticationError) as err:
            bad.models.list()
        assert err.value.status_code == 401 and err.value.code == "invalid_api_key"
    status, body = http_json("GET", keyed.url + "/v1/models")  # no header at all
    assert status == 401 and body["error"]["type"] == "authentication_error"
    status, body = http_json("POST", keyed.url + "/predict", {"prompt": "什么是CUDA？"})
    assert status == 200 and isinstance(body["response"], str)  # the harness's route stays open


@pytest.mark.parametrize(("kwargs", "status", "param"), [
    ({"model": "no-such-model"}, 404, "model"),
    ({"temperature": 5.0}, 400, "temperature"),
    ({"top_p": 0.0}, 400, "top_p"),
    ({"n": 2}, 400, "n"),
    ({"max_tokens": 0}, 400, "max_tokens"),
    ({"logprobs": 99}, 400, "logprobs"),
    ({"extra_body": {"no_such_field": 1}}, 400, "no_such_field"),
])
def test_errors_in_openai_shape(client: openai.OpenAI, kwargs: dict, status: int, param: str) -> None:
    args = {"model": NAME, "prompt": "什么是CUDA？", "max_tokens": 8, **kwargs}
    with pytest.raises(openai.APIStatusError) as err:
        client.completions.create(**args)
    assert err.value.status_code == status, err.value.body
    assert err.value.param == param and err.value.body["message"], err.value.body


def test_prompt_longer_than_the_context(client: openai.OpenAI, keyed: Service) -> None:
    _, info = http_json("GET", keyed.url + "/info")
    long = "CUDA " * (info["max_model_len"] + 10)
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=NAME, prompt=["什么是CUDA？", long], max_tokens=8)
    assert err.value.param == "prompt" and err.value.code == "context_length_exceeded"
    assert "prompt[1]" in err.value.message
    with pytest.raises(openai.BadRequestError) as err:  # a budget that does not fit beside the prompt
        client.completions.create(model=NAME, prompt="什么是CUDA？", max_tokens=info["max_model_len"])
    assert err.value.param == "max_tokens" and err.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as err:  # streaming: refused with its status, before any event
        client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": long}], stream=True)
    assert err.value.param == "messages"


def test_predict_and_completions_give_the_same_text(keyed: Service, keyed_env: dict[str, str],
                                                   client: openai.OpenAI, tokenizer) -> None:  # noqa: ANN001
    """/predict (routing off) is /v1/completions of the chat-formatted prompt plus /predict's post-processing."""
    from service.pipeline.prompting import PostProcessor, stop_strings
    from service.pipeline.routing import Router
    from service.settings import Settings

    settings = Settings.from_environ(keyed_env)
    post = PostProcessor.from_settings(settings, Router.from_settings(settings))
    system = http_json("GET", keyed.url + "/system_prompt")[1]["system_prompt"]
    for question in QUESTIONS[:4]:
        _, predicted = http_json("POST", keyed.url + "/predict", {"prompt": question, "temperature": 0.0})
        prompt = chat_prompt(tokenizer, [{"role": "system", "content": system}, {"role": "user", "content": question}])
        raw = client.completions.create(model=NAME, prompt=prompt, temperature=0.0, max_tokens=settings.max_new_tokens,
                                        stop=stop_strings(settings)).choices[0].text
        assert post(question, raw, True) == predicted["response"]


def test_metrics_count_v1_requests_and_tokens(client: openai.OpenAI, keyed: Service) -> None:
    requests, tokens = r'qa_requests_total{path="/v1/completions",status="200"}', 'qa_generated_tokens_total{route="openai"}'

    def read() -> tuple[float, float]:
        _, text = http_json("GET", keyed.url + "/metrics")
        found = {name: re.search(rf"^{re.escape(name)} (\S+)$", text, re.M) for name in (requests, tokens)}
        return tuple(float(m.group(1)) if m else 0.0 for m in found.values())  # type: ignore[return-value]

    before = read()
    completion = client.completions.create(model=NAME, prompt="什么是CUDA？", **GREEDY)
    after = read()
    assert after[0] - before[0] == 1, (before, after)
    assert after[1] - before[1] == completion.usage.completion_tokens > 0, (before, after, completion.usage)


def _gauge(service: Service, name: str) -> float:
    _, text = http_json("GET", service.url + "/metrics")
    match = re.search(rf"^{name} (\S+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


def _vllm_generated(service: Service) -> float:
    """vLLM's own count of generated tokens (every engine step's, aborted requests' included), all workers."""
    _, text = http_json("GET", service.url + "/metrics")
    return sum(float(v) for v in re.findall(r"^vllm:generation_tokens_total\{[^}]*\} (\S+)$", text, re.M))


def test_a_closed_stream_is_aborted_in_the_engine(keyed: Service) -> None:
    """128 streamed prompts of 1,000 tokens each: closing the socket while they stream ends them in the engine.

    That they are running when the socket closes is read from the stream itself (every prompt has streamed text,
    none has finished), not from a gauge: on a 2-core host a /metrics read can take seconds. That they stopped is
    vLLM's own token count: under half of 128 x 1,000. The work is made long (about 1,000 steps of 128 sequences,
    20 s or more here) because the demo engine runs 16 x 1,000 tokens in about 3 s, which a CI run finished
    before the abort arrived.
    """
    n, budget = 128, 1000
    before = _vllm_generated(keyed)
    body = json.dumps({"model": NAME, "prompt": ["什么是CUDA？"] * n, "max_tokens": budget, "ignore_eos": True,
                       "stream": True}).encode()
    with socket.create_connection(("127.0.0.1", keyed.port)) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     + f"Authorization: Bearer {KEY}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        sock.settimeout(60)
        received, deadline = b"", time.monotonic() + 60
        while time.monotonic() < deadline:
            data = sock.recv(65536)
            if not data:
                break
            received += data
            streaming = {int(i) for i in re.findall(rb'"index":\s*(\d+),\s*"text":\s*"[^"]', received)}
            if len(streaming) == n:
                break
        assert received.startswith(b"HTTP/1.1 200 OK"), received[:200]
        assert len(streaming) == n, f"{len(streaming)} of the {n} prompts streamed text within 60 s"
        assert not re.search(rb'"finish_reason":\s*"', received), "a prompt finished before the socket closed"
    # The socket is closed: the prompts leave the engine (awaited, not timed), and it generated under half.
    wait_for(lambda: _gauge(keyed, "qa_in_flight_questions") == 0, 90, "the closed stream's prompts out of flight",
             every=0.1)
    generated = _vllm_generated(keyed) - before
    assert 0 < generated < n * budget / 2, f"the engine generated {generated:.0f} of {n * budget} tokens"


@pytest.mark.parametrize(("text", "content", "reasoning"), [
    ("plain answer", "plain answer", None),
    ("<think>step one</think>\n\nThe answer.", "The answer.", "step one"),
    ("<think>a</think>x<think>b</think> y", "xy", "ab"),
    ("<think>cut off while thinking", "", "cut off while thinking"),
    ("before <thi", "before <thi", None),
])
def test_think_split_whole_and_streamed_agree(text: str, content: str, reasoning: str | None) -> None:
    from service.pipeline.thinking import ThinkSplitter, split_think

    assert split_think(text) == (content, reasoning)
    for size in (1, 2, 3, 5):  # any cut of the stream joins to the same two texts
        splitter, got_content, got_reasoning = ThinkSplitter(), "", ""
        for start in range(0, len(text), size):
            c, r = splitter.feed(text[start:start + size])
            got_content, got_reasoning = got_content + c, got_reasoning + r
        c, r = splitter.flush()
        assert (got_content + c, got_reasoning + r) == (content, reasoning or "")
