"""`inv env`: layering precedence, secrets, export quoting (bash, direnv), explain, preset errors.

Every test runs the real command line (`python -m invoke ...` from this interpreter) in a subprocess.
`inv env` shares `layer()` with `inv run`; tests/test_launcher.py observes the `inv run` path itself.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from env import SECRETS, layer, resolve_layout
from tests.conftest import ROOT

TOKEN = "ms-token-7f3c1e-never-print-me"
# Values that break naive quoting: the stop strings, quotes of both kinds, backslashes, `$`, backticks,
# globs, a newline, spaces, `=` and non-ASCII text.
TRICKY = {
    "STOP_STRINGS": "<|im_end|>,<|endoftext|>,</s>",
    "SYSTEM_PROMPT": "You're a \"careful\" assistant;\tsay $HOME, ${USER}, `id` and \\n \\\\ literally.\nLine 2: 回答。",
    "HARD_CODE_QUESTION_KEYWORDS": "kernel<<<,__global__,a b  c,*.cu,x=y,'single',\"double\",$(rm -rf /),\\",
    "LONG_ANSWER_KEYWORDS": "",
    "MODEL_DIR": "/tmp/models with spaces/it's here",
}
DUMP = "import json, os, sys; print(json.dumps({k: os.environ.get(k) for k in sys.argv[1:]}))"


def inv(*args: str, env: dict[str, str] | None = None, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "invoke", *args], capture_output=True, text=True, cwd=cwd,
                          env=env if env is not None else clean_env(), timeout=120)


def clean_env(**extra: str) -> dict[str, str]:
    """The test environment without any preset variable (so the presets decide), plus ``extra``."""
    keys = set(layer({}, "demo"))
    env = {k: v for k, v in os.environ.items() if k not in keys}
    env.update(extra)
    return env


def explain_lines(output: str) -> dict[str, str]:
    lines = {}
    for line in output.splitlines():
        if line.startswith("[env] ") and "from " in line:
            key = line.split()[1]
            lines[key] = line
    return lines


def test_exported_value_wins_by_default():
    done = inv("env", "--explain", env=clean_env(MAX_MODEL_LEN="2048"))
    assert done.returncode == 0, done.stderr
    line = explain_lines(done.stdout)["MAX_MODEL_LEN"]
    assert "'2048'" in line and "from shell" in line
    assert "shadows preset value '1024'" in line


def test_preset_wins_under_force():
    env = clean_env(MAX_MODEL_LEN="2048", DTYPE="bfloat16", MODEL_ID="someone/else")
    done = inv("env", "--preset", "demo", "--force", "--explain", env=env)
    assert done.returncode == 0, done.stderr
    lines = explain_lines(done.stdout)
    assert "'1024'" in lines["MAX_MODEL_LEN"] and "from defaults.env" in lines["MAX_MODEL_LEN"]
    assert "'float32'" in lines["DTYPE"] and "from demo.env" in lines["DTYPE"]
    assert "'demo'" in lines["MODEL_ID"] and "from demo.env" in lines["MODEL_ID"]
    assert "'./model/demo'" in lines["MODEL_DIR"]  # ${MODEL_ID} follows the forced value
    assert "--force" in done.stderr


def test_exported_model_id_moves_model_dir():
    done = inv("env", env=clean_env(MODEL_ID="org/name"))
    assert "[env] MODEL_DIR=./model/org/name" in done.stdout.splitlines()


def test_secret_survives_force_and_is_never_printed():
    env = clean_env(MODELSCOPE_API_TOKEN=TOKEN, ADMIN_TOKEN=TOKEN + "-admin")
    for args in (["env"], ["env", "--export"], ["env", "--explain"], ["env", "--force", "--export"],
                 ["env", "--force", "--explain"], ["env", "--preset", "demo", "--force"]):
        done = inv(*args, env=env)
        assert done.returncode == 0, done.stderr
        assert TOKEN not in done.stdout + done.stderr, args
    explained = explain_lines(inv("env", "--force", "--explain", env=env).stdout)
    assert "'***'" in explained["MODELSCOPE_API_TOKEN"] and "from shell" in explained["MODELSCOPE_API_TOKEN"]
    assert "not exported" in inv("env", "--export", env=env).stderr

    shown = inv("env", "--force", "--export", "--show-secrets", env=env)
    assert f"export MODELSCOPE_API_TOKEN={TOKEN}" in shown.stdout.splitlines()  # kept under --force
    assert TOKEN in explain_lines(inv("env", "--explain", "--show-secrets", env=env).stdout)["MODELSCOPE_API_TOKEN"]


def _expected(env: dict[str, str], preset: str = "defaults") -> dict[str, str]:
    """What `inv env --export` exports: the layered values with the `auto` layout resolved for this host."""
    return {k: v.value for k, v in resolve_layout(layer(env, preset)).items() if k not in SECRETS}


def test_export_round_trips_through_bash_eval_and_source(tmp_path):
    env = clean_env(**TRICKY)
    done = inv("env", "--preset", "demo", "--export", env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("export ")
    exports = tmp_path / "exports.sh"
    exports.write_text(done.stdout)
    expected = _expected(env, "demo")
    assert expected["STOP_STRINGS"] == TRICKY["STOP_STRINGS"]
    keys = sorted(expected)
    # A shell that starts empty: every value must come from the export text.
    bare = {"PATH": os.environ["PATH"], "EXPORTS": str(exports)}
    for script in ('eval "$(cat "$EXPORTS")"', '. "$EXPORTS"'):
        out = subprocess.run(["bash", "--noprofile", "--norc", "-c", f'{script}; exec "$0" -c "$1" "${{@:2}}"',
                              sys.executable, DUMP, *keys], capture_output=True, text=True, env=bare, check=True)
        assert json.loads(out.stdout) == expected, script


def test_default_stop_strings_round_trip(tmp_path):
    done = inv("env", "--export", env=clean_env())
    line = next(x for x in done.stdout.splitlines() if x.startswith("export STOP_STRINGS="))
    out = subprocess.run(["bash", "-c", f'{line}; printf %s "$STOP_STRINGS"'], capture_output=True, text=True,
                         env={"PATH": os.environ["PATH"]}, check=True)
    assert out.stdout == "<|im_end|>,<|endoftext|>"


@pytest.mark.skipif(shutil.which("direnv") is None, reason="direnv is not installed (apt-get install direnv)")
def test_export_loads_with_direnv(tmp_path):
    env = clean_env(**TRICKY)
    done = inv("env", "--export", env=env)
    project = tmp_path / "project"
    project.mkdir()
    (project / ".envrc").write_text(done.stdout)
    home = tmp_path / "home"
    home.mkdir()
    bare = {"PATH": os.environ["PATH"], "HOME": str(home), "XDG_CONFIG_HOME": str(home / ".config"),
            "XDG_DATA_HOME": str(home / ".local/share"), "XDG_CACHE_HOME": str(home / ".cache")}
    subprocess.run(["direnv", "allow", str(project)], env=bare, check=True, capture_output=True)
    expected = _expected(env)
    keys = sorted(expected)
    out = subprocess.run(["direnv", "exec", str(project), sys.executable, "-c", DUMP, *keys], env=bare,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == expected


def test_explain_names_every_source_and_flags_shadowing():
    done = inv("env", "--preset", "demo", "--explain", env=clean_env(MAX_MODEL_LEN="2048", DTYPE="float32"))
    assert done.returncode == 0, done.stderr
    lines = explain_lines(done.stdout)
    assert set(lines) == set(layer({}, "demo"))
    assert all(line.startswith("[env] ") for line in done.stdout.splitlines())
    assert "from demo.env" in lines["MODEL_ID"]
    assert "from defaults.env" in lines["TOP_P"]
    assert "from shell" in lines["MAX_MODEL_LEN"] and "shadows preset value '1024'" in lines["MAX_MODEL_LEN"]
    # Same value as the preset: from the shell, but nothing is shadowed.
    assert "from shell" in lines["DTYPE"] and "shadows" not in lines["DTYPE"]


def test_works_from_a_subdirectory():
    done = inv("env", "--preset", "demo", "--explain", cwd=ROOT / "tests")
    assert done.returncode == 0, done.stderr
    assert "from demo.env" in explain_lines(done.stdout)["MODEL_ID"]


def test_unknown_preset_is_a_one_line_error_with_exit_2():
    for task in ("env", "download", "run"):
        done = inv(task, "--preset", "no-such-preset")
        assert done.returncode == 2, (task, done.stderr)
        errors = [line for line in done.stderr.splitlines() if "no-such-preset" in line]
        assert len(errors) == 1 and errors[0].startswith(f"[{task}] unknown preset 'no-such-preset'")
        assert "demo" in errors[0] and "Traceback" not in done.stderr


def inv_with_presets(preset_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``inv`` reading its presets from ``preset_dir`` instead of env/ (the shipped presets stay untouched)."""
    code = ("import sys; from pathlib import Path; import env.layering; "
            "env.layering.PRESET_DIR = Path(sys.argv.pop(1)); from invoke.main import program; program.run()")
    return subprocess.run([sys.executable, "-c", code, str(preset_dir), *args], capture_output=True, text=True,
                          cwd=ROOT, env=clean_env(), timeout=120)


