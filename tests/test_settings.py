"""Settings (SPEC section 2): defaults from env/defaults.env, validation, secrets, presets.

Fast unit tests: ``Settings.from_environ`` gets an explicit mapping, never the test's own environment.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from env import PROJECT_ROOT, layer, preset_names, probe_hardware, read_preset
from service.settings import Settings, SettingsError, describe, variables

# Variables of env/defaults.env that the launcher and the downloader read, not the service.  A new
# variable there must either become a Settings field or be added here with its reader.
LAUNCHER_ONLY = {
    "SKIP_PIP_INSTALL",  # inv run: skip the pip step
    "SKIP_MODEL_DOWNLOAD",  # inv run: skip the download step
    "ALLOW_SYSTEM_PIP",  # inv run: allow pip into an externally managed Python
    "INSTALL_TARGET",  # inv run / nox: cpu or gpu requirements
    "MODELSCOPE_ENDPOINT",  # downloader: hub endpoint
}
FIELDS = {f.name.upper() for f in variables()}


@pytest.fixture(autouse=True)
def no_gpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No ``nvidia-smi`` on PATH: the `auto` layout is the same on every host (tests/test_layout.py has GPUs)."""
    monkeypatch.setenv("PATH", str(tmp_path))
    probe_hardware.cache_clear()
    yield
    probe_hardware.cache_clear()


def values_of(preset: str, **exported: str) -> dict[str, str]:
    """The environment `inv run` would give the service for ``preset`` with ``exported`` in the shell."""
    return {k: v.value for k, v in layer(exported, preset).items()}


def problems(**env: str) -> list[str]:
    with pytest.raises(SettingsError) as info:
        Settings.from_environ(env)
    return info.value.problems


# --- defaults ------------------------------------------------------------------------------------------


def test_spec_defaults() -> None:
    s = Settings.from_environ({})
    # model
    assert s.model_id == "YukinoStuki/Qwen2.5-0.5B-Plus-LLM"
    assert s.model_revision == "master"
    assert s.model_dir.is_absolute()
    assert s.model_dir == PROJECT_ROOT / "model" / "YukinoStuki" / "Qwen2.5-0.5B-Plus-LLM"
    assert s.model_dir.parts[-3:] == ("model", "YukinoStuki", "Qwen2.5-0.5B-Plus-LLM")
    assert s.modelscope_api_token == ""
    # speculative decoding
    assert s.enable_speculative_decoding is False
    assert s.spec_method == "ngram"
    assert s.spec_num_speculative_tokens == 6
    assert (s.spec_ngram_lookup_max, s.spec_ngram_lookup_min) == (8, 1)
    assert (s.spec_draft_model_id, s.spec_draft_model_revision) == ("", "master")
    assert s.spec_draft_optional is True
    # engine
    assert s.use_vllm == "true" and s.backend == "vllm"
    assert s.gpu_memory_utilization == 0.97
    assert (s.dtype, s.transformers_dtype) == ("float16", "float16")
    assert s.max_model_len == 1024
    assert s.enable_prefix_caching is True
    assert (s.vllm_quantization, s.vllm_kv_cache_dtype) == (None, None)
    assert s.vllm_load_format == "auto"
    assert s.vllm_max_num_seqs == 1024
    assert s.vllm_max_num_batched_tokens is None
    # batch
    assert s.batch_mode is True
    assert s.batch_concurrency == 512
    assert s.vllm_batch_use_llm is True
    # decoding
    assert (s.temperature, s.top_p, s.top_k) == (0.0, 1.0, 1)
    assert (s.repetition_penalty, s.frequency_penalty) == (1.05, 0.1)
    # length and routing
    assert s.max_new_tokens == 64
    assert s.disable_token_routing is False
    assert (s.max_new_tokens_code, s.max_new_tokens_code_hard, s.max_new_tokens_code_soft) == (192, 192, 96)
    assert (s.hard_code_min_hits, s.long_answer_enable_default, s.long_answer_min_hits) == (1, True, 1)
    assert s.hard_code_question_keywords == s.long_answer_keywords == s.code_question_keywords == ()
    # stop
    assert s.stop_strings == ("<|im_end|>", "<|endoftext|>")
    assert s.stop_on_double_newline is False
    # output
    assert (s.output_trim_examples, s.output_max_sentences) == (True, 6)
    # warmup
    assert s.warmup_data_path == PROJECT_ROOT / "data.jsonl"
    assert (s.warmup_num_samples, s.warmup_repeat) == (7000, 2)
    # process
    assert s.omp_num_threads == 4
    # server (SPEC section 1: 0.0.0.0:8000)
    assert (s.host, s.port) == ("0.0.0.0", 8000)
    # multi-GPU knobs: one GPU, the engine picks the executor
    assert (s.tensor_parallel_size, s.pipeline_parallel_size, s.data_parallel_size) == (1, 1, 1)
    assert s.distributed_executor_backend is None


