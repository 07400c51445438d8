"""The service's settings: one typed, frozen object built once from the environment at start-up.

This is the only module of the service that reads the process environment (``Settings.from_environ``).
Defaults are not written here: a variable missing from the environment takes its value from
``env/defaults.env`` (the single source), so the service started by hand and the service started by
``inv run`` agree.  Layout variables set to ``auto`` are derived here from the hardware and the model
(``env.resolve_layout``), with the reason kept in ``Settings.layout`` for GET /info.  Every invalid value
is reported at once, naming the variable, the value and what is allowed; nothing is silently replaced.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import Any

import msgspec

from env import SECRETS, layer, resolve_layout
from env.provenance import sources as _sources
from service.contract.sampling import LIMITS
from service.parsers import (
    _bool,
    _choice,
    _float,
    _int,
    _level,
    _list,
    _optional_bool,
    _optional_bytes,
    _optional_path,
    _optional_text,
    _path,
    _sizes,
    _stop_list,
    _switch_or_auto,
    _text,
)

log = logging.getLogger("service")


class SettingsError(ValueError):
    """One or more invalid variables; ``str()`` lists each with its value and what is allowed."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid settings:\n  " + "\n  ".join(problems))


def var(parse: Callable[[str], Any], doc: str, *, secret: bool = False) -> Any:
    """A settings field read from the variable of the same name in upper case."""
    return field(repr=not secret, metadata={"parse": parse, "doc": doc, "secret": secret})


