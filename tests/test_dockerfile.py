"""The Dockerfile takes its defaults from env/defaults.env: no ENV/ARG copy of a preset value, EXPOSE = PORT.

The parser reads ENV (``KEY=value ...`` and the legacy ``KEY value`` form) and ARG lines, with line
continuations; the first tests prove it finds what it must, so the checks below cannot pass vacuously.
"""

from __future__ import annotations

import http.server
import re
import shlex
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from env import layer, read_preset
from tests.conftest import ROOT, free_port
from tests.test_env import clean_env

DOCKERFILE = ROOT / "Dockerfile"


def instructions(text: str) -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` of a Dockerfile, continuation lines joined, comments dropped."""
    result: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        word, _, rest = line.partition(" ")
        result.append((word.upper(), rest.strip()))
    return result


def assignments(text: str) -> list[tuple[str, str, str | None]]:
    """``(ENV|ARG, key, value or None)`` for every variable a Dockerfile sets."""
    found: list[tuple[str, str, str | None]] = []
    for word, rest in instructions(text):
        if word == "ENV":
            parts = shlex.split(rest)
            if parts and "=" not in parts[0]:  # legacy `ENV KEY value with spaces`
                key, _, value = rest.partition(" ")
                found.append(("ENV", key, " ".join(shlex.split(value))))
            else:
                found += [("ENV", *part.split("=", 1)) for part in parts]
        elif word == "ARG":
            for part in shlex.split(rest):
                key, eq, value = part.partition("=")
                found.append(("ARG", key, value if eq else None))
    return found


def dockerfile() -> str:
    return DOCKERFILE.read_text(encoding="utf-8")


def defaults() -> dict[str, str]:
    return {key: value for key, (value, _) in read_preset("defaults").items()}


def test_parser_finds_every_form():
    sample = """# comment
FROM base:1
ARG PRESET
ARG MAX_MODEL_LEN=2048
ENV TOP_P=0.5 \\
    STOP_STRINGS='<|im_end|>' OTHER="a b"
ENV PORT 9000
"""
    assert assignments(sample) == [("ARG", "PRESET", None), ("ARG", "MAX_MODEL_LEN", "2048"), ("ENV", "TOP_P", "0.5"),
                                   ("ENV", "STOP_STRINGS", "<|im_end|>"), ("ENV", "OTHER", "a b"),
                                   ("ENV", "PORT", "9000")]


def test_no_env_or_arg_disagrees_with_defaults():
    preset = defaults()
    wrong = [f"{kind} {key}={value!r} but env/defaults.env says {preset[key]!r}"
             for kind, key, value in assignments(dockerfile()) if key in preset and value is not None
             and value != preset[key]]
    assert not wrong, "; ".join(wrong)


def test_no_env_or_arg_copies_a_preset_default():
    """Even an equal copy is drift waiting to happen: the launcher reads defaults.env inside the image."""
    preset = defaults()
    copies = [f"{kind} {key}" for kind, key, value in assignments(dockerfile()) if key in preset and value is not None]
    assert not copies, f"remove {', '.join(copies)}: the defaults come from env/defaults.env"


def test_expose_matches_the_port_default():
    exposed = [rest.split() for word, rest in instructions(dockerfile()) if word == "EXPOSE"]
    assert exposed == [[defaults()["PORT"]]]


def stages() -> dict[str, str]:
    """``{stage name: FROM argument}`` of every stage."""
    found = {}
    for word, rest in instructions(dockerfile()):
        if word == "FROM":
            image, _, name = rest.partition(" AS ")
            found[name.strip()] = image.strip()
    return found


def default_base(stage: str) -> str:
    """The image a stage starts from when BASE_IMAGE is not given (``${BASE_IMAGE:-image}``)."""
    match = re.fullmatch(r"\$\{BASE_IMAGE:-([^}]+)\}", stages()[stage])
    assert match, stages()[stage]
    return match.group(1)


def build_args() -> dict[str, str | None]:
    """The ARGs declared before the first FROM (the build's arguments), with their defaults."""
    found: dict[str, str | None] = {}
    for word, rest in instructions(dockerfile()):
        if word == "FROM":
            break
        if word == "ARG":
            key, eq, value = rest.partition("=")
            found[key] = value if eq else None
    return found


def stage_instructions(stage: str) -> list[tuple[str, str]]:
    """The instructions of one stage (after its FROM, up to the next)."""
    result: list[tuple[str, str]] = []
    current = None
    for word, rest in instructions(dockerfile()):
        if word == "FROM":
            current = rest.partition(" AS ")[2].strip()
            continue
        if current == stage:
            result.append((word, rest))
    return result


def test_targets_and_base_image_are_build_arguments():
    args = build_args()
    assert args["TARGET"] == "gpu" and args["BASE_IMAGE"] == ""
    assert set(stages()) == {"deps-gpu", "deps-cpu", "final"}
    assert stages()["final"] == "deps-${TARGET}"
    assert default_base("deps-cpu").startswith("python:3.11")  # the CPU lock is resolved for Python 3.11


def test_gpu_base_image_is_a_pinned_vllm_image():
    name, _, tag = default_base("deps-gpu").partition(":")
    assert name == "vllm/vllm-openai" and tag and tag != "latest"


def test_the_image_and_the_gpu_requirements_pin_one_vllm_version():
    pins = [line.split("==", 1)[1].strip() for line in (ROOT / "requirements" / "gpu.txt").read_text().splitlines()
            if line.startswith("vllm==")]
    locked = [line.split("==", 1)[1].strip() for line in (ROOT / "requirements" / "gpu-lock.txt").read_text().splitlines()
              if line.startswith("vllm==")]
    assert pins and locked == pins and default_base("deps-gpu").partition(":")[2] == f"v{pins[0]}", (pins, locked)


def test_gpu_target_installs_what_the_base_lacks_with_the_base_versions_as_constraints():
    runs = " ".join(" ".join(rest for word, rest in stage_instructions("deps-gpu") if word == "RUN").split())
    assert "pip list --format=freeze > /opt/qa-lock/base-constraints.txt" in runs
    assert "locks.py absent /opt/qa-lock/gpu-lock.txt > /opt/qa-lock/missing.txt" in runs
    assert "--no-deps -c /opt/qa-lock/base-constraints.txt -r /opt/qa-lock/missing.txt" in runs
    assert "--mount=type=cache,target=/root/.cache/pip" in runs and "--mount=type=secret,id=ca" in runs


def test_cpu_target_installs_exactly_the_cpu_lock():
    runs = " ".join(" ".join(rest for word, rest in stage_instructions("deps-cpu") if word == "RUN").split())
    assert "pip install --no-deps" in runs and "-r /opt/qa-lock/cpu-lock.txt" in runs
    assert "--mount=type=cache,target=/root/.cache/pip" in runs and "--mount=type=secret,id=ca" in runs


def test_layers_dependencies_then_model_then_code():
    """Only the downloader and the presets are in the build when the model is baked; the code comes last."""
    final = stage_instructions("final")
    copies = [rest for word, rest in final if word == "COPY"]
    assert copies == ["downloader/ downloader/", "env/ env/", ". ."]
    order = [rest for word, rest in final if word in ("COPY", "RUN")]
    model = next(i for i, rest in enumerate(order) if "python3 -m downloader" in rest)
    assert order.index("env/ env/") < model < order.index(". .")
    for stage in ("deps-gpu", "deps-cpu"):
        copied = " ".join(rest for word, rest in stage_instructions(stage) if word == "COPY")
        assert "service" not in copied and ". ." not in copied and "requirements/" in copied


def test_model_token_and_ca_are_build_secrets():
    runs = " ".join(rest for word, rest in instructions(dockerfile()) if word == "RUN")
    assert "--mount=type=secret,id=modelscope_token" in runs
    assert "MODELSCOPE_API_TOKEN=" not in runs.replace('MODELSCOPE_API_TOKEN="$(cat /run/secrets/', "")
    assert (ROOT / "docker" / "with-ca.sh").is_file()


def test_the_service_runs_as_a_non_root_user():
    users = [rest for word, rest in stage_instructions("final") if word == "USER"]
    assert users == ["qa"]


def test_cmd_is_the_launcher_with_install_and_download_skipped():
    cmds = [rest for word, rest in instructions(dockerfile()) if word == "CMD"]
    assert len(cmds) == 1
    cmd = shlex.split(cmds[0])
    assert cmd[:5] == ["exec", "python3", "-m", "invoke", "run"]  # exec: the launcher is PID 1, gets SIGTERM
    assert "--skip-install" in cmd and "--skip-download" in cmd and "$IMAGE_PRESET" in cmd
    entry = [rest for word, rest in instructions(dockerfile()) if word == "ENTRYPOINT"]
    assert entry == ["[]"]  # the base image's `vllm serve` entrypoint is cleared


def test_healthcheck_uses_the_launcher():
    checks = [rest for word, rest in instructions(dockerfile()) if word == "HEALTHCHECK"]
    assert len(checks) == 1
    assert checks[0].endswith('CMD ["python3", "-m", "env.launcher", "healthcheck"]')


def test_dockerignore_keeps_the_context_small():
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()}
    assert {".git", ".venv", ".nox", "model"} <= ignored
    for needed in ("env", "service", "downloader", "requirements", "tasks.py"):
        assert needed not in ignored


class _Ready(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self.send_response(200 if self.path == "/health/ready" else 404)
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args: object) -> None:
        pass


@pytest.mark.parametrize("answering", [True, False])
def test_healthcheck_command_follows_port(answering: bool):
    port = free_port()
    server = http.server.HTTPServer(("127.0.0.1", port), _Ready) if answering else None
    thread = threading.Thread(target=server.serve_forever, daemon=True) if server else None
    if thread:
        thread.start()
    try:
        env = clean_env(PORT=str(port))
        assert layer(env)["PORT"].value == str(port)
        done = subprocess.run([sys.executable, "-m", "env.launcher", "healthcheck"], cwd=ROOT, env=env,
                              capture_output=True, timeout=60)
        assert done.returncode == (0 if answering else 1)
    finally:
        if server:
            server.shutdown()
            server.server_close()


def test_dockerfile_exists_at_the_root():
    assert Path(DOCKERFILE).is_file()


# --- inv image (env/image.py) ----------------------------------------------------------------------

def test_inv_image_passes_target_base_preset_ca_and_wheels(tmp_path: Path):
    from env.image import ImageOptions, build_command, run_command

    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    options = ImageOptions("cpu", base="qa-ci-base:bookworm", ca=str(ca), wheels=str(tmp_path), preset="demo")
    cmd = build_command("docker", options, {"MODELSCOPE_API_TOKEN": "x"})
    text = " ".join(cmd)
    for part in ("--build-arg TARGET=cpu", "--build-arg BASE_IMAGE=qa-ci-base:bookworm", "--build-arg PRESET=demo",
                 "--build-arg TORCH_INDEX=", f"--secret id=ca,src={ca}", "-t qa-serve:cpu-demo",
                 "--secret id=modelscope_token,env=MODELSCOPE_API_TOKEN"):
        assert part in text, part
    assert "x" not in cmd  # the token goes by name, never as a value on the command line
    assert cmd[-1] == str(ROOT)
    assert "--shm-size" in run_command(options) and "--gpus" not in run_command(options)
    assert "--gpus all" in run_command(ImageOptions("gpu"))
    gpu = " ".join(build_command("docker", ImageOptions(), {}))
    assert "TARGET=gpu" in gpu and "BASE_IMAGE" not in gpu and "--secret" not in gpu


def test_cache_report_reads_buildkit_logs():
    from env.image import cache_report

    def log(deps: bool, model: bool, code: bool) -> str:
        lines = []
        for n, (name, cached) in enumerate([("[deps-cpu 4/4] RUN --mount=type=cache ... pip install --no-deps", deps),
                                            ("[final 3/4] RUN ... python3 -m downloader --preset demo", model),
                                            ("[final 4/4] COPY . .", code)], start=7):
            lines += [f"#{n} {name}", f"#{n} CACHED" if cached else f"#{n} DONE 1.0s"]
        return "\n".join(lines)

    assert cache_report(log(True, True, False))[0]
    assert not cache_report(log(False, True, False))[0]  # dependencies rebuilt
    assert not cache_report(log(True, False, False))[0]  # model rebuilt
    assert not cache_report(log(True, True, True))[0]  # the edit did not reach the build
    assert not cache_report("")[0]
