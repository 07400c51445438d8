"""Prompting (SPEC section 3): token routing, budgets, stop strings, post-processing, chat formatting, plans.

Fast unit tests: no engine and no server.  Settings come from ``Settings.from_environ`` (so the defaults
are env/defaults.env's); the only heavy piece is the demo tokenizer (built once per session by the
``demo_model`` fixture of conftest.py) for the chat-template tests.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from service.contract.sampling import Sampling
from service.pipeline.prompting import (
    Formatter,
    Planner,
    PostProcessor,
    fast_chat,
    limit_sentences,
    stop_strings,
    strip_think,
    trim_examples,
)
from service.pipeline.routing import Route, Router, budget
from service.settings import Settings

SYSTEM = "你是一名CUDA与GPU并行编程助教，请用中文简洁作答。"

# Realistic questions of each route (GPU programming, as the evaluation set asks them).
SHORT_Q = "简述warp分歧(warp divergence)。"
CODE_Q = "为了评测请只输出代码，不要解释：CUDA中如何实现y[i]=a*x[i]+y[i]？写代码。"
LONG_Q = "CUDA中SpMV算子基于CSR格式时，线程如何映射到矩阵非零元素？"
HARD_Q = "请解释：__global__ void saxpy(int n, float a, float *x, float *y) 中每个线程处理哪个元素？"

# A short answer with every kind of material post-processing acts on.
THINKING_ANSWER = (
    "<think>用户问的是warp分歧，先给定义再说影响。</think>"
    "warp分歧是指同一warp内的线程因条件分支走向不同路径。"
    "硬件会串行执行各条路径，未走该路径的线程被屏蔽。"
    "例如：if (threadIdx.x % 2 == 0) 会让一个warp内一半线程空闲。"
)


def settings(**env: str) -> Settings:
    """Settings from env/defaults.env with ``env`` exported over it."""
    return Settings.from_environ(env)


def router(**env: str) -> Router:
    return Router.from_settings(settings(**env))


def sentences(n: int) -> str:
    return "".join(f"第{i}点：共享内存由同一线程块内的线程共享。" for i in range(1, n + 1))


# --- routing -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "question",
    [
        "主机端写成 Kernel<<<gridDim, blockDim>>>(d_a, n) 时，gridDim 与 blockDim 分别决定什么？",
        "__global__ void vecAdd(float *A, float *B, float *C) 这个声明里 __global__ 表示什么？",
        "GLOBAL VOID 修饰的函数在哪里执行、由谁调用？",
        "#include <cuda_runtime.h> 之后如何查询设备的共享内存大小？",
        "#INCLUDE 头文件缺失时 nvcc 报什么错？",
    ],
)
def test_hard_code_signals_route_hard_case_insensitively(question: str) -> None:
    assert router().route(question) is Route.HARD


def test_hard_code_question_keywords_add_signals_case_insensitively() -> None:
    question = "调用 CUDAMALLOC 返回 cudaErrorMemoryAllocation 时应该检查什么？"
    assert router().route(question) is Route.SHORT
    r = router(HARD_CODE_QUESTION_KEYWORDS="cudaMalloc, __syncthreads")
    assert r.route(question) is Route.HARD
    assert r.route("__syncthreads() 放在条件分支里为什么会死锁？") is Route.HARD


@pytest.mark.parametrize(
    "question",
    [
        "CUDA中矩阵乘法算子如何利用共享内存减少全局内存访问？",
        "GPU架构的内存控制器数量如何影响SpMV的带宽？",
        "GPU架构的SM核心数如何影响ConvNets卷积层的计算速度？",
        "CUDA中卷积层如何通过IM2COL转换提升性能？",
        "分块GEMM中每个线程块负责输出矩阵的哪一部分？",
        "GPU架构的张量核心（Tensor Cores）如何提升卷积层性能？",
        "如何用Triton实现3×3卷积，并通过自动分块优化提升性能？",
        "如何用TileLang实现深度卷积，优化组内内存局部性？",
    ],
)
def test_long_answer_keywords_route_long(question: str) -> None:
    assert router().route(question) is Route.LONG


def test_long_answer_keywords_setting_adds_keywords() -> None:
    question = "并行归约(Reduction)如何避免线程束分歧？"
    assert router().route(question) is Route.SHORT
    assert router(LONG_ANSWER_KEYWORDS="reduction,前缀和").route(question) is Route.LONG


def test_long_answer_enable_default_0_disables_the_builtin_list_only() -> None:
    assert router(LONG_ANSWER_ENABLE_DEFAULT="0").route(LONG_Q) is Route.SHORT
    r = router(LONG_ANSWER_ENABLE_DEFAULT="0", LONG_ANSWER_KEYWORDS="CSR")
    assert r.route(LONG_Q) is Route.LONG
    assert r.route("如何用Triton实现3×3卷积？") is Route.SHORT


def test_long_answer_min_hits_2_needs_two_keywords() -> None:
    r = router(LONG_ANSWER_MIN_HITS="2")
    assert r.route("CUDA中矩阵乘法算子如何利用共享内存？") is Route.SHORT
    assert r.route("如何用Triton实现GEMM并使用Tensor Cores？") is Route.LONG


def test_a_keyword_listed_twice_counts_once() -> None:
    # A user who copies the old script's full list into LONG_ANSWER_KEYWORDS repeats the built-in ones.
    r = router(LONG_ANSWER_MIN_HITS="2", LONG_ANSWER_KEYWORDS="GEMM,spmv")
    assert r.route("分块GEMM中每个线程块负责输出矩阵的哪一部分？") is Route.SHORT
    h = router(HARD_CODE_MIN_HITS="2", HARD_CODE_QUESTION_KEYWORDS="#include")
    assert h.route("#include <cstdio> 在 .cu 文件里有什么用？") is not Route.HARD


@pytest.mark.parametrize(
    "question",
    [
        "请给出CUDA向量加法的代码。",
        "用伪代码描述并行前缀和的Kogge-Stone算法。",
        "写出tiled矩阵转置的核心代码。",
        "给一个使用共享内存的代码片段。",
        "import numpy as np 之后如何把数组拷贝到GPU？",
        "def add(a, b): return a + b 如何改写成GPU上的逐元素操作？",
    ],
)
def test_code_questions_route_code(question: str) -> None:
    assert router().route(question) is Route.CODE


def test_import_and_def_need_the_trailing_space() -> None:
    r = router()
    assert r.route("默认流(default stream)与非默认流有什么区别？") is Route.SHORT
    assert r.route("为什么合并访问(coalescing)对带宽很重要(important)？") is Route.SHORT


def test_code_question_keywords_setting_adds_keywords_case_insensitively() -> None:
    question = "cuda_check 宏一般怎么写？"
    assert router().route(question) is Route.SHORT
    assert router(CODE_QUESTION_KEYWORDS="CUDA_CHECK,写一个").route(question) is Route.CODE


def test_hard_code_min_hits_2_needs_two_signals_and_one_still_makes_a_code_question() -> None:
    r = router(HARD_CODE_MIN_HITS="2")
    assert r.route(HARD_Q) is Route.CODE  # one hard signal: a code question, not a hard one
    two = "#include <cstdio>\n__global__ void hello() { printf(\"hi\"); } 为什么这个kernel不打印？"
    assert r.route(two) is Route.HARD


def test_precedence_hard_long_code_short() -> None:
    r = router()
    hard_and_long = "__global__ void spmv_csr(...) 这个SpMV算子如何优化？"
    long_and_code = "给出分块GEMM算子的核心代码。"
    assert r.route(hard_and_long) is Route.HARD
    assert r.route(long_and_code) is Route.LONG
    assert r.route("给出核心代码：如何计算全局线程索引？") is Route.CODE
    assert r.route(SHORT_Q) is Route.SHORT


# --- budgets -------------------------------------------------------------------------------------------


def test_default_budgets_per_route() -> None:
    s = settings()
    budgets = {route: budget(s, route) for route in Route}
    assert budgets == {Route.HARD: 192, Route.LONG: 192, Route.CODE: 96, Route.SHORT: 64}


def test_budgets_follow_their_variables() -> None:
    s = settings(MAX_NEW_TOKENS_CODE_HARD="400", MAX_NEW_TOKENS_CODE="300", MAX_NEW_TOKENS_CODE_SOFT="200",
                 MAX_NEW_TOKENS="50")
    assert [budget(s, r) for r in (Route.HARD, Route.LONG, Route.CODE, Route.SHORT)] == [400, 300, 200, 50]


def test_disable_token_routing_gives_max_new_tokens_to_every_route() -> None:
    s = settings(DISABLE_TOKEN_ROUTING="1", MAX_NEW_TOKENS="80")
    assert {budget(s, route) for route in Route} == {80}


# --- stop strings --------------------------------------------------------------------------------------


def test_default_stop_strings() -> None:
    assert stop_strings(settings()) == ["<|im_end|>", "<|endoftext|>"]


def test_stop_on_double_newline_puts_blank_line_first() -> None:
    assert stop_strings(settings(STOP_ON_DOUBLE_NEWLINE="1")) == ["\n\n", "<|im_end|>", "<|endoftext|>"]


def test_custom_stop_strings_with_escaped_newlines() -> None:
    s = settings(STOP_STRINGS="</s>, ###,\\n\\n", STOP_ON_DOUBLE_NEWLINE="0")
    assert stop_strings(s) == ["</s>", "###", "\n\n"]
    # Asked twice (in the list and by STOP_ON_DOUBLE_NEWLINE): once, first.
    s = settings(STOP_STRINGS="</s>,\\n\\n", STOP_ON_DOUBLE_NEWLINE="1")
    assert stop_strings(s) == ["\n\n", "</s>"]


# --- post-processing: think blocks ---------------------------------------------------------------------


def test_think_blocks_are_dropped() -> None:
    answer = "<think>先回忆定义。</think>共享内存是SM上的片上存储。<think>再补充作用域</think>作用域是线程块。"
    assert strip_think(answer) == "共享内存是SM上的片上存储。作用域是线程块。"


def test_answer_without_think_is_unchanged() -> None:
    answer = "  共享内存是SM上的片上存储。\n"
    assert strip_think(answer) == answer


def test_only_think_keeps_the_inner_text() -> None:
    assert strip_think("<think>\n共享内存位于SM内部，延迟低。\n</think>\n") == "共享内存位于SM内部，延迟低。"


def test_unclosed_think_alone_keeps_its_text() -> None:
    # The budget ran out while the model was still thinking: that text is all there is.
    assert strip_think("<think>warp是32个线程组成的调度单位") == "warp是32个线程组成的调度单位"


def test_unclosed_think_after_an_answer_is_dropped() -> None:
    answer = "<think>先想定义</think>warp是32个线程组成的调度单位。<think>再想想是否要提到"
    assert strip_think(answer) == "warp是32个线程组成的调度单位。"


# --- post-processing: examples -------------------------------------------------------------------------

HEAD = "共享内存是SM上的片上存储，访问延迟远低于全局内存。"


@pytest.mark.parametrize("marker", ["例如：", "比如：", "举例来说：", "举例：", "例如:", "比如:", "举例来说:", "举例:"])
def test_trim_cuts_before_example_marker_with_colon(marker: str) -> None:
    answer = f"{HEAD}{marker}矩阵乘法把tile载入共享内存复用。"
    assert trim_examples(answer) == HEAD


def test_trim_cuts_at_the_first_marker() -> None:
    answer = f"{HEAD}\n比如：矩阵乘法。\n例如：卷积。"
    assert trim_examples(answer) == HEAD


@pytest.mark.parametrize("text", [
    "例如共享内存和寄存器都在片上，访问都很快。",
    "数据并行的例子很多，比如彩色图像转灰度图。",
    "举例来说明：每个像素由一个线程处理。",
])
def test_no_trim_without_a_colon(text: str) -> None:
    assert trim_examples(text) == text


def test_trim_keeps_an_answer_that_is_only_an_example() -> None:
    answer = "例如：__shared__ float tile[32][32];"
    assert trim_examples(answer) == answer


def post(question: str, answer: str, **env: str) -> str:
    s = settings(**env)
    return PostProcessor.from_settings(s, Router.from_settings(s))(question, answer, True)


def test_post_processor_trims_short_answers() -> None:
    assert post(SHORT_Q, f"{HEAD}例如：矩阵乘法。") == HEAD
    assert post(SHORT_Q, "例如共享内存和寄存器都在片上。") == "例如共享内存和寄存器都在片上。"


def test_post_processor_does_not_trim_code_questions() -> None:
    answer = f"{HEAD}例如：__shared__ float tile[32];"
    assert post("请写出使用共享内存的代码片段。", answer) == answer


def test_output_trim_examples_0_keeps_examples() -> None:
    answer = f"{HEAD}例如：矩阵乘法。"
    assert post(SHORT_Q, answer, OUTPUT_TRIM_EXAMPLES="0") == answer


# --- post-processing: sentence limit -------------------------------------------------------------------


def test_sentences_split_after_each_terminator() -> None:
    text = "第一句。第二句！第三句？第四句；第五句\n第六句。第七句。"
    assert limit_sentences(text, 6) == "第一句。第二句！第三句？第四句；第五句\n第六句。"
    assert limit_sentences(text, 1) == "第一句。"
    assert limit_sentences(text, 12) == text


def test_blank_lines_do_not_count_and_ascii_periods_do_not_split() -> None:
    text = "要点1：先调用cudaMalloc(). 再拷贝。\n\n要点2：启动kernel\n\n要点3：同步"
    assert limit_sentences(text, 2) == "要点1：先调用cudaMalloc(). 再拷贝。\n\n要点2：启动kernel"


def test_default_keeps_six_sentences() -> None:
    assert post(SHORT_Q, sentences(9)) == sentences(6)


@pytest.mark.parametrize(("raw", "kept"), [("0", 1), ("-3", 1), ("1", 1), ("12", 12), ("50", 12)])
def test_output_max_sentences_is_clamped_1_to_12(raw: str, kept: int) -> None:
    assert settings(OUTPUT_MAX_SENTENCES=raw).output_max_sentences == kept
    assert post(SHORT_Q, sentences(15), OUTPUT_MAX_SENTENCES=raw) == sentences(kept)


def test_full_pipeline_on_a_short_answer() -> None:
    assert post(SHORT_Q, THINKING_ANSWER, OUTPUT_MAX_SENTENCES="1") == "warp分歧是指同一warp内的线程因条件分支走向不同路径。"
    assert post(SHORT_Q, THINKING_ANSWER) == (
        "warp分歧是指同一warp内的线程因条件分支走向不同路径。硬件会串行执行各条路径，未走该路径的线程被屏蔽。"
    )


# --- chat formatting -----------------------------------------------------------------------------------

# The Qwen2.5 structure, no tools: a default system turn when none is given, then one
# <|im_start|>role ... <|im_end|> block per message, then the assistant header.
QWEN_STYLE_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'user' or message.role == 'assistant' or (message.role == 'system' and not loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
# Qwen3 with thinking switched off in the template: an empty think block after the assistant header.
NO_THINK_TEMPLATE = QWEN_STYLE_TEMPLATE.replace(
    "{{- '<|im_start|>assistant\\n' }}", "{{- '<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n' }}"
)
# Templates of other families often trim the message content.
TRIM_TEMPLATE = QWEN_STYLE_TEMPLATE.replace("message.content +", "(message.content | trim) +")

QUESTIONS = [SHORT_Q, CODE_Q, LONG_Q, HARD_Q, "", "多行问题：\n1. 什么是warp？\n2. 什么是SM？"]


@pytest.fixture(scope="module")
def demo_tokenizer(demo_model: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(demo_model)


def tokenizer_with_template(demo_model: Path, directory: Path, template: str):
    """A copy of the demo tokenizer whose tokenizer_config.json carries ``template``."""
    from transformers import AutoTokenizer

    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "config.json"):
        shutil.copy(demo_model / name, directory / name)
    config_path = directory / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["chat_template"] = template
    config_path.write_text(json.dumps(config, ensure_ascii=False), encoding="utf-8")
    return AutoTokenizer.from_pretrained(directory)


def template(tokenizer, system: str, question: str) -> str:
    messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def test_fast_chat_is_the_qwen_form() -> None:
    assert fast_chat(SYSTEM, SHORT_Q) == (
        f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{SHORT_Q}<|im_end|>\n<|im_start|>assistant\n"
    )


def test_demo_tokenizer_uses_the_fast_path_and_matches_its_template(demo_tokenizer) -> None:
    formatter = Formatter(demo_tokenizer, SYSTEM)
    assert formatter.fast
    expected = [template(demo_tokenizer, SYSTEM, q) for q in QUESTIONS]
    assert formatter.many(QUESTIONS) == expected
    assert [formatter(q) for q in QUESTIONS] == expected


def test_qwen_style_template_uses_the_fast_path(demo_model: Path, tmp_path: Path) -> None:
    tokenizer = tokenizer_with_template(demo_model, tmp_path, QWEN_STYLE_TEMPLATE)
    formatter = Formatter(tokenizer, SYSTEM)
    assert formatter.fast
    assert [fast_chat(SYSTEM, q) for q in QUESTIONS] == [template(tokenizer, SYSTEM, q) for q in QUESTIONS]


def test_a_different_template_is_used_as_is(demo_model: Path, tmp_path: Path) -> None:
    tokenizer = tokenizer_with_template(demo_model, tmp_path, NO_THINK_TEMPLATE)
    formatter = Formatter(tokenizer, SYSTEM)
    assert not formatter.fast
    expected = [template(tokenizer, SYSTEM, q) for q in QUESTIONS]
    assert all(e.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n") for e in expected)
    assert formatter.many(QUESTIONS) == expected
    assert [formatter(q) for q in QUESTIONS] == expected


def test_a_template_that_trims_content_is_not_taken_for_the_fast_path(demo_model: Path, tmp_path: Path) -> None:
    tokenizer = tokenizer_with_template(demo_model, tmp_path, TRIM_TEMPLATE)
    formatter = Formatter(tokenizer, SYSTEM)
    padded = ["  什么是warp？\n", "请解释共享内存。 "]
    assert formatter.many(padded) == [template(tokenizer, SYSTEM, q) for q in padded]


def test_another_system_prompt_is_rendered_verbatim(demo_tokenizer) -> None:
    # A runtime system prompt (POST /system_prompt) builds a new Formatter; it is rendered verbatim.
    other = "只回答结论。"
    formatter = Formatter(demo_tokenizer, other)
    assert formatter.many([SHORT_Q]) == [template(demo_tokenizer, other, SHORT_Q)]
    assert other in formatter(SHORT_Q)


# --- planning ------------------------------------------------------------------------------------------

STOP_IDS = [2, 1]  # the engine's end-of-turn token ids, passed through as given


def planner(system: str = SYSTEM, **env: str) -> Planner:
    return Planner(settings(**env), Formatter(None, system), list(STOP_IDS))


def test_plan_routes_formats_and_budgets_each_question() -> None:
    questions = [SHORT_Q, CODE_Q, LONG_Q, HARD_Q]
    plans = planner(MAX_NEW_TOKENS_CODE_HARD="400", MAX_NEW_TOKENS_CODE="300", MAX_NEW_TOKENS_CODE_SOFT="200",
                    MAX_NEW_TOKENS="50").plan(questions)
    assert [p.route for p in plans] == [Route.SHORT, Route.CODE, Route.LONG, Route.HARD]
    assert [p.sampling["max_tokens"] for p in plans] == [50, 200, 300, 400]
    assert [p.prompt for p in plans] == [fast_chat(SYSTEM, q) for q in questions]
    assert [p.short for p in plans] == [True, False, False, False]


def test_plan_default_sampling_matches_settings() -> None:
    plans = planner().plan([SHORT_Q, CODE_Q, LONG_Q, HARD_Q])
    assert [p.sampling["max_tokens"] for p in plans] == [64, 96, 192, 192]
    for p in plans:
        assert p.sampling["temperature"] == 0.0
        assert p.sampling["top_p"] == 1.0
        assert p.sampling["top_k"] == 1
        assert p.sampling["repetition_penalty"] == 1.05
        assert p.sampling["frequency_penalty"] == 0.1
        assert p.sampling["stop"] == ["<|im_end|>", "<|endoftext|>"]
        assert p.sampling["stop_token_ids"] == STOP_IDS


def test_plan_sampling_follows_changed_settings() -> None:
    p = planner(TEMPERATURE="0.7", TOP_P="0.9", TOP_K="20", REPETITION_PENALTY="1.2", FREQUENCY_PENALTY="0",
                STOP_ON_DOUBLE_NEWLINE="1").plan([SHORT_Q])[0]
    picked = {k: p.sampling[k] for k in ("temperature", "top_p", "top_k", "repetition_penalty", "frequency_penalty")}
    assert picked == {"temperature": 0.7, "top_p": 0.9, "top_k": 20, "repetition_penalty": 1.2,
                      "frequency_penalty": 0.0}
    assert p.sampling["stop"][0] == "\n\n"


def test_overrides_apply_to_every_question() -> None:
    overrides = Sampling(max_tokens=33, temperature=0.6, top_k=40)
    plans = planner().plan([SHORT_Q, CODE_Q, LONG_Q, HARD_Q], overrides)
    assert {p.sampling["max_tokens"] for p in plans} == {33}
    assert {p.sampling["temperature"] for p in plans} == {0.6}
    assert {p.sampling["top_k"] for p in plans} == {40}
    assert {p.sampling["top_p"] for p in plans} == {1.0}  # not overridden: the setting's value
    assert [p.route for p in plans] == [Route.SHORT, Route.CODE, Route.LONG, Route.HARD]


def test_routing_off_gives_every_question_max_new_tokens_and_post_processing() -> None:
    plans = planner(DISABLE_TOKEN_ROUTING="1", MAX_NEW_TOKENS="256").plan([SHORT_Q, CODE_Q, LONG_Q, HARD_Q])
    assert {p.sampling["max_tokens"] for p in plans} == {256}
    assert all(p.short for p in plans)


def test_post_processing_applies_to_short_route_only_when_routing_is_on() -> None:
    p = planner()
    questions = [SHORT_Q, CODE_Q, LONG_Q, HARD_Q]
    answers = [p.post(q, THINKING_ANSWER, plan.short) for q, plan in zip(questions, p.plan(questions), strict=True)]
    assert "<think>" not in answers[0] and "例如" not in answers[0]
    assert answers[1:] == [THINKING_ANSWER] * 3


def test_post_processing_applies_to_all_when_routing_is_off_but_never_trims_code() -> None:
    p = planner(DISABLE_TOKEN_ROUTING="1")
    answer = f"<think>想一想</think>{HEAD}例如：tile复用。"
    questions = [SHORT_Q, CODE_Q, LONG_Q]
    out = {q: p.post(q, answer, plan.short) for q, plan in zip(questions, p.plan(questions), strict=True)}
    assert out[SHORT_Q] == HEAD
    assert out[LONG_Q] == HEAD
    assert out[CODE_Q] == f"{HEAD}例如：tile复用。"  # think dropped, example kept for a code question


def test_qwen3_preset_plans_512_tokens_for_everything() -> None:
    from env import layer

    values = {k: v.value for k, v in layer({}, "qwen3-4b").items()}
    p = Planner(Settings.from_environ(values), Formatter(None, SYSTEM), list(STOP_IDS))
    plans = p.plan([SHORT_Q, HARD_Q])
    assert [pl.sampling["max_tokens"] for pl in plans] == [512, 512]
    assert all(pl.short for pl in plans)
