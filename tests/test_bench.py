"""`inv bench --ceiling` with several engine workers: the service and its offline counterpart, both real."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import pytest

from bench.bench import variants
from tests.conftest import PYTHON, ROOT, Server, demo_env


def _processes(marker: bytes) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def test_bench_ceiling_with_two_workers_runs_two_offline_engines(tmp_path: Path, demo_model: Path) -> None:
    """ENGINE_WORKERS=2 with a fixed KV cache: the service starts both engines at once, and the ceiling is two
    offline LLM engines answering the same halves; both generate the same tokens, and nothing is left running."""
    log = tmp_path / "svc.log"
    report_path = tmp_path / "report.json"
    data = tmp_path / "questions.jsonl"
    topics = ["warp", "shared memory", "kernel<<<>>>", "coalescing", "occupancy", "stream", "atomicAdd", "tiling"]
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"问题{i}：什么是{topics[i % 8]}？"},
                                                     {"role": "assistant", "content": "答案"}]}, ensure_ascii=False) + "\n"
                            for i in range(48)), encoding="utf-8")
    # In a session of its own, so that its services and ceiling engines go with it if the test fails.
    bench = Server(
        [PYTHON, "-m", "bench.bench", "--preset", "demo", "--ceiling", "--data", str(data), "--n", "48", "--rounds", "1",
         "--set", "ENGINE_WORKERS=2", "--set", "VLLM_KV_CACHE_MEMORY_BYTES=256MiB", "--set", f"MODEL_DIR={demo_model}",
         "--set", "WARMUP_DATA_PATH=", "--log", str(log),
         "--output", str(report_path), "--json"],
        demo_env(demo_model), cwd=ROOT, log=tmp_path / "bench.out")
    try:
        code = bench.proc.wait(900)
    finally:
        bench.stop()
    assert code == 0, bench.log()[-3000:]
    assert "ceiling: 2 offline engines sharing the device" in bench.log()
    report = json.loads(report_path.read_text())
    service, ceiling = report["service"], report["ceiling"]
    assert service["errors"] == 0 and ceiling["errors"] == 0
    assert ceiling["tokens"]["median"] > 0
    assert ceiling["tokens"]["median"] == service["tokens"]["median"], (service, ceiling)
    assert report["ratio"]["service/ceiling (median seconds)"] > 0
    # Both ceiling engines ran (one log each) and each answered its half.
    for index in (0, 1):
        child_log = (tmp_path / f"svc-ceiling-{index}.log").read_text(errors="replace")
        assert "Initializing a V1 LLM engine" in child_log
    # The service's engines started together: both inits come before the first is ready.
    text = log.read_text(errors="replace")
    assert "starting 2 engine workers at once" in text
    inits = [m.start() for m in re.finditer(r"Initializing a V1 LLM engine", text)]
    assert len(inits) == 2 and max(inits) < text.index("vLLM engine ready in"), text[-3000:]
    assert not _processes(b"bench.ceiling"), "a ceiling engine outlived the benchmark"


def test_a_variant_is_the_preset_environment_with_its_own_values_and_log(tmp_path: Path) -> None:
    """``--variant 'NAME KEY=VALUE ...'``: a second service configuration beside the preset's, logged apart; a
    variant without a KEY=VALUE pair is refused before any service starts."""
    log = tmp_path / "svc.log"
    args = argparse.Namespace(log=str(log), variant=["sync ENGINE_FRONTEND=sync ENGINE_WORKERS=1"])
    (name, env, path), (vname, venv, vpath) = variants(args, {"ENGINE_WORKERS": "2", "MODEL_DIR": "/m"})
    assert (name, env, path) == ("preset", {"ENGINE_WORKERS": "2", "MODEL_DIR": "/m"}, log)
    assert (vname, vpath) == ("sync", tmp_path / "svc-sync.log")
    assert venv == {"ENGINE_WORKERS": "1", "MODEL_DIR": "/m", "ENGINE_FRONTEND": "sync"}
    with pytest.raises(SystemExit, match="expected 'NAME KEY=VALUE"):
        variants(argparse.Namespace(log=str(log), variant=["sync"]), {})
