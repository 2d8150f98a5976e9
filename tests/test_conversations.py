"""Conversation loading: every SFT format renders to the same chat-template text, preference formats give
the same triples, the real public samples load, and bad rows are refused with file, line and field."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import shared_path
from transformers import AutoTokenizer

from utils.data.conversations import load_answered_prompts, load_conversations, load_preferences
from utils.errors import UserError

QUESTION, ANSWER = "怎样泡一杯好喝的绿茶？", "水温八十度左右，先温杯，再放茶叶，泡两分钟即可。"
EXTRA = "家里只有玻璃杯。"
SYSTEM = "你是一个耐心的生活助手。"
EARLIER = ("明天要下雨吗？", "天气预报说明天有小雨，记得带伞。")


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def render(tokenizer, conversations):
    return [tokenizer.apply_chat_template(c, tokenize=False) for c in conversations]


@pytest.fixture(scope="module")
def tokenizer(tiny_tokenizer):
    return AutoTokenizer.from_pretrained(tiny_tokenizer)


def test_all_sft_formats_render_the_same(tmp_path, tokenizer):
    prompt = f"{QUESTION}\n{EXTRA}"
    single = {
        "prompt_response.jsonl": [{"prompt": prompt, "response": ANSWER}],
        "alpaca.json": [{"instruction": QUESTION, "input": EXTRA, "output": ANSWER}],
        "sharegpt.jsonl": [{"conversations": [{"from": "human", "value": prompt}, {"from": "gpt", "value": ANSWER}]}],
        "messages.jsonl": [{"messages": [{"role": "user", "content": prompt},
                                         {"role": "assistant", "content": ANSWER}]}],
    }
    paths = []
    for name, rows in single.items():
        path = tmp_path / name
        if name.endswith(".json"):
            path.write_text(json.dumps(rows, ensure_ascii=False, indent=1), encoding="utf-8")
        else:
            write_jsonl(path, rows)
        paths.append(str(path))
    pq.write_table(pa.Table.from_pylist(single["prompt_response.jsonl"]), tmp_path / "pairs.parquet")
    with open(tmp_path / "pairs.csv", "w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, ["prompt", "response"])
        writer.writeheader()
        writer.writerow({"prompt": prompt, "response": ANSWER})
    paths += [str(tmp_path / "pairs.parquet"), str(tmp_path / "pairs.csv")]
    texts = render(tokenizer, load_conversations(paths))
    assert len(texts) == 6 and len(set(texts)) == 1
    assert texts[0] == f"<|user|>\n{prompt}<|end|>\n<|assistant|>\n{ANSWER}<|end|>\n"
    assert render(tokenizer, load_conversations([paths[0]], fmt="prompt_response")) == texts[:1]  # declared


def test_multi_turn_formats_with_system_render_the_same(tmp_path, tokenizer):
    alpaca = write_jsonl(tmp_path / "a.jsonl", [{"instruction": QUESTION, "input": "", "output": ANSWER,
                                                 "history": [list(EARLIER)], "system": SYSTEM}])
    turns = [("system", SYSTEM), ("human", EARLIER[0]), ("gpt", EARLIER[1]), ("human", QUESTION), ("gpt", ANSWER),
             ("human", "谢谢")]  # a trailing unanswered turn is dropped
    sharegpt = write_jsonl(tmp_path / "s.jsonl", [{"conversations": [{"from": f, "value": v} for f, v in turns]}])
    roles = {"human": "user", "gpt": "assistant", "system": "system"}
    messages = write_jsonl(tmp_path / "m.jsonl", [{"messages": [{"role": roles[f], "content": v}
                                                                for f, v in turns[:-1]]}])
    conversations = load_conversations([alpaca, sharegpt, messages])
    assert len(set(render(tokenizer, conversations))) == 1
    assert [m["role"] for m in conversations[0]] == ["system", "user", "assistant", "user", "assistant"]
    # a default system prompt goes only where there is none
    plain = write_jsonl(tmp_path / "p.jsonl", [{"prompt": QUESTION, "response": ANSWER}])
    loaded = load_conversations([plain, alpaca], system_prompt="默认")
    assert loaded[0][0] == {"role": "system", "content": "默认"} and loaded[1][0]["content"] == SYSTEM


def test_preference_formats_give_the_same_triples(tmp_path):
    prompt = [{"role": "user", "content": QUESTION}]
    rows = {
        "plain": {"prompt": QUESTION, "chosen": ANSWER, "rejected": "随便泡。"},
        "list_prompt": {"prompt": prompt, "chosen": ANSWER, "rejected": "随便泡。"},
        "turns": {"conversations": [{"from": "human", "value": QUESTION}],
                  "chosen": {"from": "gpt", "value": ANSWER}, "rejected": {"from": "gpt", "value": "随便泡。"}},
        "strings": {"conversations": [{"from": "human", "value": QUESTION}], "chosen": ANSWER, "rejected": "随便泡。"},
        "alpaca": {"instruction": QUESTION, "input": "", "chosen": ANSWER, "rejected": "随便泡。"},
        "messages": {"messages": prompt, "chosen": [{"role": "assistant", "content": ANSWER}],
                     "rejected": [{"role": "assistant", "content": "随便泡。"}]},
        # TRL's explicit prompt with message lists on every side
        "trl_explicit": {"prompt": prompt, "chosen": [{"role": "assistant", "content": ANSWER}],
                         "rejected": [{"role": "assistant", "content": "随便泡。"}]},
        # LLaMA-Factory's alpaca pairwise rows: output = [chosen, rejected]
        "alpaca_pairwise": {"instruction": QUESTION, "input": "", "output": [ANSWER, "随便泡。"], "history": []},
        # TRL's implicit prompt: two whole conversations, the same up to the answer
        "trl_implicit": {"chosen": [*prompt, {"role": "assistant", "content": ANSWER}],
                         "rejected": [*prompt, {"role": "assistant", "content": "随便泡。"}]},
    }
    paths = [write_jsonl(tmp_path / f"{name}.jsonl", [row]) for name, row in rows.items()]
    pairs = load_preferences(paths)
    assert pairs == [{"prompt": prompt, "chosen": ANSWER, "rejected": "随便泡。", "weight": 1.0}] * len(rows)
    # rejected-answer generation reads prompts + chosen answers from either kind of file, every format
    sft = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": QUESTION, "response": ANSWER}])
    assert load_answered_prompts([*paths, sft]) == [{"prompt": prompt, "chosen": ANSWER}] * (len(rows) + 1)


def test_multi_turn_preference_formats_keep_history_and_system(tmp_path):
    """LLaMA-Factory's alpaca pairwise rows with history and system, its ShareGPT ranking rows with a
    top-level system, and TRL's implicit-prompt conversations give the same multi-turn prompt."""
    history = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": EARLIER[0]},
               {"role": "assistant", "content": EARLIER[1]}, {"role": "user", "content": QUESTION}]
    turns = [{"from": {"user": "human", "assistant": "gpt"}[m["role"]], "value": m["content"]} for m in history[1:]]
    rows = [
        {"instruction": QUESTION, "input": "", "output": [ANSWER, "不知道。"], "history": [list(EARLIER)],
         "system": SYSTEM},
        {"conversations": turns, "system": SYSTEM, "chosen": {"from": "gpt", "value": ANSWER},
         "rejected": {"from": "gpt", "value": "不知道。"}},
        {"chosen": [*history, {"role": "assistant", "content": ANSWER}],
         "rejected": [*history, {"role": "assistant", "content": "不知道。"}]},
    ]
    paths = [write_jsonl(tmp_path / f"{i}.jsonl", [row]) for i, row in enumerate(rows)]
    assert load_preferences(paths) == [{"prompt": history, "chosen": ANSWER, "rejected": "不知道。", "weight": 1.0}] * 3
    assert load_preferences([paths[2]], fmt="implicit_prompt") == load_preferences([paths[2]])  # declared