@dataclass(frozen=True, slots=True)
class Settings:
    """Every variable of SPEC section 2, plus the vLLM and server knobs; defaults in env/defaults.env.

    Fields that the service does not read itself (validated, shown in GET /info) say who does in their doc.
    """

    # server
    host: str = var(_text, "Address the server binds (passed to uvicorn by `inv run`).")
    port: int = var(_int(1, 65535), "Port the server binds (passed to uvicorn by `inv run`; the harness uses 8000).")
    log_level: str = var(_level, "Log level of the service.")
    shutdown_timeout: int = var(_int(0, 3600), "Seconds in-flight requests may run on after SIGTERM.")
    admin_token: str = var(_text, "Token for POST /system_prompt; empty: loopback clients only.", secret=True)
    api_key: str = var(_text, "Key the OpenAI-compatible /v1 routes require as `Authorization: Bearer`; empty: open.",
                       secret=True)
    served_model_name: str = var(_text, "Model id of the /v1 routes; empty: MODEL_ID.")
    max_request_bytes: int = var(_int(1024), "Largest accepted request body in bytes.")
    max_batch_questions: int = var(_int(1), "Most questions in one request.")
    # model
    model_id: str = var(_text, "ModelScope model id, or `demo` for the local tiny model (read by the downloader).")
    model_revision: str = var(_text, "Model revision, branch or tag (read by the downloader).")
    model_dir: Path = var(_path, "Directory of the model to serve.")
    modelscope_api_token: str = var(_text, "ModelScope token, empty: anonymous (read by the downloader).", secret=True)
    # speculative decoding
    enable_speculative_decoding: bool = var(_bool, "Turn on speculative decoding.")
    spec_method: str = var(_choice("ngram", "draft_model", "eagle", "eagle3", "medusa", "mlp_speculator", "mtp"),
                           "Speculative method.")
    spec_num_speculative_tokens: int = var(_int(1, 64), "Tokens proposed per step.")
    spec_ngram_lookup_max: int = var(_int(1, 64), "Largest n-gram matched (ngram method).")
    spec_ngram_lookup_min: int = var(_int(1, 64), "Smallest n-gram matched (ngram method).")
    spec_draft_model_id: str = var(_text, "Draft model id (draft-model methods; read by the downloader).")
    spec_draft_model_revision: str = var(_text, "Draft model revision (read by the downloader).")
    spec_draft_model_dir: Path = var(_path, "Directory of the draft model.")
    spec_draft_optional: bool = var(_bool, "A missing draft is a warning (speculation off) rather than an error.")
    # engine
    use_vllm: str = var(_switch_or_auto,
                        "true: vLLM or a start-up error; false: transformers; auto: vLLM else transformers.")
    gpu_memory_utilization: float = var(_float(0.0, 1.0, lo_open=True),
                                        "Fraction of GPU memory for the engine (on the CPU: of host RAM for KV).")
    dtype: str = var(_choice("auto", "float16", "bfloat16", "float32", "half", "float"), "vLLM weight dtype.")
    transformers_dtype: str = var(_choice("auto", "float16", "bfloat16", "float32"), "transformers weight dtype.")
    max_model_len: int = var(_int(16, 1_048_576), "Context length (prompt + answer) in tokens.")
    enable_prefix_caching: bool = var(_bool, "vLLM prefix caching (the system prompt is shared).")
    vllm_quantization: str | None = var(_optional_text, "vLLM quantization method (empty: none).")
    vllm_kv_cache_dtype: str | None = var(_optional_text, "KV-cache dtype (empty: the engine's).")
    vllm_load_format: str = var(_text, "vLLM load format.")
    vllm_max_num_seqs: int | None = var(_int(1, 65536, optional=True), "Most sequences per engine step.")
    vllm_max_num_batched_tokens: int | None = var(_int(1, 10_000_000, optional=True), "Token budget per step.")
    tensor_parallel_size: int = var(_int(1, 1024), "Tensor-parallel GPUs.")
    pipeline_parallel_size: int = var(_int(1, 1024), "Pipeline-parallel stages.")
    data_parallel_size: int = var(_int(1, 1024), "Data-parallel engine replicas.")
    distributed_executor_backend: str | None = var(_choice("mp", "ray", "uni", "external_launcher", optional=True),
                                                   "Executor for several GPUs/hosts (empty: the engine decides).")
    enforce_eager: bool = var(_bool, "Disable CUDA graphs.")
    vllm_max_cudagraph_capture_size: int | None = var(_int(1, 65536, optional=True),
                                                      "Largest batch captured as a CUDA graph.")
    vllm_cudagraph_capture_sizes: tuple[int, ...] | None = var(
        _sizes, "Batch sizes captured as CUDA graphs (empty: the engine's, every 8 or 16 up to the largest).")
    vllm_compilation_mode: str | None = var(
        _choice("none", "stock_torch_compile", "dynamo_trace_once", "vllm_compile", optional=True),
        "vLLM compilation mode (empty: the engine's; none: no torch.compile, the fastest start-up).")
    vllm_cudagraph_mode: str | None = var(
        _choice("none", "piecewise", "full", "full_decode_only", "full_and_piecewise", optional=True),
        "vLLM CUDA-graph mode (empty: the engine's; piecewise needs vllm_compile).")
    vllm_kv_cache_memory_bytes: int | None = var(
        _optional_bytes, "KV-cache size per engine, e.g. 8GiB (empty: GPU_MEMORY_UTILIZATION decides by profiling).")
    engine_workers: int = var(_int(1, 64), "Engine workers sharing the device; questions are split over them.")
    engine_frontend: str = var(_choice("async", "sync"),
                               "vLLM front end: async (AsyncLLM, as vLLM's API server) or sync (LLMEngine stepped "
                               "on one thread, as LLM.generate).")
    vllm_async_scheduling: bool | None = var(_optional_bool, "Overlap scheduling with execution (empty: engine decides).")
    pretokenize: bool = var(_bool, "Tokenise prompts in one batch in the engine worker and pass token ids.")
    detokenize_at_end: bool = var(_bool, "Decode answers once when finished, not token by token, when no stop string needs the text.")
    engine_stats: bool = var(_bool, "vLLM's per-step statistics (running/waiting sequences in /metrics); cost CPU per token.")
    seed: int = var(_int(0), "Engine random seed.")
    # batch
    batch_mode: bool = var(_bool, "Health says `batch`: the harness posts all questions at once.")
    batch_concurrency: int = var(_int(1, 1_000_000), "Most questions in an engine at once, over all requests (each of ENGINE_WORKERS has its own).")
    vllm_batch_use_llm: bool = var(_bool, "Accepted for compatibility, not used: list requests always go to the engine in one submission.")
    # decoding
    temperature: float = var(LIMITS["temperature"].parse, "Sampling temperature (0 = greedy).")
    top_p: float = var(LIMITS["top_p"].parse, "Nucleus sampling mass.")
    top_k: int = var(LIMITS["top_k"].parse, "Top-k (-1 or 0: off).")
    repetition_penalty: float = var(LIMITS["repetition_penalty"].parse, "Repetition penalty (1 = off).")
    frequency_penalty: float = var(LIMITS["frequency_penalty"].parse, "Frequency penalty (0 = off).")
    # length / routing
    max_new_tokens: int = var(_int(1, 1_048_576), "Answer budget of ordinary questions.")
    disable_token_routing: bool = var(_bool, "Give every question MAX_NEW_TOKENS.")
    max_new_tokens_code: int = var(_int(1, 1_048_576), "Budget of long-answer questions.")
    max_new_tokens_code_hard: int = var(_int(1, 1_048_576), "Budget of hard code questions.")
    max_new_tokens_code_soft: int = var(_int(1, 1_048_576), "Budget of code questions.")
    hard_code_min_hits: int = var(_int(1, 100), "Hard-code signals needed to route a question as hard code.")
    long_answer_enable_default: bool = var(_bool, "Use the built-in long-answer keywords.")
    long_answer_min_hits: int = var(_int(1, 100), "Long-answer keywords needed to route a question as long.")
    hard_code_question_keywords: tuple[str, ...] = var(_list, "Extra hard-code signals (comma-separated).")
    long_answer_keywords: tuple[str, ...] = var(_list, "Extra long-answer keywords (comma-separated).")
    code_question_keywords: tuple[str, ...] = var(_list, "Extra code-question keywords (comma-separated).")
    # stop
    stop_strings: tuple[str, ...] = var(_stop_list, "Stop strings (comma-separated).")
    stop_on_double_newline: bool = var(_bool, "Also stop at a blank line (put first).")
    # output
    output_trim_examples: bool = var(_bool, "Cut short answers before 例如：/比如：/举例来说：/举例：.")
    output_max_sentences: int = var(_int(), "Sentences kept in short answers (clamped to 1..12).")
    # system prompt
    system_prompt: str = var(_text, "Default system prompt.")
    system_prompt_file: Path | None = var(_optional_path, "File whose text replaces SYSTEM_PROMPT.")
    # warmup
    warmup_data_path: Path | None = var(_optional_path, "Warmup questions (jsonl/json); a missing file: no warmup.")
    warmup_num_samples: int = var(_int(0), "Warmup questions taken from the file.")
    warmup_repeat: int = var(_int(0, 100), "Passes over the warmup questions.")
    # process
    omp_num_threads: int = var(_int(1, 4096), "OpenMP threads, CPU engine and torch (OpenMP reads the process environment; `inv run` exports it).")
    engine_stall_timeout: float = var(_float(0.0), "Seconds a worker with calls in flight may make no progress (0: off).")
    restart_limit: int = var(_int(0, 1000), "Incidents (workers failing together count once) allowed within RESTART_WINDOW; one more: exit 1.")
    restart_window: int = var(_int(1), "Seconds over which worker crashes are counted against RESTART_LIMIT.")
    fault_inject: str = var(_text, "Test only: raise_on= / hang_on= / die_after= / hold_on=TEXT (with hold_dir=DIR), ;-separated: faults a question in the worker.")
    # not a variable: (KEY, value, reason) of each layout value derived from `auto` (env/layout.py)
    layout: tuple[tuple[str, str, str], ...] = ()
    sources: tuple[tuple[str, str], ...] = ()  # not a variable: (KEY, shell/default/preset/auto) (env/provenance.py)

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> Settings:
        """Parse every field from ``environ``, taking missing variables from env/defaults.env.

        Layout variables that are ``auto`` are derived for this host and the model in MODEL_DIR.
        """
        layered = resolve_layout(layer(environ))
        values = {key: item.value for key, item in layered.items()}
        problems: list[str] = []
        parsed: dict[str, Any] = {}
        for f in variables():
            name = f.name.upper()
            if name not in values:
                problems.append(f"{name} is missing from env/defaults.env (a bug: every setting needs a default)")
                continue
            raw = values[name]
            try:
                parsed[f.name] = f.metadata["parse"](raw)
            except ValueError as exc:
                shown = "***" if f.metadata["secret"] else repr(raw)
                problems.append(f"{name}={shown}: {exc}")
        if not problems:
            problems.extend(_cross_checks(parsed))
        if problems:
            raise SettingsError(problems)
        clamped = min(12, max(1, parsed["output_max_sentences"]))
        if clamped != parsed["output_max_sentences"]:
            log.warning("OUTPUT_MAX_SENTENCES=%s clamped to %s (allowed 1..12)", parsed["output_max_sentences"], clamped)
            parsed["output_max_sentences"] = clamped
        layout = tuple((key, item.value, item.reason or "") for key, item in layered.items() if item.source == "auto")
        return cls(**parsed, layout=layout, sources=_sources(environ, layered))

    def to_wire(self) -> bytes:
        """These settings as the worker's ``Setup`` frame carries them (msgpack): parsed once, in the API process."""
        return _ENCODER.encode(self)

    @classmethod
    def from_wire(cls, data: bytes) -> Settings:
        """The settings ``to_wire`` encoded (the engine worker's, exactly the API process's)."""
        return msgspec.msgpack.decode(data, type=cls, dec_hook=_path)

    @property
    def backend(self) -> str:
        """``vllm``, ``transformers`` or ``auto`` as chosen by USE_VLLM."""
        return {"true": "vllm", "false": "transformers"}.get(self.use_vllm, "auto")

    @property
    def engines_start_together(self) -> bool:
        """Whether several engines on one device may start at once.

        vLLM sizes the KV cache by profiling the device's free memory, which another engine starting beside it
        would disturb (and vLLM asserts on); a fixed ``VLLM_KV_CACHE_MEMORY_BYTES`` skips that profiling.
        """
        return self.vllm_kv_cache_memory_bytes is not None

    def load_system_prompt(self) -> str:
        """SYSTEM_PROMPT, or the text of SYSTEM_PROMPT_FILE when that is set."""
        if self.system_prompt_file is None:
            return self.system_prompt
        try:
            return self.system_prompt_file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise SettingsError([f"SYSTEM_PROMPT_FILE={str(self.system_prompt_file)!r}: cannot read ({exc.strerror})"]) from None

    def public(self) -> dict[str, Any]:
        """The effective values for GET /info, secrets masked."""
        out: dict[str, Any] = {}
        for f in variables():
            value = getattr(self, f.name)
            if f.metadata["secret"]:
                value = "***" if value else ""
            elif isinstance(value, Path):
                value = str(value)
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name.upper()] = value
        return out

    def layout_info(self) -> dict[str, dict[str, str]]:
        """The derived layout values for GET /info: ``{KEY: {"value", "source": "auto", "reason"}}``."""
        return {key: {"value": value, "source": "auto", "reason": reason} for key, value, reason in self.layout}


