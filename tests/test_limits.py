"""The one table of limits (service.contract.sampling) against the real engine, /predict and the settings.

Every bound is tried just inside and just outside: inside, the real ``vllm.SamplingParams`` built from
``engine_kwargs`` accepts it and so does our validation; outside, the engine rejects it (naming the
parameter) and so does our validation, in the /predict decoder and in the settings.  Were the engine's
ranges to change, these tests fail instead of a request hanging or a 500.
"""

from __future__ import annotations

import math
import time

import msgspec
import pytest
import vllm
from vllm import SamplingParams

from service.contract.sampling import (
    INT64_MAX,
    LIMITS,
    PARAMS,
    TABLE,
    Knobs,
    Limit,
    OutOfRange,
    Overrides,
    Sampling,
    check,
    summary,
)
from service.http.schemas import PredictRequest, check_sampling, decode_predict
from service.http.v1.schemas import ChatRequest, decode
from service.pipeline.prompting import engine_kwargs
from service.settings import Settings, SettingsError
from tests.conftest import Service, http_json

SETTINGS = Settings.from_environ({})
# 0.32.0 raises VLLMValidationError (not a ValueError); 0.26.0 (the GPU pin) raises ValueError/TypeError.
ENGINE_ERRORS: tuple[type[BaseException], ...] = (ValueError, TypeError,
                                                  getattr(vllm.exceptions, "VLLMValidationError", ValueError))
SETTING_FIELDS = ("temperature", "top_p", "top_k", "repetition_penalty", "frequency_penalty")


def engine_accepts(field: str, value: object, row: Limit | None = None) -> bool:
    """Whether the installed engine's SamplingParams takes ``value`` for ``field``, as the service passes it."""
    row = row or LIMITS[field]
    # the budget is the route's (the call's max_tokens is its input); min_tokens may not exceed it
    budget = value if row.param == "max_tokens" or (row.param == "min_tokens" and value > 16) else 16
    kwargs = engine_kwargs(SETTINGS, Sampling(**{row.param: value}), budget, ["<|im_end|>"], [0])  # type: ignore[arg-type]
    try:
        SamplingParams(**kwargs)
    except ENGINE_ERRORS as exc:
        assert row.param in str(exc), (field, value, exc)  # rejected for this parameter, not another
        return False
    return True


def inside(limit: Limit) -> list[int | float]:
    """Values just inside each end."""
    if limit.kind is int:
        return [int(limit.lo) + (1 if limit.lo_open else 0), int(limit.hi) - (1 if limit.hi_open else 0)]
    low = math.nextafter(limit.lo, math.inf) if limit.lo_open else limit.lo
    high = 1e300 if math.isinf(limit.hi) else math.nextafter(limit.hi, -math.inf) if limit.hi_open else limit.hi
    return [low, high]


def outside_engine(limit: Limit) -> list[int | float]:
    """Values just outside each end the engine enforces (every end but the int64 cap of integers)."""
    if limit.kind is int:
        return [int(limit.lo) - (0 if limit.lo_open else 1)]
    low = limit.lo if limit.lo_open else math.nextafter(limit.lo, -math.inf)
    high = math.inf if math.isinf(limit.hi) else limit.hi if limit.hi_open else math.nextafter(limit.hi, math.inf)
    return [low, high, math.nan]


def ours_accepts(field: str, value: object) -> bool:
    try:
        check(field, value)
    except OutOfRange as exc:
        assert str(exc).startswith(f"{field}=") and LIMITS[field].range_text() in str(exc)
        return False
    return True


def predict_accepts(field: str, value: object) -> bool:
    """The /predict path without a server: JSON body (when the value has one) and the decoded struct."""
    try:
        if isinstance(value, float) and not math.isfinite(value):  # no JSON for it: check the struct
            check_sampling(PredictRequest(prompt="q", **{field: value}))
        else:
            decode_predict(msgspec.json.encode({"prompt": "q", field: value}))
    except msgspec.ValidationError as exc:
        assert f"at `$.{field}`" in str(exc) and LIMITS[field].range_text() in str(exc), exc
        return False
    return True


def setting_accepts(field: str, value: object) -> bool:
    name = field.upper()
    try:
        Settings.from_environ({name: repr(value) if isinstance(value, float) else str(value)})
    except SettingsError as exc:
        [problem] = exc.problems
        assert problem.startswith(f"{name}=") and LIMITS[field].range_text() in problem, problem
        return False
    return True


@pytest.mark.parametrize("field", list(LIMITS))
def test_values_just_inside_are_accepted_by_the_engine_and_by_us(field: str) -> None:
    for value in inside(LIMITS[field]):
        assert engine_accepts(field, value), (field, value)
        assert ours_accepts(field, value), (field, value)
        assert predict_accepts(field, value), (field, value)
        if field in SETTING_FIELDS:
            assert setting_accepts(field, value), (field, value)


@pytest.mark.parametrize("field", list(LIMITS))
def test_values_just_outside_are_rejected_by_the_engine_and_by_us(field: str) -> None:
    for value in outside_engine(LIMITS[field]):
        assert not engine_accepts(field, value), (field, value)
        assert not ours_accepts(field, value), (field, value)
        assert not predict_accepts(field, value), (field, value)
        if field in SETTING_FIELDS:
            assert not setting_accepts(field, value), (field, value)


@pytest.mark.parametrize("field", [f for f, limit in LIMITS.items() if limit.kind is int])
def test_integers_beyond_int64_are_refused_before_the_wire(field: str) -> None:
    # The engine has no upper bound here; msgpack (our frames and the engine's) carries 64-bit integers only.
    assert not ours_accepts(field, INT64_MAX + 1)
    assert not predict_accepts(field, 10**30)
    with pytest.raises(OverflowError):
        msgspec.msgpack.encode(2**64)