def test_real_public_samples_load():
    sft = shared_path("sft")
    counts = {name: len(load_conversations([str(sft / name)])) for name in (
        "chatlm_mini_chinese/my_train_dataset_3k.parquet", "chatlm_mini_chinese/my_valid_dataset_1k.jsonl",
        "llamafactory_alpaca_zh_demo.json", "medicalgpt_Belle_open_source_1k.jsonl",
        "llamafactory_oaast_sft_zh.json", "medicalgpt_sharegpt_zh_1K_format.jsonl")}
    # the ShareGPT sample has one conversation without any answer (skipped)
    assert list(counts.values()) == [3000, 1000, 1000, 1000, 689, 999]
    oaast = load_conversations([str(sft / "llamafactory_oaast_sft_zh.json")])
    assert sum(len(c) > 2 for c in oaast) == 390  # the multi-turn rows keep their history
    sharegpt = load_conversations([str(sft / "medicalgpt_sharegpt_zh_1K_format.jsonl")])
    assert all(c[-1]["role"] == "assistant" and c[-1]["content"].strip() for c in sharegpt)
    dpo = shared_path("dpo")
    demo = load_preferences([str(dpo / "llamafactory_dpo_zh_demo.json")])
    medical = load_preferences([str(dpo / "medicalgpt_dpo_zh_500.jsonl")])
    assert len(demo) == 300 and len(medical) == 500
    for pair in demo + medical:
        assert pair["prompt"][-1]["role"] == "user" and pair["chosen"] and pair["rejected"]
    assert sum(p["prompt"][0]["role"] == "system" for p in medical) == 84