def _path_text(value: Any) -> Any:
    if isinstance(value, PurePath):
        return str(value)
    raise NotImplementedError(f"cannot encode {type(value).__name__}")


def _path(kind: type, value: Any) -> Any:
    if kind is Path:
        return Path(value)
    raise NotImplementedError(f"cannot decode {kind}")


_ENCODER = msgspec.msgpack.Encoder(enc_hook=_path_text)


def _cross_checks(p: Mapping[str, Any]) -> list[str]:
    problems = []
    if p["spec_ngram_lookup_min"] > p["spec_ngram_lookup_max"]:
        problems.append(
            f"SPEC_NGRAM_LOOKUP_MIN={p['spec_ngram_lookup_min']} is larger than "
            f"SPEC_NGRAM_LOOKUP_MAX={p['spec_ngram_lookup_max']}: allowed MIN <= MAX"
        )
    if p["enable_speculative_decoding"] and p["spec_method"] != "ngram" and not p["spec_draft_model_id"]:
        problems.append(f"SPEC_METHOD={p['spec_method']!r} needs SPEC_DRAFT_MODEL_ID (or use SPEC_METHOD=ngram)")
    if p["engine_workers"] * p["gpu_memory_utilization"] > 1.0:
        problems.append(
            f"ENGINE_WORKERS={p['engine_workers']} x GPU_MEMORY_UTILIZATION={p['gpu_memory_utilization']} is "
            "more than the whole device: allowed product <= 1 (the utilisation is each worker's share)"
        )
    sizes, largest = p["vllm_cudagraph_capture_sizes"], p["vllm_max_cudagraph_capture_size"]
    if sizes is not None and largest is not None and largest != sizes[-1]:
        problems.append(
            f"VLLM_MAX_CUDAGRAPH_CAPTURE_SIZE={largest} is not the largest of VLLM_CUDAGRAPH_CAPTURE_SIZES "
            f"({sizes[-1]}): allowed equal, or leave VLLM_MAX_CUDAGRAPH_CAPTURE_SIZE empty"
        )
    for name in ("max_new_tokens", "max_new_tokens_code", "max_new_tokens_code_hard", "max_new_tokens_code_soft"):
        if p[name] >= p["max_model_len"]:
            problems.append(
                f"{name.upper()}={p[name]} leaves no room for the prompt: allowed < MAX_MODEL_LEN={p['max_model_len']}"
            )
    return problems


def variables() -> list[dataclasses.Field[Any]]:
    """The fields of Settings read from a variable (``layout`` is derived, not read)."""
    return [f for f in dataclasses.fields(Settings) if "parse" in f.metadata]


def describe() -> list[tuple[str, str]]:
    """(variable, documentation) for every setting, for docs and `inv env`."""
    return [(f.name.upper(), f.metadata["doc"]) for f in variables()]


__all__ = ["SECRETS", "Settings", "SettingsError", "describe", "variables"]
