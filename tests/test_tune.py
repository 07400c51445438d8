"""`inv tune`: the baseline and one candidate measured on the real vLLM CPU engine, and the preset it writes.

The search itself is a real run (two services, one after the other); the budget and the default candidate
set are pure functions, tested without a server.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from bench.tune import (
    Result,
    default_candidates,
    estimate_seconds,
    over_budget,
    parse_candidate,
)
from env import layer, layering
from env.layout import LAYOUT_KEYS
from tests.conftest import PYTHON, ROOT, demo_env


def _questions(path: Path, count: int) -> Path:
    topics = ["warp", "shared memory", "kernel<<<>>>", "coalescing", "occupancy", "stream", "atomicAdd", "tiling"]
    path.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"问题{i}：什么是{topics[i % 8]}？"},
                                                     {"role": "assistant", "content": "答案"}]}, ensure_ascii=False) + "\n"
                            for i in range(count)), encoding="utf-8")
    return path


def test_tune_measures_auto_and_a_candidate_and_writes_a_preset(tmp_path: Path, demo_model: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """auto and `w2 ENGINE_WORKERS=2`, each a real service: medians, the sample comparison, the preset file."""
    output = tmp_path / "tuned.env"
    data = _questions(tmp_path / "questions.jsonl", 48)
    done = subprocess.run(
        [PYTHON, "-m", "bench.tune", "--preset", "demo", "--data", str(data), "-n", "48", "--rounds", "1",
         "--sample", "8", "--set", f"MODEL_DIR={demo_model}", "--set", "WARMUP_DATA_PATH=",
         "--set", "VLLM_KV_CACHE_MEMORY_BYTES=256MiB",  # w2's two engines start at once
         "--candidate", "w2 ENGINE_WORKERS=2", "--output", str(output), "--json"],
        env=demo_env(demo_model), cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    by_name = {c["name"]: c for c in report["candidates"]}
    assert list(by_name) == ["auto", "w2"], report["candidates"]
    for entry in by_name.values():
        assert entry["status"] == "measured", entry
        assert entry["median_s"] > 0 and entry["tokens_per_s"] > 0 and entry["ready_s"] > 0, entry
        assert entry["errors"] == 0 and len(entry["rounds_s"]) == 1
    auto, w2 = by_name["auto"], by_name["w2"]
    assert w2["settings"]["ENGINE_WORKERS"] == 2 and auto["settings"]["ENGINE_WORKERS"] != "auto"
    assert isinstance(w2["sample_differs"], int) and w2["sample_size"] == 8
    assert w2["speed"] == pytest.approx(auto["median_s"] / w2["median_s"], rel=1e-2)
    assert report["questions"] == 48 and report["host"]["gpu"] is None and report["winner"] in by_name
    winner = by_name[report["winner"]]
    assert winner["median_s"] == min(auto["median_s"], w2["median_s"])
    # Progress on stderr as each candidate finishes.
    assert "[tune] 1/2 auto: ready in" in done.stderr and "[tune] 2/2 w2: ready in" in done.stderr
    assert f"sample: {w2['sample_differs']} of 8 differ" in done.stderr

    # The preset: read_preset parses it; every layout key is concrete, after a `# tune:` line with the figure.
    demo = {k: v.value for k, v in layer({}, "demo").items()}
    monkeypatch.setattr(layering, "PRESET_DIR", tmp_path)
    values = layering.read_preset("tuned")
    lines = output.read_text(encoding="utf-8").splitlines()
    assert lines[0].startswith("# Written by `inv tune`") and any(line.startswith("# Host: CPU") for line in lines)
    assert any(line.startswith("#   auto ") for line in lines) and any(line.startswith("#   w2 ") for line in lines)
    for key in LAYOUT_KEYS:
        assert key in values and values[key][0] != "auto", (key, values.get(key))
        at = next(i for i, line in enumerate(lines) if line.startswith(f"{key}="))
        assert lines[at - 1].startswith("# tune: ") and " s median of 1 round, 48 questions (auto " in lines[at - 1]
    assert values["ENGINE_WORKERS"][0] == str(winner["settings"]["ENGINE_WORKERS"])
    assert values["MODEL_DIR"][0] == str(demo_model)  # --set and --preset values come along, so the run reproduces

    # The values are valid settings once layered the way `inv run --preset tuned` layers them.
    from service.settings import Settings

    monkeypatch.undo()
    Settings.from_environ({**demo, **{k: v for k, (v, _) in values.items()}})


def test_budget_skips_a_candidate_whose_estimate_does_not_fit() -> None:
    """The estimate is the baseline's own spawn-to-stopped time; a candidate that would end past the budget is
    skipped."""
    baseline = Result("auto", {}, ready_s=30.0, rounds_s=[9.0, 10.0], median_s=9.5, wall_s=52.0)
    estimate = estimate_seconds(baseline)
    assert estimate == 52.0
    assert not over_budget(spent_s=52.0, estimate_s=estimate, budget_s=600)
    assert over_budget(spent_s=52.0, estimate_s=estimate, budget_s=100)  # 52 + 52 > 100
    assert over_budget(spent_s=52.0, estimate_s=estimate, budget_s=1)
    assert not over_budget(spent_s=48.0, estimate_s=estimate, budget_s=100)


def test_default_candidates_are_bounded_by_the_host() -> None:
    """GPU: engine counts up to half the cores, both front ends at auto's count; CPU: one and two engines."""
    names = [c.name for c in default_candidates(gpu=True, cores=16, auto_workers=6)]
    assert names == ["w1", "w2", "w4", "w6-sync", "w6-async", "w8"]
    assert [c.name for c in default_candidates(gpu=True, cores=16, auto_workers=1)] == ["w1", "w2", "w4", "w6", "w8"]
    assert [c.name for c in default_candidates(gpu=True, cores=6, auto_workers=3)] == ["w1", "w2", "w3-sync", "w3-async"]
    assert [c.name for c in default_candidates(gpu=True, cores=2, auto_workers=1)] == ["w1"]
    assert [c.overrides for c in default_candidates(gpu=False, cores=2, auto_workers=1)] == [
        {"ENGINE_WORKERS": "1"}, {"ENGINE_WORKERS": "2"}]
    assert parse_candidate("w4 ENGINE_WORKERS=4 ENGINE_FRONTEND=sync").overrides == {
        "ENGINE_WORKERS": "4", "ENGINE_FRONTEND": "sync"}
    for bad in ("auto ENGINE_WORKERS=2", "w4", "w4 ENGINE_WORKERS", "../x A=1"):
        with pytest.raises(SystemExit):
            parse_candidate(bad)
