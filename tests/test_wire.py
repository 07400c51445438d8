"""Answers cross from the engine workers as JSON arrays; the API puts them back in order. Prompts are encoded in one batch."""

from __future__ import annotations

import json
from pathlib import Path

import msgspec
import pytest

from service.contract import wire
from service.http.schemas import PredictResponse
from service.pipeline.balance import merge_arrays
from service.worker.backends.tokens import encode_prompts

TRICKY = ['引号"和\\反斜杠', "换行\n与制表\t", "\x00\x1f控制", "emoji 🚀 \ud7ff", "", "[],{}", "\ufffd残缺"]


def test_answers_keep_every_text_through_the_wire() -> None:
    answers = wire.Answers.of(TRICKY, [(4, "too long")], 12, {"short": 12})
    back = wire._decoder.decode(wire.frame(wire.Answered(7, answers))[4:])
    assert isinstance(back, wire.Answered) and back.answers.texts() == TRICKY
    assert back.answers.errors == [(4, "too long")] and back.answers.tokens_by_route == {"short": 12}


@pytest.mark.parametrize("shards", [[[0, 2, 4, 6], [1, 3, 5]], [[6, 5, 4, 3, 2, 1, 0]], [[3], [0, 1], [6, 2, 5, 4]]])
def test_merged_arrays_put_every_answer_back_in_its_place(shards: list[list[int]]) -> None:
    arrays = [wire.Answers.of([TRICKY[i] for i in shard], [], 0, {}).texts_json for shard in shards]
    assert json.loads(merge_arrays(shards, arrays, len(TRICKY))) == TRICKY


def test_a_shard_that_comes_back_short_or_a_question_in_no_shard_is_an_error() -> None:
    with pytest.raises(ValueError, match="came back with 1 answers"):
        merge_arrays([[0, 1]], [wire.Answers.of(["a"], [], 0, {}).texts_json], 2)
    with pytest.raises(ValueError, match="in no shard"):
        merge_arrays([[0]], [wire.Answers.of(["a"], [], 0, {}).texts_json], 2)


def test_the_response_embeds_the_encoded_answers_as_json() -> None:
    body = msgspec.json.encode(PredictResponse(msgspec.Raw(wire.Answers.of(TRICKY, [], 0, {}).texts_json)))
    assert json.loads(body) == {"response": TRICKY}


def test_batch_encoding_gives_the_tokenizer_call_ids(demo_model: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(demo_model)
    prompts = ["<|im_start|>user\n什么是warp？<|im_end|>\n<|im_start|>assistant\n", "kernel<<<1, 32>>>", "", *TRICKY]
    expected = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    assert encode_prompts(tokenizer, prompts) == expected
    tokenizer._tokenizer.enable_truncation(4)  # a tokenizer that truncates: the plain call (which does not)
    assert encode_prompts(tokenizer, prompts) == expected


def test_the_outbox_writes_a_rounds_frames_at_once_and_in_order() -> None:
    """A thousand frames put in one event-loop round reach a real socket pair in one write, in their order."""
    import asyncio
    import socket

    async def main() -> tuple[int, list[wire.Message]]:
        left, right = socket.socketpair()
        reader, keep = await asyncio.open_connection(sock=right)  # both ends' transports stay referenced
        unused, writer = await asyncio.open_connection(sock=left)
        writes: list[bytes] = []
        write = writer.write
        writer.write = lambda data: (writes.append(data), write(data))[1]  # type: ignore[method-assign]
        outbox = wire.Outbox(writer)
        for id_ in range(1000):
            outbox.send(wire.Cancel(id_))
        outbox.send(wire.Stop())
        assert writes == []  # nothing leaves before the round ends
        got = [await wire.recv(reader) for _ in range(1001)]
        writer.close()
        keep.close()
        del unused
        return len(writes), got

    count, got = asyncio.run(main())
    assert count == 1
    assert [m.id for m in got[:-1]] == list(range(1000)) and isinstance(got[-1], wire.Stop)


def test_settings_cross_the_wire_whole() -> None:
    """The worker's Setup frame carries the API process's parsed settings: paths, tuples, layout and all."""
    from service.settings import Settings

    settings = Settings.from_environ({"SYSTEM_PROMPT_FILE": "/tmp/prompt.txt", "VLLM_CUDAGRAPH_CAPTURE_SIZES": "1,2,4",
                                      "STOP_STRINGS": "<|im_end|>,\\n\\n", "ADMIN_TOKEN": "s3cret"})
    back = Settings.from_wire(wire._decoder.decode(wire.frame(wire.Setup(settings.to_wire()))[4:]).settings)
    assert back == settings and isinstance(back.system_prompt_file, Path) and back.layout == settings.layout
    assert back.vllm_cudagraph_capture_sizes == (1, 2, 4) and back.admin_token == "s3cret"


def test_the_worker_runs_on_the_api_process_settings_not_its_environment(demo_model: Path) -> None:
    """A worker whose environment says otherwise (an invalid value, another backend) still runs on what the API
    process parsed: it reads no settings of its own."""
    import asyncio
    import os

    from service.pool.client import ProcessEngineClient, engine_environ
    from service.settings import Settings

    settings = Settings.from_environ({"MODEL_DIR": str(demo_model), "USE_VLLM": "false"})
    environ = engine_environ({**os.environ, "USE_VLLM": "true", "MAX_MODEL_LEN": "abc"})
    worker = ProcessEngineClient(settings, environ)
    try:
        worker.check()  # its Hello: the backend the API process's settings chose
        assert worker.name == "transformers"
    finally:
        asyncio.run(worker.stop_worker())
    assert worker._proc is not None and worker._proc.poll() is not None