def test_relative_paths_resolve_against_the_project_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    s = Settings.from_environ({"MODEL_DIR": "./model/mine", "WARMUP_DATA_PATH": "data/warm.jsonl"})
    assert s.model_dir == PROJECT_ROOT / "model" / "mine"
    assert s.warmup_data_path == PROJECT_ROOT / "data" / "warm.jsonl"


def test_exported_model_id_moves_model_dir() -> None:
    s = Settings.from_environ({"MODEL_ID": "someone/Qwen2.5-1.5B-CUDA"})
    assert s.model_dir == PROJECT_ROOT / "model" / "someone" / "Qwen2.5-1.5B-CUDA"


def test_empty_warmup_path_means_no_warmup_file() -> None:
    assert Settings.from_environ({"WARMUP_DATA_PATH": ""}).warmup_data_path is None


def test_multi_gpu_knobs_parse() -> None:
    s = Settings.from_environ({"TENSOR_PARALLEL_SIZE": "2", "PIPELINE_PARALLEL_SIZE": "2",
                               "DATA_PARALLEL_SIZE": "1", "DISTRIBUTED_EXECUTOR_BACKEND": "Ray"})
    assert (s.tensor_parallel_size, s.pipeline_parallel_size, s.distributed_executor_backend) == (2, 2, "ray")


# --- validation ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "value", "allowed"),
    [
        ("MAX_MODEL_LEN", "abc", "integer"),
        ("TOP_P", "5", "(0, 1]"),
        ("TEMPERATURE", "-1", "[0, 2]"),
        ("TEMPERATURE", "3", "[0, 2]"),
        ("TOP_K", "-2", "[-1, 2^63-1]"),
        ("TOP_K", "1.5", "integer"),
        ("REPETITION_PENALTY", "0", "(0, inf)"),
        ("FREQUENCY_PENALTY", "2.5", "[-2, 2]"),
        ("USE_VLLM", "maybe", "true, false, auto"),
        ("ENABLE_PREFIX_CACHING", "perhaps", "true/false"),
        ("PORT", "70000", "65535"),
        ("GPU_MEMORY_UTILIZATION", "1.5", "1.0]"),
        ("DTYPE", "fp8", "float16"),
        ("TEMPERATURE", "nan", "number"),
        ("OUTPUT_MAX_SENTENCES", "six", "integer"),
        ("VLLM_KV_CACHE_MEMORY_BYTES", "lots", "bytes as an integer or with a unit"),
        ("VLLM_KV_CACHE_MEMORY_BYTES", "0", "more than 0 bytes"),
        ("VLLM_KV_CACHE_MEMORY_BYTES", "8 TB", "bytes as an integer or with a unit"),
        ("VLLM_COMPILATION_MODE", "fast", "none, stock_torch_compile, dynamo_trace_once, vllm_compile"),
        ("VLLM_CUDAGRAPH_MODE", "always", "none, piecewise, full, full_decode_only, full_and_piecewise"),
        ("ENGINE_FRONTEND", "fast", "allowed: async, sync"),
        ("VLLM_CUDAGRAPH_CAPTURE_SIZES", "8,big", "comma-separated integers >= 1"),
        ("VLLM_CUDAGRAPH_CAPTURE_SIZES", "0,8", "comma-separated integers >= 1"),
    ],
)
def test_invalid_value_names_variable_value_and_what_is_allowed(name: str, value: str, allowed: str) -> None:
    found = problems(**{name: value})
    assert len(found) == 1
    message = found[0]
    assert name in message and repr(value) in message and "allowed" in message and allowed in message
    assert name in str(SettingsError(found))


