"""``python -m bench.vs_vllm_serve``: our ``/v1/completions`` against ``vllm serve`` on the same model and load.

Both servers get the same engine arguments (``service.worker.backends.vllm_args.engine_args`` of the demo preset, or of
the preset named) and the same environment; ``vllm bench serve`` (vLLM's own client) sends the same random
workload to each, in alternating rounds (ours, theirs, ours, ...) so that drift of this noisy machine hits
both.  Prints each round's output throughput and the ratio of the medians.  A benchmark, not a test.

    python -m bench.vs_vllm_serve --rounds 5 --num-prompts 1000 --input-len 128 --output-len 64 [--penalties off]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _flags(args: dict[str, object]) -> list[str]:
    """``vllm serve`` flags for ``engine_args`` keywords."""
    out: list[str] = []
    for key, value in args.items():
        if key == "model" or value is None:
            continue
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            out.append(flag if value else f"--no-{key.replace('_', '-')}")
        elif isinstance(value, dict):
            out += [flag, json.dumps(value)]
        else:
            out += [flag, str(value)]
    return out


def _wait(url: str, proc: subprocess.Popen[bytes], timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    raise SystemExit(f"{url} not ready after {timeout} s")


def _bench(base: str, name: str, model_dir: str, ns: argparse.Namespace, out: Path, env: dict[str, str]) -> float:
    result = out / f"{name}-{time.monotonic_ns()}.json"
    cmd = [sys.executable, "-m", "bench.vllm_cli", "bench", "serve", "--backend", "openai", "--base-url", base,
           "--endpoint", "/v1/completions", "--model", name, "--tokenizer", model_dir, "--dataset-name", "random",
           "--random-input-len", str(ns.input_len), "--random-output-len", str(ns.output_len), "--ignore-eos",
           "--num-prompts", str(ns.num_prompts), "--seed", "0", "--save-result", "--result-dir", str(out),
           "--result-filename", result.name, *ns.sampling_flags]
    subprocess.run(cmd, check=True, env=env, cwd=ROOT, stdout=subprocess.DEVNULL)
    data = json.loads(result.read_text())
    if data.get("completed") != ns.num_prompts:
        raise SystemExit(f"{name}: only {data.get('completed')} of {ns.num_prompts} requests completed")
    return float(data["output_throughput"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="demo", help="preset whose engine arguments both servers use")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per server, alternating")
    parser.add_argument("--num-prompts", type=int, default=1000, help="requests per round")
    parser.add_argument("--warmup", type=int, default=1, help="unrecorded rounds per server before the first")
    parser.add_argument("--input-len", type=int, default=128, help="prompt tokens per request")
    parser.add_argument("--output-len", type=int, default=64, help="generated tokens per request (ignore_eos)")
    parser.add_argument("--model-dir", default="", help="model to serve (default: the preset's MODEL_DIR)")
    parser.add_argument("--penalties", choices=("settings", "off"), default="settings",
                        help="sampling sent with every request to both servers: the settings' values (what /predict "
                             "and /v1 use when a request leaves them out), or greedy with no penalties")
    ns = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from env import layer
    from service.settings import Settings
    from service.worker.backends.vllm_args import engine_args

    values = {k: v.value for k, v in layer(os.environ, ns.preset, force=True).items()}
    if ns.model_dir:
        values["MODEL_DIR"] = ns.model_dir
    values.update(WARMUP_DATA_PATH="", LOG_LEVEL="warning")
    settings = Settings.from_environ(values)
    model_dir = str(settings.model_dir)
    # Both servers get the same explicit sampling: left out, /v1 takes the settings' values (penalties on) while
    # vllm serve takes the model's generation config, and the two would not do the same work.
    penalties = ns.penalties == "settings"
    ns.sampling_flags = ["--temperature", str(settings.temperature if penalties else 0.0),
                         "--top-p", str(settings.top_p if penalties else 1.0),
                         "--top-k", str(settings.top_k if penalties else -1),
                         "--repetition-penalty", str(settings.repetition_penalty if penalties else 1.0),
                         "--frequency-penalty", str(settings.frequency_penalty if penalties else 0.0)]
    if not (settings.model_dir / "config.json").is_file():
        raise SystemExit(f"no model in {model_dir}: run `inv download --preset {ns.preset}` first")
    env = {**os.environ, **values, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(settings.omp_num_threads)}
    own = {f.name.upper() for f in dataclasses.fields(Settings)}  # the project's VLLM_* names, as the worker drops
    theirs_env = {k: v for k, v in env.items() if not (k.startswith("VLLM_") and k in own)}
    out = Path(tempfile.mkdtemp(prefix="vs-vllm-serve-"))
    ours_port, theirs_port = 18311, 18312
    servers = {
        "ours": (subprocess.Popen([sys.executable, "-m", "service", "--host", "127.0.0.1", "--port", str(ours_port)],
                                  env={**env, "SERVED_MODEL_NAME": "m"}, cwd=ROOT, start_new_session=True),
                 f"http://127.0.0.1:{ours_port}", "/health/ready", env),
        "theirs": (subprocess.Popen([sys.executable, "-m", "bench.vllm_cli", "serve", model_dir, "--served-model-name",
                                     "m", "--host", "127.0.0.1", "--port", str(theirs_port),
                                     *_flags(engine_args(settings))],
                                    env=theirs_env, cwd=ROOT, start_new_session=True),
                   f"http://127.0.0.1:{theirs_port}", "/health", theirs_env),
    }
    try:
        for name, (proc, base, health, _) in servers.items():
            _wait(base + health, proc)
            print(f"{name} ready", flush=True)
        for round_ in range(1, ns.warmup + 1):
            for name, (_, base, _, bench_env) in servers.items():
                print(f"warm-up {round_} {name}: {_bench(base, 'm', model_dir, ns, out, bench_env):.1f} output tokens/s",
                      flush=True)
        figures: dict[str, list[float]] = {"ours": [], "theirs": []}
        for round_ in range(1, ns.rounds + 1):
            for name, (_, base, _, bench_env) in servers.items():
                figures[name].append(_bench(base, "m", model_dir, ns, out, bench_env))
                print(f"round {round_} {name}: {figures[name][-1]:.1f} output tokens/s", flush=True)
        ours, theirs = statistics.median(figures["ours"]), statistics.median(figures["theirs"])
        paired = statistics.median(a / b for a, b in zip(figures["ours"], figures["theirs"], strict=True))
        print(f"median output tokens/s: ours {ours:.1f}, vllm serve {theirs:.1f}, ratio {ours / theirs:.3f} "
              f"(paired {paired:.3f})")
    finally:
        for proc, *_ in servers.values():
            try:
                os.killpg(proc.pid, 15)
                proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)
            except ProcessLookupError:
                pass


if __name__ == "__main__":
    main()