def test_max_new_tokens_leaves_room_for_the_prompt() -> None:
    check("max_new_tokens", 2047, max_model_len=2048)
    with pytest.raises(OutOfRange, match=r"\[1, 2047\].*MAX_MODEL_LEN=2048"):
        check("max_new_tokens", 2048, max_model_len=2048)
    with pytest.raises(msgspec.ValidationError, match=r"max_new_tokens=2048.*\[1, 2047\]"):
        decode_predict(b'{"prompt": "q", "max_new_tokens": 2048}', max_model_len=2048)


def test_the_table_reads_as_the_engine_writes_it() -> None:
    text = summary()
    for part in ("temperature: [0, 2]", "top_p: (0, 1]", "top_k: [-1, 2^63-1]", "repetition_penalty: (0, inf)",
                 "frequency_penalty: [-2, 2]", "max_new_tokens: [1, 2^63-1]"):
        assert part in text, text
    # every keyword engine_kwargs passes is either in the table or set by the call, not a ranged value
    kwargs = engine_kwargs(SETTINGS, Sampling(), 16, [], [])
    assert set(kwargs) - set(PARAMS) == {"detokenize", "stop", "stop_token_ids", "logprobs", "prompt_logprobs"}


def test_settings_temperature_3_is_refused_with_the_range() -> None:
    with pytest.raises(SettingsError) as info:
        Settings.from_environ({"TEMPERATURE": "3", "TOP_P": "0", "TOP_K": "-2"})
    assert len(info.value.problems) == 3  # every error at once
    assert "TEMPERATURE='3': allowed: a number in [0, 2]" in str(info.value)
    assert "TOP_P='0'" in str(info.value) and "(0, 1]" in str(info.value)
    assert "TOP_K='-2'" in str(info.value)


def test_predict_refuses_temperature_3_at_once(service: Service) -> None:
    started = time.monotonic()
    status, reply = http_json("POST", service.url + "/predict", {"prompt": ["hello"], "temperature": 3}, timeout=30)
    elapsed = time.monotonic() - started
    assert status == 400, reply
    assert reply["field"] == "temperature" and reply["error"] == "validation_error", reply
    assert "[0, 2]" in reply["detail"] and reply["status_code"] == 400, reply
    assert elapsed < 1.0, elapsed


def test_predict_answers_at_the_ends_of_every_range(service: Service) -> None:
    # The ends the table allows go through the whole path (wire, worker, engine) and are answered.
    for ends in ({"temperature": 0.0, "top_p": 1e-6, "top_k": -1, "repetition_penalty": 1e-6, "frequency_penalty": -2},
                 {"temperature": 2.0, "top_p": 1.0, "top_k": INT64_MAX, "repetition_penalty": 100.0,
                  "frequency_penalty": 2}):
        status, reply = http_json("POST", service.url + "/predict",
                                  {"prompt": ["hello", "什么是CUDA？"], "max_new_tokens": 4, **ends}, timeout=120)
        assert status == 200 and len(reply["response"]) == 2 and not reply.get("errors"), (ends, reply)


V1_ONLY = [row for row in TABLE if row.predict is None and row.kind is not bool]


@pytest.mark.parametrize("row", V1_ONLY, ids=lambda row: row.param)
def test_the_v1_only_rows_are_the_engines_ranges(row: Limit) -> None:
    for value in inside(row):
        assert engine_accepts(row.param, value, row) and row.contains(value), (row.param, value)
    if row.param != "seed":  # the engine takes any integer seed; the table caps it at the wire's 64 bits
        for value in outside_engine(row):
            assert not engine_accepts(row.param, value, row) and not row.contains(value), (row.param, value)


def test_every_row_is_in_each_schema_and_reaches_the_engine() -> None:
    """The request bodies, the wire and SamplingParams are all built from TABLE: a row is one edit."""
    for row in TABLE:
        assert (row.predict in Overrides.__struct_fields__) is (row.predict is not None), row
        assert (row.v1 in Knobs.__struct_fields__) is (row.v1 is not None), row
        assert row.param in Sampling.__struct_fields__, row
    body = {"messages": [{"role": "user", "content": "q"}], "min_p": 0.5, "seed": 7, "presence_penalty": 0.25,
            "temperature": 0.3, "ignore_eos": True, "min_tokens": 2, "max_tokens": 9}
    sampling = decode(msgspec.json.encode(body), ChatRequest).sampling(9, None)
    wired = msgspec.msgpack.decode(msgspec.msgpack.encode(sampling), type=Sampling)
    params = SamplingParams(**engine_kwargs(SETTINGS, wired, 9, [], [151645]))
    assert (params.min_p, params.seed, params.presence_penalty, params.temperature) == (0.5, 7, 0.25, 0.3)
    assert (params.ignore_eos, params.min_tokens, params.max_tokens, list(params.stop_token_ids)) == (True, 2, 9, [])
    left_out = SamplingParams(**engine_kwargs(SETTINGS, Sampling(), 9, [], [151645]))
    assert (left_out.repetition_penalty, left_out.frequency_penalty) == (SETTINGS.repetition_penalty, SETTINGS.frequency_penalty)
    assert (left_out.min_p, left_out.presence_penalty, left_out.seed) == (0.0, 0.0, None)  # the engine's defaults
    predict = decode_predict(b'{"prompt": "q", "max_new_tokens": 5, "top_p": 0.5}').sampling()
    assert (predict.max_tokens, predict.top_p, predict.stop, predict.min_p) == (5, 0.5, None, None)