RANKINGS = Path(__file__).parent / "data"


@pytest.mark.parametrize("pairs, counts", [("all", [6, 3, 1, 10, 3, 6]), ("best_vs_rest", [3, 2, 1, 4, 2, 3]),
                                           ("adjacent", [3, 2, 1, 4, 2, 3])])
def test_rankings_best_first_become_pairs_weighted_once_per_ranking(pairs, counts):
    """LLaMA-Factory's older ranking rows (alpaca `output`, best first, 2 to 5 answers): K(K-1)/2 pairs with `all`,
    K-1 with the others; every pair puts the better answer first, and the weights of a ranking sum to 1."""
    path = str(RANKINGS / "ranking_alpaca_zh.json")
    rankings = json.loads((RANKINGS / "ranking_alpaca_zh.json").read_text(encoding="utf-8"))
    rows = load_preferences([path], pairs=pairs)
    assert len(rows) == sum(counts)
    start = 0
    for ranking, count in zip(rankings, counts):
        group, start = rows[start:start + count], start + count
        assert {row["prompt"][-1]["content"].split("\n")[0] for row in group} == {ranking["instruction"]}
        assert math.fsum(row["weight"] for row in group) == pytest.approx(1, abs=1e-12)
        order = ranking["output"]
        assert all(order.index(row["chosen"]) < order.index(row["rejected"]) for row in group)
        if pairs == "best_vs_rest":
            assert {row["chosen"] for row in group} == {order[0]}
        if pairs == "adjacent":
            assert all(order.index(row["rejected"]) == order.index(row["chosen"]) + 1 for row in group)
    # instruction data readers take the best answer as the reference
    assert [row["chosen"] for row in load_answered_prompts([path])] == [r["output"][0] for r in rankings]


