"""The engine layout derived from the hardware and the model (``auto``): rules, constraints, provenance.

Real code throughout: the hardware is an ``Hardware`` value, or a fake ``nvidia-smi`` script first on PATH.
"""

from __future__ import annotations

import json
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from env import (
    LAYOUT_KEYS,
    Hardware,
    ModelShape,
    derive,
    layer,
    layout_lines,
    probe_hardware,
    read_model_shape,
    with_layout,
)
from env.launcher import show_env
from service.settings import Settings

GiB = 2**30
H200 = Hardware(gpus=1, gpu_name="NVIDIA H200", gpu_memory_bytes=143_771 * 2**20, cpu_cores=16)
NO_GPU = Hardware(gpus=0, gpu_name="", gpu_memory_bytes=0, cpu_cores=2)
SMALL = ModelShape(layers=24, hidden=896, heads=14, kv_heads=2, head_dim=64, vocab=151936, intermediate=4864, tied=True)
QWEN25_05B = {"num_hidden_layers": 24, "hidden_size": 896, "num_attention_heads": 14, "num_key_value_heads": 2,
              "vocab_size": 151936, "intermediate_size": 4864, "tie_word_embeddings": True}
QWEN3_4B = {"num_hidden_layers": 36, "hidden_size": 2560, "num_attention_heads": 32, "num_key_value_heads": 8,
            "head_dim": 128, "vocab_size": 151936, "intermediate_size": 9728, "tie_word_embeddings": True}
# The values of defaults.env before `auto`: a host without a GPU must keep them.
TODAY = {"ENGINE_WORKERS": "1", "GPU_MEMORY_UTILIZATION": "0.97", "VLLM_KV_CACHE_MEMORY_BYTES": "",
         "VLLM_MAX_NUM_SEQS": "1024", "VLLM_MAX_NUM_BATCHED_TOKENS": "", "VLLM_MAX_CUDAGRAPH_CAPTURE_SIZE": "",
         "VLLM_CUDAGRAPH_CAPTURE_SIZES": "", "VLLM_COMPILATION_MODE": "", "VLLM_CUDAGRAPH_MODE": "",
         "ENGINE_FRONTEND": "async", "ENGINE_STATS": "1", "BATCH_CONCURRENCY": "512"}


def model_dir(tmp_path: Path, config: dict[str, object], name: str = "model") -> Path:
    path = tmp_path / name
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"model_type": "qwen2", **config}))
    return path


def resolved(hardware: Hardware, model: Path | None, **shell: str) -> dict[str, str]:
    """The layered defaults with ``shell`` exported and the layout derived for ``hardware`` and ``model``."""
    if model is not None:
        shell = {"MODEL_DIR": str(model), **shell}
    values = with_layout(layer(shell), hardware, read_model_shape(model) if model else None)
    return {key: item.value for key, item in values.items()}


