"""``inv eval``: ROUGE-L on jieba tokens, the question file readers, route grouping, and a real run."""

from __future__ import annotations

import json
import random
import subprocess
from pathlib import Path

import pytest

from bench.data import DataError, load_pairs
from bench.evaluate import Item, format_table, generated_tokens, main, route_group, router_for, score_items, summarize
from bench.rouge import lcs_length, rouge_l, tokens
from service.pipeline.routing import Route
from tests.conftest import PYTHON, SHARED_DATA, Service, free_port, python_env

REPORT_KEYS = {"url", "data", "offset", "questions", "scored", "rouge_l_f1", "answer_chars", "routes", "wall_s",
               "questions_per_s", "generated_tokens", "tokens_per_s", "failed", "worst"}


# --- ROUGE-L -----------------------------------------------------------------------------------------

def test_identical_scores_one() -> None:
    text = "共享内存是线程块内线程共享的片上存储。"
    assert rouge_l(text, text).f1 == pytest.approx(1.0)


def test_disjoint_scores_zero() -> None:
    assert rouge_l("共享内存", "全局延迟").f1 == 0.0


def test_partial_chinese_by_hand() -> None:
    # reference ['全局', '内存', '延迟', '高'], candidate ['共享内存', '延迟', '低']: LCS 1 ('延迟')
    assert tokens("全局内存延迟高") == ["全局", "内存", "延迟", "高"]
    assert tokens("共享内存延迟低") == ["共享内存", "延迟", "低"]
    score = rouge_l("全局内存延迟高", "共享内存延迟低")
    assert (score.lcs, score.precision, score.recall) == (1, pytest.approx(1 / 3), pytest.approx(1 / 4))
    assert score.f1 == pytest.approx(2 / 7)
    # subsequence, not substring: 线程 通过 共享内存 协作 all appear in order in the 9-token reference
    score = rouge_l("线程块内的线程可以通过共享内存协作", "线程通过共享内存协作")
    assert (score.lcs, score.precision) == (4, 1.0)
    assert score.f1 == pytest.approx(8 / 13)


def test_empty_sides_score_zero() -> None:
    assert rouge_l("", "").f1 == 0.0
    assert rouge_l("共享内存", "").f1 == 0.0
    assert rouge_l("", "共享内存").f1 == 0.0
    assert rouge_l("  \n ", "共享内存").f1 == 0.0  # whitespace-only tokens are dropped


def test_whitespace_is_not_a_token() -> None:
    assert tokens("GPU  的内存 \n") == ["GPU", "的", "内存"]
    assert rouge_l("GPU 的 内存", "GPU的内存").f1 == pytest.approx(1.0)


def test_bit_parallel_lcs_matches_dynamic_programming() -> None:
    def dp(a: list[str], b: list[str]) -> int:
        prev = [0] * (len(b) + 1)
        for x in a:
            cur = [0]
            for j, y in enumerate(b):
                cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
            prev = cur
        return prev[-1]

    rng = random.Random(7)
    for _ in range(500):
        a = [rng.choice("abcd") for _ in range(rng.randint(0, 40))]
        b = [rng.choice("abcde") for _ in range(rng.randint(0, 40))]
        assert lcs_length(a, b) == dp(a, b)


# --- readers -----------------------------------------------------------------------------------------

def _jsonl(path: Path, records: list[object]) -> Path:
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n\n", encoding="utf-8")
    return path


def test_jsonl_messages_and_flat_keys(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "q.jsonl", [
        {"messages": [{"role": "system", "content": "sys"}, {"role": "user", "content": "问1"},
                      {"role": "assistant", "content": "答1"}]},
        {"messages": [{"role": "user", "content": "问2"}]},
        {"prompt": "问3", "answer": "答3"},
        {"question": "问4", "reference": "答4"},
        {"instruction": "问5", "response": "答5"},
        {"question": "问6"},
    ])
    assert load_pairs(path) == [("问1", "答1"), ("问2", None), ("问3", "答3"), ("问4", "答4"), ("问5", "答5"),
                                ("问6", None)]
    assert load_pairs(path, n=2, offset=1) == [("问2", None), ("问3", "答3")]
    assert load_pairs(path, n=10, offset=5) == [("问6", None)]