def test_rankings_by_rank_or_score_order_answers_and_ties_make_no_pair():
    """`answers` with OpenAssistant-style `ranks` (lower is better) or `scores` (higher is better); answers
    that tie (scores 6 and 6) are never paired with each other."""
    path = str(RANKINGS / "ranking_answers_zh.jsonl")
    ranked, scored, best_first = [json.loads(line) for line in
                                  (RANKINGS / "ranking_answers_zh.jsonl").read_text(encoding="utf-8").splitlines()]
    a = ranked["answers"]
    by_ranks = {(a[1], a[2]), (a[1], a[0]), (a[2], a[0])}
    s = scored["answers"]
    by_scores = {"all": {(s[0], s[1]), (s[0], s[2]), (s[0], s[3]), (s[1], s[3]), (s[2], s[3])},
                 "best_vs_rest": {(s[0], s[1]), (s[0], s[2]), (s[0], s[3])},
                 "adjacent": {(s[0], s[1]), (s[0], s[2]), (s[1], s[3]), (s[2], s[3])}}
    for pairs, expected in by_scores.items():
        rows = load_preferences([path], pairs=pairs)
        got = [{(r["chosen"], r["rejected"]) for r in rows if r["prompt"][-1]["content"] == row["prompt"]}
               for row in (ranked, scored, best_first)]
        assert got[1] == expected and got[2] == {tuple(best_first["answers"])}
        assert got[0] == (by_ranks if pairs == "all" else {(a[1], a[2]), (a[1], a[0])} if pairs == "best_vs_rest"
                          else {(a[1], a[2]), (a[2], a[0])})
        assert [r["weight"] for r in rows if r["prompt"][-1]["content"] == scored["prompt"]] == [
            1 / len(expected)] * len(expected)
    assert load_answered_prompts([path])[0]["chosen"] == a[1]  # rank 0 is the best
    with pytest.raises(UserError, match="unknown ranking_pairs 'best'") as error:
        load_preferences([path], pairs="best")
    assert error.value.field == "ranking_pairs"


@pytest.mark.parametrize("content, loader, match, line, field", [
    ('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "d", "rejected": "e"}\n',
     load_preferences, "missing field 'chosen'", 2, "chosen"),
    ('{"prompt": "你好", "response": "好"}\n\n{"prompt": "  ", "response": "好"}\n',
     load_conversations, "empty prompt", 3, "prompt"),
    ('{"prompt": "你好", "response": "好"}\n{"prompt": "你好", "response": "好"\n',
     load_conversations, "not valid JSON", 2, None),
    ('{"conversations": [{"from": "human", "value": "你好"}, {"from": "robot", "value": "好"}]}\n',
     load_conversations, "unknown role 'robot'", 1, "conversations[1].from"),
    ('{"instruction": "你好", "input": "", "output": ""}\n', load_conversations, "empty answer", 1, "output"),
    ('{"prompt": "你好", "chosen": "好", "rejected": " "}\n', load_preferences, "empty answer", 1, "rejected"),
    ('{"text": "你好"}\n', load_conversations, "unknown data format", 1, None),
    ('{"instruction": "你好", "output": ["好", "不好"]}\n{"instruction": "你好", "output": ["好"]}\n',
     load_preferences, "holds \\[chosen, rejected\\], not 1", 2, "output"),
    ('{"instruction": "你好", "output": ["好", ""]}\n', load_preferences, "empty answer", 1, "output[1]"),
    ('{"chosen": [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "好"}], '
     '"rejected": [{"role": "user", "content": "您好"}, {"role": "assistant", "content": "嗯"}]}\n',
     load_preferences, "differ before their last turn", 1, "rejected"),
    ('{"chosen": [{"role": "user", "content": "你好"}], "rejected": [{"role": "user", "content": "你好"}]}\n',
     load_answered_prompts, "ending with the assistant's answer", 1, "chosen"),
    ('{"chosen": "好", "rejected": "不好"}\n', load_preferences, "non-empty list of turns", 1, "chosen"),
    ('{"prompt": "你好", "answers": ["好"]}\n', load_preferences, "two or more answers", 1, "answers"),
    ('{"prompt": "你好", "answers": ["好", "不好"], "ranks": [0]}\n', load_preferences, "list of 2 numbers", 1,
     "ranks"),
    ('{"prompt": "你好", "answers": ["好", "不好"], "scores": [3, 3]}\n', load_preferences, "same score", 1,
     "scores"),
    ('{"prompt": "你好", "answers": ["好", "不好"], "ranks": [0, 1], "scores": [1, 0]}\n', load_preferences,
     "both 'ranks' and 'scores'", 1, "scores"),
    ('{"prompt": "你好", "answers": ["好", " "]}\n', load_preferences, "empty answer", 1, "answers[1]"),
])
def test_bad_rows_are_refused_with_file_line_and_field(tmp_path, content, loader, match, line, field):
    path = tmp_path / "bad.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(UserError, match=match) as error:
        loader([str(path)])
    assert error.value.path == str(path) and error.value.line == line and error.value.field == field
    assert error.value.fix and f"{path}, line {line}" in str(error.value)


