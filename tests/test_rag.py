"""rag_chat.py and its retriever: BM25 over jieba words ranks the passage of our own example documents
(data/demo/rag_docs) that answers a question first; the passages go into the system turn of a conversation sent
to serve.py's OpenAI API on loopback, and the answer is the served model's reply to exactly that conversation;
documents without text, a server that is away and a prompt over the model's context are one clear error each."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
from conftest import REPO

import rag_chat
from utils.data.retrieval import STOP_WORDS, Retriever, split_passages, words
from utils.errors import UserError

DOCS = REPO / "data" / "demo" / "rag_docs"


def test_passages_are_cut_at_sentence_ends_and_keep_every_character():
    text = "长城是古代的防御工程。它东起山海关，西至嘉峪关！全长两万多公里？\n烽火台传递军情。" * 3
    pieces = split_passages(text, 40)
    assert all(len(piece) <= 40 for piece in pieces)
    assert "".join(pieces).replace("\n", "") == text.replace("\n", "")  # only line breaks at the cuts go
    assert all(piece[-1] in "。！？" for piece in pieces)  # each ends where a sentence does
    unbroken = "无标点" * 30  # no sentence end: cut every 40 characters
    assert split_passages(unbroken, 40) == [unbroken[:40], unbroken[40:80], unbroken[80:]]


def test_question_words_and_punctuation_are_not_words():
    assert words("长城有多长？") == ["长城", "多长"]
    assert words("Python 3 是什么？") == ["python", "3"]
    assert {"的", "是", "什么", "多少"} <= STOP_WORDS


@pytest.mark.parametrize("question, first", [
    ("山海关为什么叫天下第一关？", "great_wall.txt:3"),
    ("泡绿茶用多少度的水？", "tea.txt:5"),
    ("大熊猫吃什么？", "giant_panda.txt:3"),
    ("京沪高铁有多长？", "high_speed_rail.txt:3"),
    ("熊猫幼崽刚出生时多重？", "giant_panda.txt:5"),
])
def test_bm25_ranks_the_passage_that_answers_first(question, first):
    retriever = Retriever.from_paths([str(DOCS)])
    assert len(retriever.passages) == 12  # four documents of three paragraphs, each under 200 characters
    found = retriever.search(question, 3)
    assert found[0][0].where == str(DOCS / first)
    assert [score for _, score in found] == sorted((score for _, score in found), reverse=True)
    assert retriever.search("量子计算机", 3) == []  # no word in common: nothing, rather than noise


def test_documents_without_text_are_refused(tmp_path):
    with pytest.raises(UserError, match="no such file or directory") as missing:
        Retriever.from_paths([str(tmp_path / "absent")])
    assert missing.value.field == "docs"
    (tmp_path / "blank.txt").write_text("\n\n  \n", encoding="utf-8")
    with pytest.raises(UserError, match="the documents hold no text"):
        Retriever.from_paths([str(tmp_path)])
    (tmp_path / "blank.txt").write_bytes("长城".encode("gbk"))
    with pytest.raises(UserError, match="UTF-8") as not_utf8:
        Retriever.from_paths([str(tmp_path)])
    assert not_utf8.value.path == str(tmp_path / "blank.txt")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_a_server_that_is_away_is_one_error():
    away = f"http://127.0.0.1:{free_port()}/v1"  # bound a moment ago and closed: nothing listens there
    with pytest.raises(UserError, match="no OpenAI-compatible server answers there") as err:
        rag_chat.main(["--config", "config/rag.yaml", "--docs", str(DOCS), "--base_url", away, "--question", "茶"])
    assert err.value.field == "base_url" and "serve.py" in err.value.fix


SMALL = ["--max_passage_chars", "40", "--max_context_chars", "40", "--top_k", "1", "--max_tokens", "8"]


@pytest.mark.slow
def test_the_answer_is_the_served_reply_to_the_retrieved_passages(served_tiny_llama, capsys):
    from model.inference.service import DecodingOptions
    from model.inference.streaming import generate_reply

    url, model, tokenizer = served_tiny_llama
    question = "山海关为什么叫天下第一关？"
    (answer,) = rag_chat.main(["--config", "config/rag.yaml", "--docs", str(DOCS), "--base_url", url,
                               "--question", question, *SMALL])
    passage = answer.passages[0]
    assert passage.where == f"{DOCS / 'great_wall.txt'}:3" and passage.text.startswith("山海关被称为")
    assert answer.messages == [{"role": "system", "content": rag_chat.SYSTEM.format(passages=f"[1] {passage.text}")},
                               {"role": "user", "content": question}]
    # greedy: the server's reply is the model's reply to this conversation, generated here in-process
    ids = tokenizer.apply_chat_template(answer.messages, add_generation_prompt=True, return_dict=False)
    config = DecodingOptions(max_new_tokens=8).generation_config(model.generation_config)
    assert answer.text == generate_reply(model, tokenizer, ids, config).text
    assert capsys.readouterr().out.endswith(f"  [1] {passage.where}\n")


@pytest.mark.slow
def test_a_prompt_over_the_context_is_refused_with_the_fix(served_tiny_llama):
    url, _, _ = served_tiny_llama
    recipe = ["--config", "config/rag.yaml", "--docs", str(DOCS), "--base_url", url, "--question", "长城"]
    # the recipe's 256 new tokens leave the tiny model's 256-token context no room for a prompt
    with pytest.raises(UserError, match="max_tokens must be between 1 and 248") as err:
        rag_chat.main(recipe)
    assert err.value.field == "max_tokens"
    # 600 characters of passages (the recipe's default) do not fit in it either
    with pytest.raises(UserError, match="maximum context length is 256 tokens") as err:
        rag_chat.main([*recipe, "--max_tokens", "8"])
    assert err.value.field == "max_context_chars" and "--max_context_chars" in err.value.fix


@pytest.mark.slow
def test_the_command_answers_questions_read_from_its_input(served_tiny_llama):
    url, _, _ = served_tiny_llama
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "rag_chat.py", "--docs", str(DOCS), "--base_url", url, *SMALL],
                          input="泡绿茶用多少度的水？\n\n复兴号最快能跑多快？\n", cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    sources = [line.strip() for line in done.stdout.splitlines() if line.startswith("  [")]
    assert sources == [f"[1] {DOCS / 'tea.txt'}:5", f"[1] {DOCS / 'high_speed_rail.txt'}:3"]
    away = subprocess.run([sys.executable, "rag_chat.py", "--docs", str(DOCS), "--base_url",
                           f"http://127.0.0.1:{free_port()}/v1", "--question", "茶"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert away.returncode == 2 and "no OpenAI-compatible server answers there" in away.stderr
