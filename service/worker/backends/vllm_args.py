"""vLLM's engine arguments from the settings: shared by the service's engine and the benchmark's ceiling."""

from __future__ import annotations

import logging
from typing import Any

from service.contract.errors import EngineUnavailable
from service.settings import Settings

log = logging.getLogger("service")


def engine_args(s: Settings) -> dict[str, Any]:
    """``AsyncEngineArgs`` keyword arguments from the settings (shared with the benchmark's ceiling)."""
    args: dict[str, Any] = {
        "model": str(s.model_dir),
        "dtype": s.dtype,
        "max_model_len": s.max_model_len,
        "gpu_memory_utilization": s.gpu_memory_utilization,
        "enable_prefix_caching": s.enable_prefix_caching,
        "load_format": s.vllm_load_format,
        "tensor_parallel_size": s.tensor_parallel_size,
        "pipeline_parallel_size": s.pipeline_parallel_size,
        "data_parallel_size": s.data_parallel_size,
        "enforce_eager": s.enforce_eager,
        "seed": s.seed,
    }
    optional = {
        "quantization": s.vllm_quantization,
        "kv_cache_dtype": s.vllm_kv_cache_dtype,
        "max_num_seqs": s.vllm_max_num_seqs,
        "max_num_batched_tokens": s.vllm_max_num_batched_tokens,
        "distributed_executor_backend": s.distributed_executor_backend,
        "max_cudagraph_capture_size": s.vllm_max_cudagraph_capture_size,
        "async_scheduling": s.vllm_async_scheduling,
        "kv_cache_memory_bytes": s.vllm_kv_cache_memory_bytes,
        "cudagraph_capture_sizes": list(s.vllm_cudagraph_capture_sizes) if s.vllm_cudagraph_capture_sizes else None,
    }
    args.update({k: v for k, v in optional.items() if v is not None})
    compilation = {"mode": s.vllm_compilation_mode, "cudagraph_mode": s.vllm_cudagraph_mode}
    if any(compilation.values()):
        args["compilation_config"] = {k: v.upper() for k, v in compilation.items() if v is not None}
    spec = speculative_config(s)
    if spec is not None:
        args["speculative_config"] = spec
    return args


def speculative_config(s: Settings) -> dict[str, Any] | None:
    """vLLM's speculative config from SPEC_*; None when off (or an optional draft is missing)."""
    if not s.enable_speculative_decoding:
        return None
    if s.spec_method == "ngram":
        return {
            "method": "ngram",
            "num_speculative_tokens": s.spec_num_speculative_tokens,
            "prompt_lookup_max": s.spec_ngram_lookup_max,
            "prompt_lookup_min": s.spec_ngram_lookup_min,
        }
    if not (s.spec_draft_model_dir / "config.json").is_file():
        message = f"draft model for SPEC_METHOD={s.spec_method} not found in {s.spec_draft_model_dir}"
        if s.spec_draft_optional:
            log.warning("%s; SPEC_DRAFT_OPTIONAL=1, so speculative decoding is off", message)
            return None
        raise EngineUnavailable(f"{message} (SPEC_DRAFT_OPTIONAL=0): run `inv download` or fix SPEC_DRAFT_MODEL_DIR")
    return {"method": s.spec_method, "model": str(s.spec_draft_model_dir),
            "num_speculative_tokens": s.spec_num_speculative_tokens}