def test_json_array_errors_name_the_row(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([{"instruction": "问", "output": "答"}, {"input": "x", "output": "答"}]),
                    encoding="utf-8")
    with pytest.raises(UserError, match="row 1: missing field 'instruction'"):
        load_conversations([str(path)], fmt="alpaca")
    with pytest.raises(UserError, match="no such file"):
        load_conversations([str(tmp_path / "missing.jsonl")])


def test_one_reader_gives_both_pipelines_the_files_own_lines(tmp_path):
    """Conversations and the corpus read JSON through the same reader: a byte-order mark and blank lines
    before the first row, and a U+2028 inside a string (a line break to `str.splitlines`), keep the error
    on the file's own line; a CSV that is not UTF-8 is refused like any other file."""
    from utils.data.sources import read_records

    good = json.dumps({"prompt": "问\u2028题", "response": ANSWER, "text": "文\u2028本"}, ensure_ascii=False)
    lines = tmp_path / "bad.jsonl"
    lines.write_text(f"\ufeff\n\n{good}\n{{\"prompt\": \"x\", oops}}\n", encoding="utf-8")
    array = tmp_path / "bad.json"
    array.write_text(f"\n\n[{good},\n {{\"prompt\": oops}}]\n", encoding="utf-8")
    for path in (lines, array):
        for read, source in ((load_conversations, [str(path)]), (read_records, path)):
            with pytest.raises(UserError, match="not valid JSON") as error:
                list(read(source))
            assert error.value.path == str(path) and error.value.line == 4
    lines.write_text(f"\n{good}\n", encoding="utf-8")
    assert load_conversations([str(lines)])[0][0]["content"] == "问\u2028题"
    assert [(doc.text, location.line) for doc, location in read_records(lines)] == [("文\u2028本", 2)]
    gbk = tmp_path / "gbk.csv"
    gbk.write_bytes(f"prompt,response\n{QUESTION},{ANSWER}\n".encode("gbk"))
    with pytest.raises(UserError, match="not UTF-8 text") as error:
        load_conversations([str(gbk)])
    assert error.value.path == str(gbk) and error.value.fix


def test_a_folder_is_read_for_its_data_files_once_each(tmp_path, caplog):
    """generate_rejected.py's progress file and the toolkit's other records beside the pairs are no data (the
    default chain reads data/dpo/), and one data set saved as parquet and JSON lines side by side is read once."""
    pairs = [{"prompt": f"问题{i}？", "chosen": "好的回答。", "rejected": "不好的回答。"} for i in range(3)]
    folder = tmp_path / "dpo"
    folder.mkdir()
    write_jsonl(folder / "rejected.jsonl", pairs)
    (folder / "rejected.jsonl.progress.json").write_text(json.dumps({"next_index": 3, "written": 3}))
    (folder / "config.yaml").write_text("output: data/dpo/rejected.jsonl\n")
    (folder / "stats.json").write_text("{}")
    assert [row["chosen"] for row in load_preferences([str(folder)])] == ["好的回答。"] * 3

    sft = tmp_path / "sft"
    sft.mkdir()
    rows = [{"prompt": f"问题{i}？", "response": f"回答{i}。"} for i in range(4)]
    write_jsonl(sft / "train.jsonl", rows)
    pq.write_table(pa.Table.from_pylist(rows), sft / "train.parquet")
    with caplog.at_level("WARNING"):
        assert len(load_conversations([str(sft)])) == 4
    assert "train.parquet and train.jsonl hold one data set in two formats" in caplog.text
    assert len(load_conversations([str(sft / "train.jsonl"), str(sft / "train.parquet")])) == 8  # named: as given