@pytest.fixture
def fake_smi(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A directory first on PATH for a fake ``nvidia-smi``; the probe's cache is cleared around the test."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    probe_hardware.cache_clear()
    yield bin_dir
    probe_hardware.cache_clear()


def write_smi(bin_dir: Path, body: str) -> None:
    script = bin_dir / "nvidia-smi"
    script.write_text(f"#!/bin/sh\n{body}\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)


def h200_smi(bin_dir: Path) -> None:
    write_smi(bin_dir, 'case "$*" in *--query-gpu=name,memory.total*) echo "NVIDIA H200, 143771";; *) exit 9;; esac')


# --- the model's shape ---------------------------------------------------------------------------------


def test_model_shapes_from_config_json(tmp_path: Path) -> None:
    small = read_model_shape(model_dir(tmp_path, QWEN25_05B, "small"))
    assert small == SMALL
    assert abs(small.params - 0.49e9) < 0.01e9 and small.kv_bytes_per_token() == 12_288
    large = read_model_shape(model_dir(tmp_path, QWEN3_4B, "large"))
    assert large is not None and abs(large.params - 4.0e9) < 0.05e9
    assert large.kv_bytes_per_token() == 147_456 and large.kv_bytes_per_token(1) == 73_728
    assert read_model_shape(tmp_path / "missing") is None
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{not json")
    assert read_model_shape(tmp_path / "broken") is None


# --- the rules -----------------------------------------------------------------------------------------


def test_h200_small_model_gets_six_engines_and_valid_settings(tmp_path: Path) -> None:
    model = model_dir(tmp_path, QWEN25_05B)
    env = resolved(H200, model)
    assert env["ENGINE_WORKERS"] == "6" and env["GPU_MEMORY_UTILIZATION"] == "0.16"
    assert (env["ENGINE_FRONTEND"], env["VLLM_COMPILATION_MODE"], env["VLLM_CUDAGRAPH_MODE"]) == (
        "sync", "none", "full_decode_only")
    assert env["VLLM_KV_CACHE_MEMORY_BYTES"] == "12GiB"  # 2048 x 512 tokens x 12,288 B, within each share
    assert env["VLLM_MAX_NUM_SEQS"] == "2048" and env["VLLM_MAX_NUM_BATCHED_TOKENS"] == "65536"
    assert env["VLLM_CUDAGRAPH_CAPTURE_SIZES"].split(",")[-1] == env["VLLM_MAX_CUDAGRAPH_CAPTURE_SIZE"] == "2048"
    assert env["BATCH_CONCURRENCY"] == "8192"
    assert env["ENGINE_STATS"] == "0"  # six scheduler-bound engines: vLLM's statistics cost 7 % of a batch
    settings = Settings.from_environ(env)
    assert not settings.engine_stats
    assert settings.engine_workers == 6 and settings.vllm_kv_cache_memory_bytes == 12 * GiB
    assert settings.vllm_cudagraph_capture_sizes[-1] == 2048
    reason = derive({"ENGINE_WORKERS": "auto"}, H200, read_model_shape(model))["ENGINE_WORKERS"][1]
    assert "NVIDIA H200" in reason and "16 cores" in reason and "0.49 B" in reason


def test_h200_large_model_gets_one_async_engine(tmp_path: Path) -> None:
    env = resolved(H200, model_dir(tmp_path, QWEN3_4B), MAX_MODEL_LEN="8192", MAX_NEW_TOKENS="512")
    assert (env["ENGINE_WORKERS"], env["ENGINE_FRONTEND"], env["VLLM_KV_CACHE_MEMORY_BYTES"]) == ("1", "async", "")
    assert (env["VLLM_MAX_NUM_SEQS"], env["VLLM_MAX_NUM_BATCHED_TOKENS"]) == ("2048", "32768")
    assert env["GPU_MEMORY_UTILIZATION"] == "0.92" and env["VLLM_CUDAGRAPH_CAPTURE_SIZES"] == ""
    assert env["ENGINE_STATS"] == "1"
    assert Settings.from_environ(env).engine_workers == 1


def test_missing_config_assumes_a_small_model_and_says_so() -> None:
    derived = derive({key: "auto" for key in LAYOUT_KEYS}, H200, None)
    assert derived["ENGINE_WORKERS"][0] == "6" and "assuming" in derived["ENGINE_WORKERS"][1]


def test_explicit_engine_workers_is_a_constraint(tmp_path: Path) -> None:
    env = resolved(H200, model_dir(tmp_path, QWEN25_05B), ENGINE_WORKERS="4")
    assert env["ENGINE_WORKERS"] == "4" and env["GPU_MEMORY_UTILIZATION"] == "0.24"
    assert env["ENGINE_FRONTEND"] == "sync" and env["VLLM_KV_CACHE_MEMORY_BYTES"].endswith("GiB")
    assert Settings.from_environ(env).engine_workers == 4
    kept = resolved(H200, model_dir(tmp_path, QWEN25_05B, "again"), ENGINE_STATS="1")
    assert kept["ENGINE_STATS"] == "1" and kept["ENGINE_WORKERS"] == "6"  # set by hand: the user's value wins


def test_memory_and_a_fixed_utilisation_limit_the_engines() -> None:
    auto = {key: "auto" for key in LAYOUT_KEYS}
    t4 = Hardware(1, "Tesla T4", 15_360 * 2**20, 16)
    assert derive(auto, t4, SMALL)["ENGINE_WORKERS"][0] == "1"
    capped = derive({**auto, "GPU_MEMORY_UTILIZATION": "0.2"}, H200, SMALL)
    assert capped["ENGINE_WORKERS"][0] == "5" and "GPU_MEMORY_UTILIZATION=0.2" in capped["ENGINE_WORKERS"][1]
    fp8 = derive({**auto, "VLLM_KV_CACHE_DTYPE": "fp8_e4m3", "MAX_MODEL_LEN": "1024"}, H200, SMALL)
    assert fp8["VLLM_KV_CACHE_MEMORY_BYTES"][0] == "6GiB"  # one byte per element: half of 12 GiB


def test_no_gpu_keeps_todays_values(tmp_path: Path) -> None:
    env = resolved(NO_GPU, model_dir(tmp_path, QWEN25_05B))
    assert {key: env[key] for key in LAYOUT_KEYS} == TODAY
    reasons = {reason for _, reason in derive({key: "auto" for key in LAYOUT_KEYS}, NO_GPU, None).values()}
    assert reasons == {"no NVIDIA GPU: the engine's defaults"}


def test_a_shell_value_beats_auto_and_constrains_the_rest(tmp_path: Path) -> None:
    values = with_layout(layer({"VLLM_MAX_NUM_SEQS": "300", "MODEL_DIR": str(model_dir(tmp_path, QWEN25_05B))}),
                         H200, SMALL)
    assert (values["VLLM_MAX_NUM_SEQS"].value, values["VLLM_MAX_NUM_SEQS"].source) == ("300", "shell")
    assert values["ENGINE_WORKERS"].source == "auto" and values["ENGINE_WORKERS"].reason
    assert values["VLLM_CUDAGRAPH_CAPTURE_SIZES"].value == "1,2,4,8,16,32,64,128,256,300"
    assert values["VLLM_MAX_CUDAGRAPH_CAPTURE_SIZE"].value == "300" and values["BATCH_CONCURRENCY"].value == "1200"
    assert layout_lines(with_layout(layer({}, "hopper-0.5b"), H200, SMALL)) == ["no auto values"]


# --- the hardware probe --------------------------------------------------------------------------------


def test_probe_reads_nvidia_smi(fake_smi: Path) -> None:
    write_smi(fake_smi, 'echo "NVIDIA H200, 143771"; echo "NVIDIA H200, 143771"')
    hardware = probe_hardware()
    assert (hardware.gpus, hardware.gpu_name, hardware.gpu_memory_bytes) == (2, "NVIDIA H200", 143_771 * 2**20)
    assert hardware.cpu_cores >= 1


def test_probe_without_or_with_a_failing_nvidia_smi_finds_no_gpu(fake_smi: Path) -> None:
    assert probe_hardware().gpus == 0  # none on PATH
    probe_hardware.cache_clear()
    write_smi(fake_smi, 'echo "NVIDIA-SMI has failed" >&2; exit 9')
    assert probe_hardware() == Hardware(0, "", 0, probe_hardware().cpu_cores)


# --- provenance: inv env, the settings ------------------------------------------------------------------


def test_inv_env_explain_and_export_show_the_derived_values(fake_smi: Path, tmp_path: Path) -> None:
    h200_smi(fake_smi)
    environ = {"MODEL_DIR": str(model_dir(tmp_path, QWEN25_05B)), "PATH": f"{fake_smi}:/usr/bin:/bin"}
    explained = show_env("defaults", False, False, True, False, environ=environ)
    exported = show_env("defaults", False, True, False, False, environ=environ)
    engines = min(8, max(1, (probe_hardware().cpu_cores - 4) // 2))  # (cores-4)//2 of this host
    line = next(x for x in explained.splitlines() if x.startswith("[env] ENGINE_WORKERS "))
    assert f"'{engines}'" in line and "from auto (NVIDIA H200, 140 GiB" in line
    assert f"export ENGINE_WORKERS={engines}" in exported.splitlines()
    assert "export VLLM_MAX_NUM_SEQS=2048" in exported.splitlines()


def test_settings_keep_the_layout_provenance(fake_smi: Path, tmp_path: Path) -> None:
    h200_smi(fake_smi)
    settings = Settings.from_environ({"MODEL_DIR": str(model_dir(tmp_path, QWEN25_05B)), "ENGINE_WORKERS": "3"})
    assert settings.engine_workers == 3 and settings.gpu_memory_utilization == 0.32
    info = settings.layout_info()
    assert "ENGINE_WORKERS" not in info and "LAYOUT" not in settings.public()
    assert info["ENGINE_FRONTEND"] == {"value": "sync", "source": "auto", "reason": info["ENGINE_FRONTEND"]["reason"]}
    assert "3 engines" in info["ENGINE_FRONTEND"]["reason"]