@pytest.mark.parametrize(("line", "expected"), [
    ("{not json", "invalid JSON"),
    ('["a list"]', "expected a JSON object"),
    ('{"answer": "no question"}', "no question"),
    ('{"messages": [{"role": "assistant", "content": "x"}]}', "no user turn"),
    ('{"prompt": 3}', "`prompt` must be a string"),
    ('{"prompt": "  "}', "the question is empty"),
])
def test_jsonl_errors_name_file_and_line(tmp_path: Path, line: str, expected: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "ok"}\n\n' + line + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=expected) as err:
        load_pairs(path)
    assert f"{path}:3:" in str(err.value)


def test_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such file"):
        load_pairs(tmp_path / "missing.jsonl")
    (tmp_path / "q.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="unsupported file type"):
        load_pairs(tmp_path / "q.csv")
    (tmp_path / "latin.jsonl").write_bytes(b'{"prompt": "\xe9"}\n')
    with pytest.raises(DataError, match="not UTF-8"):
        load_pairs(tmp_path / "latin.jsonl")
    (tmp_path / "fake.docx").write_bytes(b"not a zip")
    with pytest.raises(DataError, match="not a readable .docx"):
        load_pairs(tmp_path / "fake.docx")


def _docx(path: Path, paragraphs: list[str]) -> Path:
    docx = pytest.importorskip("docx", reason="python-docx is not installed")
    document = docx.Document()
    for text in paragraphs:
        document.add_paragraph(text)
    document.save(str(path))
    return path


def test_docx_pairs(tmp_path: Path) -> None:
    path = _docx(tmp_path / "qa.docx", [
        "PMPP 问答", "",
        "问题：什么是线程束？", "答案：线程束（warp）是 32 个线程。",
        "1. 问题: 什么是共享内存？", "答案: 片上存储。", "", "第二段：块内共享。",
        "问题：没有答案的问题", "续行",
        "问题2：最后一题", "答案：完。",
    ])
    assert load_pairs(path) == [
        ("什么是线程束？", "线程束（warp）是 32 个线程。"),
        ("什么是共享内存？", "片上存储。\n第二段：块内共享。"),
        ("没有答案的问题\n续行", None),
        ("最后一题", "完。"),
    ]
    assert load_pairs(path, n=1, offset=1) == [("什么是共享内存？", "片上存储。\n第二段：块内共享。")]


def test_docx_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"paragraph 2: 答案 before any 问题"):
        load_pairs(_docx(tmp_path / "a.docx", ["标题", "答案：孤儿"]))
    with pytest.raises(DataError, match=r"paragraph 3: a second 答案 for the 问题 of paragraph 1"):
        load_pairs(_docx(tmp_path / "b.docx", ["问题：一", "答案：一", "答案：二"]))
    with pytest.raises(DataError, match="no `问题：` paragraphs"):
        load_pairs(_docx(tmp_path / "c.docx", ["只是一些文字"]))


# --- routes, metrics and the report ------------------------------------------------------------------

def test_route_groups() -> None:
    assert [route_group(r) for r in Route] == ["short", "code", "long", "code"]
    router = router_for(None, {})
    questions = {"什么是线程束？": "short", "给出核心代码": "code", "解释 __global__ void f() 的代码": "code",
                 "im2col 如何实现卷积？": "long"}
    assert {q: route_group(router.route(q)) for q in questions} == questions
    # the service's own keywords (from GET /info) win over this shell's
    router = router_for({"CODE_QUESTION_KEYWORDS": ["线程束"], "HARD_CODE_MIN_HITS": 1}, {})
    assert route_group(router.route("什么是线程束？")) == "code"


def test_generated_tokens_sums_routes() -> None:
    text = ("# HELP qa_generated_tokens_total Tokens generated, by route.\n"
            "# TYPE qa_generated_tokens_total counter\n"
            'qa_generated_tokens_total{route="short"} 120.0\n'
            'qa_generated_tokens_total{route="hard"} 3.5e+01\n'
            'qa_generated_tokens_created{route="short"} 1.7e+09\n'
            "qa_questions_total 7.0\n")
    assert generated_tokens(text) == 155.0
    assert generated_tokens("qa_questions_total 1.0\n") == 0.0


