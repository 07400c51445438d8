"""What reaches vLLM from the settings, and the warmup file readers (no engine started)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from service.backends.base import EngineUnavailable
from service.backends.vllm_engine import engine_args, speculative_config, stop_token_ids
from service.pipeline.warmup import load_questions
from service.settings import Settings


def settings(**env: str) -> Settings:
    return Settings.from_environ(env)


def test_engine_knobs_reach_the_engine_arguments() -> None:
    args = engine_args(settings(
        MAX_MODEL_LEN="2048", GPU_MEMORY_UTILIZATION="0.5", DTYPE="bfloat16", ENABLE_PREFIX_CACHING="0",
        VLLM_QUANTIZATION="fp8", VLLM_KV_CACHE_DTYPE="fp8", VLLM_LOAD_FORMAT="safetensors",
        VLLM_MAX_NUM_SEQS="4096", VLLM_MAX_NUM_BATCHED_TOKENS="65536", TENSOR_PARALLEL_SIZE="2",
        PIPELINE_PARALLEL_SIZE="2", DATA_PARALLEL_SIZE="2", DISTRIBUTED_EXECUTOR_BACKEND="ray",
        ENFORCE_EAGER="1", VLLM_MAX_CUDAGRAPH_CAPTURE_SIZE="1024", SEED="7",
    ))
    assert args["max_model_len"] == 2048 and args["gpu_memory_utilization"] == 0.5
    assert args["dtype"] == "bfloat16" and args["enable_prefix_caching"] is False
    assert args["quantization"] == "fp8" and args["kv_cache_dtype"] == "fp8"
    assert args["load_format"] == "safetensors"
    assert args["max_num_seqs"] == 4096 and args["max_num_batched_tokens"] == 65536
    assert (args["tensor_parallel_size"], args["pipeline_parallel_size"], args["data_parallel_size"]) == (2, 2, 2)
    assert args["distributed_executor_backend"] == "ray" and args["enforce_eager"] is True
    assert args["max_cudagraph_capture_size"] == 1024 and args["seed"] == 7
    assert "speculative_config" not in args


def test_empty_knobs_are_left_to_the_engine() -> None:
    args = engine_args(settings(VLLM_MAX_NUM_SEQS="", VLLM_QUANTIZATION=""))
    for key in ("max_num_seqs", "max_num_batched_tokens", "quantization", "kv_cache_dtype",
                "distributed_executor_backend", "max_cudagraph_capture_size", "kv_cache_memory_bytes",
                "compilation_config", "cudagraph_capture_sizes"):
        assert key not in args, key


def test_compilation_and_kv_cache_knobs_reach_the_engine() -> None:
    args = engine_args(settings(VLLM_COMPILATION_MODE="none", VLLM_CUDAGRAPH_MODE="Full_Decode_Only",
                                VLLM_KV_CACHE_MEMORY_BYTES="10GiB"))
    assert args["compilation_config"] == {"mode": "NONE", "cudagraph_mode": "FULL_DECODE_ONLY"}
    assert args["kv_cache_memory_bytes"] == 10 * 2**30
    assert engine_args(settings(VLLM_CUDAGRAPH_MODE="full"))["compilation_config"] == {"cudagraph_mode": "FULL"}
    sizes = engine_args(settings(VLLM_CUDAGRAPH_CAPTURE_SIZES="2048,1,256,8", VLLM_MAX_CUDAGRAPH_CAPTURE_SIZE=""))
    assert sizes["cudagraph_capture_sizes"] == [1, 8, 256, 2048]
    for raw, expected in (("12884901888", 12884901888), ("8G", 8 * 10**9), ("512MiB", 512 * 2**20), ("1.5GiB", 3 * 2**29)):
        assert settings(VLLM_KV_CACHE_MEMORY_BYTES=raw).vllm_kv_cache_memory_bytes == expected, raw


def test_ngram_speculation() -> None:
    spec = engine_args(settings(ENABLE_SPECULATIVE_DECODING="1"))["speculative_config"]
    assert spec == {"method": "ngram", "num_speculative_tokens": 6, "prompt_lookup_max": 8, "prompt_lookup_min": 1}


def test_draft_model_speculation(tmp_path: Path) -> None:
    draft = tmp_path / "draft"
    draft.mkdir()
    (draft / "config.json").write_text("{}")
    env = {"ENABLE_SPECULATIVE_DECODING": "1", "SPEC_METHOD": "draft_model", "SPEC_DRAFT_MODEL_ID": "x/draft",
           "SPEC_DRAFT_MODEL_DIR": str(draft), "SPEC_NUM_SPECULATIVE_TOKENS": "4"}
    assert speculative_config(settings(**env)) == {"method": "draft_model", "model": str(draft),
                                                   "num_speculative_tokens": 4}


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
