"""DETOKENIZE_AT_END: answers decoded once at the end are the texts vLLM's token-by-token detokenizer gives."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from tests.conftest import PYTHON, ROOT, demo_env

# Runs in its own process (vLLM's engine processes need a main module that can be re-imported).
SCRIPT = r"""
import json, os, sys
from vllm import SamplingParams
from bench.ceiling import Ceiling
from service.settings import Settings
from service.pipeline.prompting import Formatter, Planner
from service.worker.backends.tokens import decode_answers, stop_token_ids

settings = Settings.from_environ(os.environ)
ceiling = Ceiling(settings)  # the benchmark's offline engine: LLM with the service's engine arguments
llm, tok = ceiling.llm, ceiling.tokenizer
questions = [line.strip() for line in sys.stdin if line.strip()]
planner = Planner(settings, Formatter(tok, settings.load_system_prompt()), stop_token_ids(tok))
plans = planner.plan(questions)
# The token-by-token texts (vLLM's detokenizer) and the token ids of the same generations.
outputs = llm.generate([p.prompt for p in plans], [SamplingParams(**p.sampling) for p in plans], use_tqdm=False)
streamed = [o.outputs[0].text for o in outputs]
decoded = decode_answers(tok, [o.outputs[0].token_ids for o in outputs])
at_end = Planner(settings, Formatter(tok, settings.load_system_prompt()), stop_token_ids(tok), True)
sampling = at_end.plan(questions[:1])[0].sampling
# The benchmark's offline path both ways: same tokens, no errors.
ceiling.planner = at_end
runs = [ceiling.run(questions[:40])]
ceiling.planner = planner
runs.append(ceiling.run(questions[:40]))
print("RESULT", json.dumps({"streamed": streamed, "decoded": decoded, "detokenize": planner.detokenize,
                  "at_end_detokenize": at_end.detokenize, "at_end_stop": sampling["stop"],
                  "at_end_sampling_detokenize": sampling["detokenize"],
                  "tokens": [len(o.outputs[0].token_ids) for o in outputs],
                  "ceiling_runs": [[r.tokens, r.errors, r.questions] for r in runs]}, ensure_ascii=False))
ceiling.close()
"""


def _run(demo_model: Path, questions: list[str], **env: str) -> dict:
    done = subprocess.run([PYTHON, "-c", SCRIPT], input="\n".join(questions), env=demo_env(demo_model, **env),
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(x for x in done.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT "))


def test_decoding_at_end_gives_the_streamed_texts(demo_model: Path) -> None:
    """200 answers of the demo model (random weights: byte tokens, cut-off characters, stray special tokens)."""
    topics = ["warp", "共享内存", "kernel<<<>>>", "合并访问", "occupancy", "流", "atomicAdd", "分块"]
    questions = [f"问题{i}：什么是{topics[i % 8]}？请解释。" for i in range(200)]
    result = _run(demo_model, questions, MAX_NEW_TOKENS="48", DISABLE_TOKEN_ROUTING="1")
    streamed, decoded = result["streamed"], result["decoded"]
    assert sum(result["tokens"]) > 200 * 8, "the demo model generated almost nothing: nothing was compared"
    assert any(streamed), "every streamed text is empty: nothing was compared"
    mismatched = [(i, s, d) for i, (s, d) in enumerate(zip(streamed, decoded, strict=True)) if s != d]
    assert not mismatched, mismatched[:3]
    # The default stop strings are Qwen's end tokens (special): the planner drops them and the decoding.
    assert result["detokenize"] is True  # decode_at_end not asked for
    assert result["at_end_detokenize"] is False
    assert result["at_end_stop"] == [] and result["at_end_sampling_detokenize"] is False
    at_end, streaming = result["ceiling_runs"]
    assert at_end == streaming and at_end[1:] == [0, 40] and at_end[0] > 40, result["ceiling_runs"]


def test_an_ordinary_stop_string_keeps_streamed_decoding(demo_model: Path) -> None:
    """A blank-line stop needs the text while generating: decoding at the end is then not used."""
    from transformers import AutoTokenizer

    from service.pipeline.prompting import Formatter, Planner
    from service.settings import Settings

    tok = AutoTokenizer.from_pretrained(demo_model)
    env = demo_env(demo_model)
    plain = Planner(Settings.from_environ(env), Formatter(tok, "s"), [1], True)
    assert plain.detokenize is False and plain.plan(["q"])[0].sampling["stop"] == []
    blank = Planner(Settings.from_environ({**env, "STOP_ON_DOUBLE_NEWLINE": "1"}), Formatter(tok, "s"), [1], True)
    assert blank.detokenize is True
    assert blank.plan(["q"])[0].sampling["stop"][0] == "\n\n"
    assert blank.plan(["q"])[0].sampling["detokenize"] is True


def test_a_character_cut_off_by_the_budget_is_held_back_as_vllm_does(demo_model: Path) -> None:
    """An answer that ends inside a multi-byte character: vLLM's DecodeStream holds the bytes back, and so
    does ``decode_answers`` (a plain decode would end the answer with U+FFFD)."""
    from tokenizers.decoders import DecodeStream
    from transformers import AutoTokenizer

    from service.worker.backends.tokens import decode_answers

    tok = AutoTokenizer.from_pretrained(demo_model)
    ids = tok("共享内存的𝄞 abc 😀", add_special_tokens=False)["input_ids"]
    cuts = [ids[:n] for n in range(1, len(ids) + 1)]
    streamed = []
    for cut in cuts:
        stream, text = DecodeStream(skip_special_tokens=True), ""
        for token in cut:
            text += stream.step(tok._tokenizer, token) or ""
        streamed.append(text)
    plain = tok.batch_decode(cuts, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    assert sum(p != s for p, s in zip(plain, streamed, strict=True)) >= 10  # the case is really exercised
    assert decode_answers(tok, cuts) == streamed
    assert decode_answers(tok, []) == []  # (the tokenizer's own batch_decode gives [""] for no answers)