def test_empty_required_value_is_an_error_not_the_default() -> None:
    # An exported empty MAX_MODEL_LEN is not silently replaced by 1024.
    [message] = problems(MAX_MODEL_LEN="")
    assert message.startswith("MAX_MODEL_LEN=''") and "integer" in message


def test_all_invalid_values_are_reported_at_once() -> None:
    bad = {"MAX_MODEL_LEN": "abc", "TOP_P": "5", "TEMPERATURE": "-1", "USE_VLLM": "maybe",
           "ENABLE_PREFIX_CACHING": "perhaps", "PORT": "70000"}
    with pytest.raises(SettingsError) as info:
        Settings.from_environ(bad)
    assert len(info.value.problems) == len(bad)
    text = str(info.value)
    for name, value in bad.items():
        assert f"{name}={value!r}" in text


def test_capture_sizes_must_agree_with_the_largest_capture_size() -> None:
    [message] = problems(VLLM_CUDAGRAPH_CAPTURE_SIZES="1,8,512", VLLM_MAX_CUDAGRAPH_CAPTURE_SIZE="1024")
    assert "VLLM_MAX_CUDAGRAPH_CAPTURE_SIZE=1024" in message and "(512)" in message and "allowed" in message
    agreed = Settings.from_environ({"VLLM_CUDAGRAPH_CAPTURE_SIZES": "512, 1,8", "VLLM_MAX_CUDAGRAPH_CAPTURE_SIZE": "512"})
    assert agreed.vllm_cudagraph_capture_sizes == (1, 8, 512)


def test_budget_must_leave_room_for_the_prompt() -> None:
    [message] = problems(MAX_NEW_TOKENS="1024")
    assert "MAX_NEW_TOKENS=1024" in message and "MAX_MODEL_LEN=1024" in message


def test_ngram_min_above_max_is_an_error() -> None:
    [message] = problems(SPEC_NGRAM_LOOKUP_MIN="9", SPEC_NGRAM_LOOKUP_MAX="4")
    assert "SPEC_NGRAM_LOOKUP_MIN=9" in message and "SPEC_NGRAM_LOOKUP_MAX=4" in message


@pytest.mark.parametrize(("raw", "expected"), [("1", True), ("TRUE", True), ("yes", True), ("on", True),
                                               ("0", False), ("False", False), ("no", False), ("off", False)])
def test_boolean_spellings(raw: str, expected: bool) -> None:
    assert Settings.from_environ({"STOP_ON_DOUBLE_NEWLINE": raw}).stop_on_double_newline is expected


def test_clamped_output_max_sentences_is_announced(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="service"):
        s = Settings.from_environ({"OUTPUT_MAX_SENTENCES": "50"})
    assert s.output_max_sentences == 12
    assert any("OUTPUT_MAX_SENTENCES" in r.getMessage() and "12" in r.getMessage() for r in caplog.records)


# --- secrets -------------------------------------------------------------------------------------------

ADMIN = "adm-9f2c-never-show"
MS_TOKEN = "ms-4b1d-never-show"


def test_public_masks_set_secrets_and_is_json() -> None:
    s = Settings.from_environ({"ADMIN_TOKEN": ADMIN, "MODELSCOPE_API_TOKEN": MS_TOKEN, "MAX_MODEL_LEN": "2048"})
    public = s.public()
    assert public["ADMIN_TOKEN"] == "***" and public["MODELSCOPE_API_TOKEN"] == "***"
    text = json.dumps(public, ensure_ascii=False)
    assert ADMIN not in text and MS_TOKEN not in text
    assert set(public) == FIELDS
    assert public["MAX_MODEL_LEN"] == 2048
    assert public["MODEL_DIR"] == str(s.model_dir)
    assert public["STOP_STRINGS"] == ["<|im_end|>", "<|endoftext|>"]


def test_public_shows_unset_secrets_as_empty() -> None:
    public = Settings.from_environ({}).public()
    assert public["ADMIN_TOKEN"] == "" and public["MODELSCOPE_API_TOKEN"] == ""


def test_secrets_are_not_in_a_settings_error() -> None:
    with pytest.raises(SettingsError) as info:
        Settings.from_environ({"ADMIN_TOKEN": ADMIN, "MODELSCOPE_API_TOKEN": MS_TOKEN, "TOP_P": "5"})
    assert ADMIN not in str(info.value) and MS_TOKEN not in str(info.value)