def test_summary_groups_scores_by_route() -> None:
    pairs = [("什么是线程束？", "线程束是32个线程"), ("给出核心代码", "代码"), ("kernel<<<1,1>>> 代码", "x"),
             ("问", None), ("坏", "答")]
    answers = ["线程束是32个线程", "无关", "x", "随便", ""]
    items = score_items(pairs, answers, ["short", "code", "hard", "short", "long"], {4: "too long"}, offset=10)
    assert [it.index for it in items] == [10, 11, 12, 13, 14]
    report = summarize(items, wall_s=2.0, tokens=50.0, worst=2)
    assert (report["questions"], report["scored"]) == (5, 4)
    assert report["rouge_l_f1"] == pytest.approx((1 + 0 + 1 + 0) / 4)
    assert report["routes"]["code"] == {"questions": 2, "scored": 2, "rouge_l_f1": 0.5,
                                        "answer_chars": pytest.approx(1.5)}
    assert report["routes"]["long"]["rouge_l_f1"] == 0.0 and report["routes"]["long"]["answer_chars"] is None
    assert report["answer_chars"] == pytest.approx((9 + 2 + 1 + 2) / 4)  # the failed item is left out
    assert (report["questions_per_s"], report["tokens_per_s"]) == (2.5, 25.0)
    assert report["failed"] == [{"index": 14, "question": "坏", "message": "too long"}]
    assert [w["index"] for w in report["worst"]] == [11, 14]
    assert set(report["worst"][0]) == {"index", "route", "question", "reference", "answer", "score"}
    table = format_table(report)
    assert "ROUGE-L F1" in table and "25.0 tokens/s" in table and "#14" in table
    assert summarize([], 0.0, None)["tokens_per_s"] is None
    assert isinstance(items[0], Item)


# --- against the real service ------------------------------------------------------------------------

needs_data = pytest.mark.skipif(not SHARED_DATA.is_file(), reason=f"workload file {SHARED_DATA} is absent")


@needs_data
def test_cli_reports_on_the_real_service(service: Service) -> None:
    proc = subprocess.run([PYTHON, "-m", "bench.evaluate", str(SHARED_DATA), "--url", service.url, "-n", "20",
                           "--offset", "3", "--worst", "3", "--json"],
                          env=python_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode in (0, 1), proc.stderr
    report = json.loads(proc.stdout)
    assert REPORT_KEYS <= set(report)
    assert (report["questions"], report["scored"], report["offset"]) == (20, 20, 3)
    assert 0.0 <= report["rouge_l_f1"] <= 1.0
    assert set(report["routes"]) == {"short", "code", "long"}
    assert sum(g["questions"] for g in report["routes"].values()) == 20
    assert report["tokens_per_s"] > 0 and report["questions_per_s"] > 0
    assert len(report["worst"]) == 3 and report["worst"][0]["score"] <= report["worst"][-1]["score"]
    assert (proc.returncode == 1) == bool(report["failed"])
    lines = proc.stderr.splitlines()
    assert lines and all(line.startswith("[eval] ") for line in lines), proc.stderr


@needs_data
def test_main_prints_a_table(service: Service, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(service.url, SHARED_DATA, n=5, offset=0, worst=2, json_out=False)
    out = capsys.readouterr().out
    assert code in (0, 1)
    assert "ROUGE-L F1" in out and "tokens/s" in out and "worst 2:" in out


def test_main_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{oops\n", encoding="utf-8")
    assert main("http://127.0.0.1:1", bad, n=None, offset=0, worst=1, json_out=True) == 2
    good = _jsonl(tmp_path / "q.jsonl", [{"prompt": "问", "answer": "答"}])
    assert main(f"http://127.0.0.1:{free_port()}", good, n=None, offset=0, worst=1, json_out=True) == 3
    assert capsys.readouterr().out == ""