def test_invalid_preset_line_is_a_one_line_error_with_exit_2(tmp_path: Path):
    name = f"zz-test-bad-{uuid.uuid4().hex[:8]}"
    shutil.copy(ROOT / "env" / "defaults.env", tmp_path / "defaults.env")
    (tmp_path / f"{name}.env").write_text("MAX_MODEL_LEN=2048\nthis line is not an assignment\n")
    for task in ("env", "run"):
        done = inv_with_presets(tmp_path, task, "--preset", name)
        assert done.returncode == 2, (task, done.stderr)
        errors = [line for line in done.stderr.splitlines() if name in line]
        assert len(errors) == 1, done.stderr
        assert f"{tmp_path / name}.env:2" in errors[0] and "this line is not an assignment" in errors[0]
        assert "Traceback" not in done.stderr
    assert not list((ROOT / "env").glob("zz-test-*")), "nothing written into env/"


def test_every_flag_has_help():
    for task, flags in {"run": ["--preset", "--force", "--skip-install", "--skip-download", "--host", "--port"],
                        "env": ["--preset", "--force", "--export", "--explain", "--show-secrets"],
                        "download": ["--preset", "--force"]}.items():
        done = inv(task, "--help")
        assert done.returncode == 0
        for flag in flags:
            line = next(x for x in done.stdout.splitlines() if flag in x)
            assert len(line.split(None, 2)) >= 2, line  # a help text follows the flag