def test_secrets_are_not_in_the_repr() -> None:
    s = Settings.from_environ({"ADMIN_TOKEN": ADMIN, "MODELSCOPE_API_TOKEN": MS_TOKEN})
    assert ADMIN not in repr(s) and MS_TOKEN not in repr(s)


# --- one source of defaults ----------------------------------------------------------------------------


def test_every_setting_has_a_line_in_defaults_env() -> None:
    keys = set(read_preset("defaults"))
    assert FIELDS - keys == set()


def test_every_defaults_env_variable_is_a_setting_or_a_known_launcher_variable() -> None:
    keys = set(read_preset("defaults"))
    assert keys - FIELDS == LAUNCHER_ONLY
    assert FIELDS & LAUNCHER_ONLY == set()


def test_every_preset_only_overrides_known_variables() -> None:
    keys = set(read_preset("defaults"))
    for name in preset_names():
        assert set(read_preset(name)) - keys == set(), name


@pytest.mark.parametrize("preset", preset_names())
def test_every_preset_gives_valid_settings(preset: str) -> None:
    assert isinstance(Settings.from_environ(values_of(preset)), Settings)


def test_every_setting_is_documented() -> None:
    docs = dict(describe())
    assert set(docs) == FIELDS
    assert all(text.strip() for text in docs.values())


# --- qwen3-4b preset -----------------------------------------------------------------------------------


def test_qwen3_4b_preset_values() -> None:
    s = Settings.from_environ(values_of("qwen3-4b"))
    assert s.model_id == "YukinoStuki/Qwen3-4B-Plus-LLM"
    assert s.model_dir == PROJECT_ROOT / "model" / "YukinoStuki" / "Qwen3-4B-Plus-LLM"
    assert s.max_model_len == 8192
    assert s.max_new_tokens == 512
    assert s.disable_token_routing is True
    assert s.vllm_max_num_seqs == 1024  # auto without a GPU (a GPU: one engine of 2048, env/layout.py)
    assert (s.warmup_num_samples, s.warmup_repeat) == (7000, 1)
    # Everything else stays at the evaluation defaults.
    defaults = Settings.from_environ({})
    same = ("temperature", "top_p", "top_k", "repetition_penalty", "frequency_penalty", "gpu_memory_utilization",
            "batch_concurrency", "max_new_tokens_code", "stop_strings", "output_max_sentences", "omp_num_threads")
    assert {n: getattr(s, n) for n in same} == {n: getattr(defaults, n) for n in same}


def test_exported_max_model_len_wins_over_the_qwen3_preset() -> None:
    assert Settings.from_environ(values_of("qwen3-4b", MAX_MODEL_LEN="2048")).max_model_len == 2048
    forced = {k: v.value for k, v in layer({"MAX_MODEL_LEN": "2048"}, "qwen3-4b", force=True).items()}
    assert Settings.from_environ(forced).max_model_len == 8192


@pytest.mark.parametrize("preset", preset_names())
def test_every_shipped_preset_gives_valid_settings(preset: str) -> None:
    """A preset that the settings reject would only fail at `inv run` on the user's machine."""
    values = {k: v.value for k, v in layer({}, preset, force=True).items()}
    settings = Settings.from_environ(values)
    assert settings.engine_workers * settings.gpu_memory_utilization <= 1.0


# --- one true/false parser (env/values.py) ----------------------------------------------------------


@pytest.mark.parametrize(("text", "value"), [("1", True), ("TRUE", True), (" yes ", True), ("On", True),
                                             ("0", False), ("false", False), ("No", False), ("off", False)])
def test_one_parser_reads_every_switch_spelling(text: str, value: bool) -> None:
    from env.values import is_on, parse_bool

    assert parse_bool(text) is value and is_on(text) is value


@pytest.mark.parametrize("text", ["", "ture", "2", "enabled"])
def test_the_strict_parser_names_what_is_allowed_and_the_lenient_one_says_off(text: str) -> None:
    from env.values import is_on, parse_bool

    with pytest.raises(ValueError, match="allowed: 1/0, true/false, yes/no, on/off"):
        parse_bool(text)
    assert is_on(text) is False
    if text:
        assert any("DISABLE_TOKEN_ROUTING" in p for p in problems(DISABLE_TOKEN_ROUTING=text))
