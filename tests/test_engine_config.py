"""What reaches vLLM from the settings, and the warmup file readers (no engine started)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from env import layer, preset_names
from service.contract.errors import EngineUnavailable
from service.pipeline.warmup import load_questions
from service.settings import Settings
from service.worker.backends.tokens import stop_token_ids
from service.worker.backends.vllm_args import engine_args, speculative_config


def settings(**env: str) -> Settings:
    return Settings.from_environ(env)


def vllm_accepts(args: dict[str, Any]) -> Any:
    """vLLM's own ``EngineArgs`` built from ``args`` (as the worker builds it): an unknown key, a wrong type
    or an invalid compilation setting raises here. The engine config itself is too heavy to build on a CPU."""
    from vllm.engine.arg_utils import EngineArgs

    return EngineArgs(**args)


def test_engine_knobs_reach_the_engine_arguments() -> None:
    engine = vllm_accepts(engine_args(settings(
        MAX_MODEL_LEN="2048", GPU_MEMORY_UTILIZATION="0.5", DTYPE="bfloat16", ENABLE_PREFIX_CACHING="0",
        VLLM_QUANTIZATION="fp8", VLLM_KV_CACHE_DTYPE="fp8", VLLM_LOAD_FORMAT="safetensors",
        VLLM_MAX_NUM_SEQS="4096", VLLM_MAX_NUM_BATCHED_TOKENS="65536", TENSOR_PARALLEL_SIZE="2",
        PIPELINE_PARALLEL_SIZE="2", DATA_PARALLEL_SIZE="2", DISTRIBUTED_EXECUTOR_BACKEND="ray",
        ENFORCE_EAGER="1", VLLM_MAX_CUDAGRAPH_CAPTURE_SIZE="1024", SEED="7", MODEL_DIR="/models/m",
    )))
    assert engine.model == "/models/m"
    assert engine.max_model_len == 2048 and engine.gpu_memory_utilization == 0.5
    assert engine.dtype == "bfloat16" and engine.enable_prefix_caching is False
    assert engine.quantization == "fp8" and engine.kv_cache_dtype == "fp8"
    assert engine.load_format == "safetensors"
    assert engine.max_num_seqs == 4096 and engine.max_num_batched_tokens == 65536
    assert (engine.tensor_parallel_size, engine.pipeline_parallel_size, engine.data_parallel_size) == (2, 2, 2)
    assert engine.distributed_executor_backend == "ray" and engine.enforce_eager is True
    assert engine.max_cudagraph_capture_size == 1024 and engine.seed == 7
    assert engine.speculative_config is None


def test_empty_knobs_are_left_to_the_engine() -> None:
    from vllm.engine.arg_utils import EngineArgs

    engine = vllm_accepts(engine_args(settings(VLLM_MAX_NUM_SEQS="", VLLM_QUANTIZATION="")))
    default = EngineArgs(model=engine.model)
    for key in ("max_num_seqs", "max_num_batched_tokens", "quantization", "kv_cache_dtype",
                "distributed_executor_backend", "max_cudagraph_capture_size", "kv_cache_memory_bytes",
                "compilation_config", "cudagraph_capture_sizes"):
        assert getattr(engine, key) == getattr(default, key), key


@pytest.mark.parametrize("preset", preset_names())
def test_every_preset_gives_arguments_vllm_accepts(preset: str) -> None:
    s = Settings.from_environ({k: v.value for k, v in layer({}, preset).items()})
    engine = vllm_accepts(engine_args(s))
    assert engine.max_model_len == s.max_model_len and engine.seed == s.seed


def test_compilation_and_kv_cache_knobs_reach_the_engine() -> None:
    from vllm.config import CompilationMode, CUDAGraphMode

    engine = vllm_accepts(engine_args(settings(VLLM_COMPILATION_MODE="none", VLLM_CUDAGRAPH_MODE="Full_Decode_Only",
                                               VLLM_KV_CACHE_MEMORY_BYTES="10GiB")))
    assert engine.compilation_config.mode == CompilationMode.NONE
    assert engine.compilation_config.cudagraph_mode == CUDAGraphMode.FULL_DECODE_ONLY
    assert engine.kv_cache_memory_bytes == 10 * 2**30
    full = vllm_accepts(engine_args(settings(VLLM_CUDAGRAPH_MODE="full"))).compilation_config
    assert full.cudagraph_mode == CUDAGraphMode.FULL and full.mode is None  # the mode is left to vLLM
    sizes = vllm_accepts(engine_args(settings(VLLM_CUDAGRAPH_CAPTURE_SIZES="2048,1,256,8",
                                              VLLM_MAX_CUDAGRAPH_CAPTURE_SIZE="")))
    assert sizes.cudagraph_capture_sizes == [1, 8, 256, 2048] and sizes.max_cudagraph_capture_size is None
    for raw, expected in (("12884901888", 12884901888), ("8G", 8 * 10**9), ("512MiB", 512 * 2**20), ("1.5GiB", 3 * 2**29)):
        assert settings(VLLM_KV_CACHE_MEMORY_BYTES=raw).vllm_kv_cache_memory_bytes == expected, raw


def test_ngram_speculation() -> None:
    from vllm.config import SpeculativeConfig

    engine = vllm_accepts(engine_args(settings(ENABLE_SPECULATIVE_DECODING="1", SPEC_METHOD="ngram",
                                               SPEC_NUM_SPECULATIVE_TOKENS="5", SPEC_NGRAM_LOOKUP_MAX="7",
                                               SPEC_NGRAM_LOOKUP_MIN="2")))
    spec = SpeculativeConfig(**engine.speculative_config)  # vLLM validates it (names, types, min <= max)
    assert (spec.method, spec.num_speculative_tokens, spec.prompt_lookup_max, spec.prompt_lookup_min) == \
        ("ngram", 5, 7, 2)


def test_draft_model_speculation(tmp_path: Path) -> None:
    import dataclasses

    from vllm.config import SpeculativeConfig

    draft = tmp_path / "draft"
    draft.mkdir()
    (draft / "config.json").write_text("{}")
    env = {"ENABLE_SPECULATIVE_DECODING": "1", "SPEC_METHOD": "draft_model", "SPEC_DRAFT_MODEL_ID": "x/draft",
           "SPEC_DRAFT_MODEL_DIR": str(draft), "SPEC_NUM_SPECULATIVE_TOKENS": "4"}
    spec = vllm_accepts(engine_args(settings(**env))).speculative_config
    # Building vLLM's SpeculativeConfig for a draft loads the draft model: check the names it takes instead.
    assert set(spec) <= {f.name for f in dataclasses.fields(SpeculativeConfig)}, spec
    assert (spec["method"], spec["model"], spec["num_speculative_tokens"]) == ("draft_model", str(draft), 4)


def test_missing_draft_optional_turns_speculation_off_required_fails(tmp_path: Path) -> None:
    env = {"ENABLE_SPECULATIVE_DECODING": "1", "SPEC_METHOD": "draft_model", "SPEC_DRAFT_MODEL_ID": "x/draft",
           "SPEC_DRAFT_MODEL_DIR": str(tmp_path / "absent")}
    assert speculative_config(settings(**env, SPEC_DRAFT_OPTIONAL="1")) is None
    with pytest.raises(EngineUnavailable, match="SPEC_DRAFT_OPTIONAL=0"):
        speculative_config(settings(**env, SPEC_DRAFT_OPTIONAL="0"))


def test_stop_token_ids_are_the_end_of_turn_tokens(demo_model: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(demo_model)
    ids = stop_token_ids(tok)
    assert set(ids) == {tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")}


def test_warmup_reads_every_record_shape(tmp_path: Path) -> None:
    jsonl = tmp_path / "w.jsonl"
    rows = [
        {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "什么是warp？"},
                      {"role": "assistant", "content": "a"}]},
        {"prompt": "什么是bank冲突？"},
        {"question": "共享内存有多大？"},
        {"instruction": "解释合并访存。"},
        {"other": 1},
    ]
    jsonl.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\nnot json\n\n")
    assert load_questions(jsonl, 100) == ["什么是warp？", "什么是bank冲突？", "共享内存有多大？", "解释合并访存。"]
    assert load_questions(jsonl, 2) == ["什么是warp？", "什么是bank冲突？"]
    listing = tmp_path / "w.json"
    listing.write_text(json.dumps(["问题一", {"prompt": "问题二"}], ensure_ascii=False))
    assert load_questions(listing, 10) == ["问题一", "问题二"]


def test_missing_warmup_file_is_no_warmup(tmp_path: Path) -> None:
    assert load_questions(tmp_path / "absent.jsonl", 7000) == []
    assert load_questions(None, 7000) == []
