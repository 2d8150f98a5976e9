"""Corpus preparation on real zhwiki data and on planted duplicates; bad input is refused clearly."""

from __future__ import annotations

import bz2
import errno
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest
from conftest import REPO, digest, make_documents, run_script, shared_path

import prepare_data
from utils.data.text import to_simplified
from utils.errors import UserError
from utils.io import atomic_output_dir, honour_umask, remove_stale_temporaries

MARKUP = re.compile(r"\[\[|\]\]|\{\{|\}\}|<ref|</?ref|&lt;|&gt;|&amp;|-\{|\}-|'''|<!--|（）")


def read_corpus(directory):
    rows = []
    for path in sorted(directory.glob("*-of-*.parquet")):
        rows.extend(pq.read_table(path).to_pylist())
    return rows


def prepare(*args, output):
    return prepare_data.main(["--config", "none", "--output_dir", str(output), *map(str, args)])


@pytest.fixture(scope="module")
def zhwiki_xml():
    return shared_path("zhwiki_xml/zhwiki-test-pages.xml")


@pytest.fixture(scope="module")
def wiki_corpus(zhwiki_xml, tmp_path_factory):
    out = tmp_path_factory.mktemp("wiki") / "corpus"
    report = prepare("--input", zhwiki_xml, "--num_proc", "2", output=out)
    return out, report


def test_real_dump_gives_23_clean_simplified_articles(wiki_corpus):
    out, report = wiki_corpus
    rows = read_corpus(out)
    assert len(rows) == 23 == report["documents"]
    assert {r["source"] for r in rows} == {"zhwiki-test-pages.xml"}
    assert all(r["title"] and r["id"] for r in rows)
    for row in rows:
        assert to_simplified(row["text"]) == row["text"], f"traditional characters left in {row['title']}"
        assert not MARKUP.search(row["text"]), f"markup left in {row['title']}: {MARKUP.search(row['text'])}"
    titles = {r["title"] for r in rows}
    assert {"数学", "哲学", "文学", "天文学"} <= titles  # titles are converted too
    stats = json.loads((out / "stats.json").read_text())
    assert stats["steps"]["extract"]["docs_in"] == 23 and stats["steps"]["dedup"]["docs_out"] == 23
    assert (out / "config.yaml").exists()
    assert any(s["split"] == "validation" for s in stats["shards"])


def test_bz2_dump_gives_the_same_corpus(zhwiki_xml, wiki_corpus, tmp_path):
    compressed = tmp_path / "zhwiki-test-pages.xml.bz2"
    compressed.write_bytes(bz2.compress(zhwiki_xml.read_bytes()))
    out = tmp_path / "corpus"
    prepare("--input", compressed, "--num_proc", "1", output=out)
    plain = sorted((r["id"], r["text"]) for r in read_corpus(wiki_corpus[0]))
    assert sorted((r["id"], r["text"]) for r in read_corpus(out)) == plain


def test_wikiextractor_outputs_and_other_formats_merge(tmp_path):
    jsonl = shared_path("zhwiki_text/jastfkjg_wiki_00.jsonl")
    doc = shared_path("zhwiki_text/xxcqc250_wiki_00.txt")
    extracted = tmp_path / "extracted" / "AA"
    extracted.mkdir(parents=True)
    shutil.copy(doc, extracted / "wiki_00")  # wikiextractor's own file naming, no extension
    texts = make_documents(6, seed=3)
    txt = tmp_path / "mine.txt"
    txt.write_text("\n\n".join(texts[:3]) + "\n", encoding="utf-8")
    pq_path = tmp_path / "mine.parquet"
    import pyarrow as pa

    pq.write_table(pa.table({"content": texts[3:]}), pq_path)
    out = tmp_path / "corpus"
    report = prepare("--input", jsonl, tmp_path / "extracted", txt, "--dedup", "false", "--min_chars", "10",
                     output=out)
    sources = {r["source"] for r in read_corpus(out)}
    assert sources == {"jastfkjg_wiki_00.jsonl", "wiki_00", "mine.txt"}
    assert report["steps"]["read"]["docs_out"] == 64 + 16 + 3
    with pytest.raises(UserError, match="missing text column"):
        prepare("--input", pq_path, output=tmp_path / "c2")
    prepare("--input", pq_path, "--text_column", "content", "--min_chars", "10", "--dedup", "false",
            output=tmp_path / "c3")
    assert len(read_corpus(tmp_path / "c3")) == 3


def test_dedup_removes_near_duplicates_and_keeps_reordered_text(tmp_path):
    rng = random.Random(7)
    base = json.loads(shared_path("zhwiki_text/jastfkjg_wiki_00.jsonl").read_text(encoding="utf-8")
                      .splitlines()[5])["text"][:1500]
    near = list(base)
    for i in rng.sample(range(len(near)), 6):
        near[i] = "㐀"
    heavy = list(base)  # 3% of the characters edited: missed by the 5-gram / 0.8 defaults before issue 13
    for i in sorted(rng.sample(range(len(heavy)), 45), reverse=True):
        if i % 3:
            heavy[i] = "㐁"
        else:
            del heavy[i]
    chars = list(base)
    rng.shuffle(chars)  # the same multiset of characters, in another order: a different document
    distinct = [json.loads(line)["text"][:1500] for line in
                shared_path("zhwiki_text/jastfkjg_wiki_00.jsonl").read_text(encoding="utf-8").splitlines()[10:14]]
    docs = [base, "".join(near), "".join(chars), *distinct, base.replace("。", "。 "), "".join(heavy)]
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in docs), encoding="utf-8")
    out = tmp_path / "corpus"
    report = prepare("--input", path, "--min_cjk_ratio", "0", "--validation_ratio", "0", output=out)
    kept = [r["text"] for r in read_corpus(out)]
    assert report["dropped"]["near_duplicate"] == 3  # the two edited copies and the re-spaced copy
    assert len(kept) == 2 + len(distinct)  # base, its character shuffle, the distinct documents
    assert not any("㐀" in text or "㐁" in text for text in kept)


def test_batched_signatures_equal_single_ones_and_estimate_jaccard():
    from utils.data.dedup import minhash_signature, minhash_signatures
    from utils.data.text import character_ngrams

    text = json.loads(shared_path("zhwiki_text/jastfkjg_wiki_00.jsonl").read_text(encoding="utf-8")
                      .splitlines()[5])["text"][:800]
    edited = text[:400] + "㐀" * 8 + text[408:]
    texts = [text, edited, "短", "", text]
    batch = minhash_signatures(texts, 3, 128, 42)
    assert batch.shape == (5, 128) and batch.dtype == "uint32"
    for row, one in zip(batch, texts):
        assert (row == minhash_signature(one, 3, 128, 42)).all()
    assert (batch[0] == batch[4]).all() and not (batch[2] == batch[3]).all()
    shingles = [set(character_ngrams(t, 3)) for t in (text, edited)]
    jaccard = len(shingles[0] & shingles[1]) / len(shingles[0] | shingles[1])
    assert abs((batch[0] == batch[1]).mean() - jaccard) < 0.1
    assert minhash_signatures([], 3, 128, 42).shape == (0, 128)


POEMS = [{"title": "静夜思", "author": "李白", "paragraphs": ["床前明月光，疑是地上霜。", "举头望明月，低头思故乡。"]},
         {"title": "春晓", "author": "孟浩然", "paragraphs": ["春眠不觉晓，处处闻啼鸟。", "夜来风雨声，花落知多少。"]}]


def shaped(*args, output):
    """prepare() keeping every document as it is (no t2s, filter, dedup or validation split)."""
    prepare(*args, "--opencc_config", "none", "--min_chars", "1", "--min_cjk_ratio", "0", "--dedup", "false",
            "--validation_ratio", "0", "--num_proc", "1", output=output)
    return sorted(r["text"] for r in read_corpus(output))


def test_json_array_list_column_several_columns_and_nested_fields(tmp_path):
    """WuDao (one JSON array of objects), chinese-poetry (a list of lines, with its title), nested fields
    in JSON and parquet, several columns from the command line or as a YAML list."""
    import pyarrow as pa

    wudao = _write(tmp_path / "part-2021.json", json.dumps(
        [{"id": 1, "title": "标题一", "content": "第一篇正文。"}, {"id": 2, "title": "标题二", "content": "第二篇。"}],
        ensure_ascii=False, indent=4))
    assert shaped("--input", wudao, "--text_column", "content", output=tmp_path / "a") == [
        "第一篇正文。", "第二篇。"]
    assert shaped("--input", wudao, "--text_column", "title,content", output=tmp_path / "b") == [
        "标题一\n第一篇正文。", "标题二\n第二篇。"]
    poems = _write(tmp_path / "poet.tang.0.json", json.dumps(POEMS, ensure_ascii=False))
    expected = ["\n".join([p["title"], *p["paragraphs"]]) for p in sorted(POEMS, key=lambda p: p["title"])]
    assert shaped("--input", poems, "--text_column", "title", "paragraphs", output=tmp_path / "c") == expected
    recipe = _write(tmp_path / "poems.yaml", f"input: [{poems}]\ntext_column:\n  - title\n  - paragraphs\n")
    prepare_data.main(["--config", str(recipe), "--output_dir", str(tmp_path / "d"), "--opencc_config", "none",
                       "--min_chars", "1", "--dedup", "false", "--validation_ratio", "0"])
    assert sorted(r["text"] for r in read_corpus(tmp_path / "d")) == expected
    assert sorted(r["title"] for r in read_corpus(tmp_path / "d")) == ["春晓", "静夜思"]
    nested = _write(tmp_path / "nested.jsonl", "".join(
        json.dumps({"meta": {"lang": "zh"}, "data": {"text": t}}, ensure_ascii=False) + "\n" for t in "甲乙"))
    assert shaped("--input", nested, "--text_column", "data.text", output=tmp_path / "e") == ["乙", "甲"]
    pq.write_table(pa.table({"paragraphs": [p["paragraphs"] for p in POEMS],  # a list and a struct column
                             "data": [{"text": p["title"]} for p in POEMS]}), tmp_path / "poems.parquet")
    assert shaped("--input", tmp_path / "poems.parquet", "--text_column", "data.text,paragraphs",
                  output=tmp_path / "f") == expected


def test_the_advice_for_a_list_of_objects_works(tmp_path):
    """A column holding a list of objects is refused with the name of a field inside them, and that name reads
    each object's field as the lines of the document (in JSON and in parquet, a list of structs)."""
    import pyarrow as pa

    rows = [{"title": p["title"], "paragraphs": [{"line": line} for line in p["paragraphs"]]} for p in POEMS]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "poems.parquet")
    for path in (_write(tmp_path / "poems.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)),
                 tmp_path / "poems.parquet"):
        with pytest.raises(UserError, match="name a field inside it as paragraphs.line"):
            shaped("--input", path, "--text_column", "paragraphs", output=tmp_path / "refused")
        assert not (tmp_path / "refused").exists()
        assert shaped("--input", path, "--text_column", "title,paragraphs.line", output=tmp_path / path.suffix) == [
            "\n".join([p["title"], *p["paragraphs"]]) for p in sorted(POEMS, key=lambda p: p["title"])]


BAD_SHAPES = {  # file content, --text_column, what the message says, the line, the field
    "number": ('[{"text": "好"}, {"text": 3}]', "text", "row 1: the text column holds a number", 1, "text"),
    "list_of_objects": ('{"paragraphs": [{"line": "好"}]}\n', "paragraphs",
                        "a list containing an object (with line; name a field inside it as paragraphs.line)",
                        1, "paragraphs"),
    "list_of_objects_some_without": ('{"paragraphs": [{"line": "好"}, {"text": "坏"}]}\n', "paragraphs.line",
                                     "missing text column", 1, "paragraphs.line"),
    "object": ('\n{"data": {"text": "好"}}\n', "data",
               "holds an object (with text; name a field inside it as data.text)", 2, "data"),
    "missing_one_of_several": ('[\n{"title": "题", "paragraphs": ["好"]},\n{"paragraphs": ["好"]}\n]',
                               "title,paragraphs", "row 1: missing text column; the row has: paragraphs",
                               3, "title"),
    "missing_nested": ('{"data": {"txt": "好"}}\n', "data.text", "missing text column", 1, "data.text"),
    "not_an_object": ('[\n"好",\n"坏"]', "text", "row 0: a row is not a JSON object", 2, None),
    "junk_between_rows": ('[{"text": "好"}\n {"text": "坏"}]', "text", "expecting ',' or ']'", 2, None),
    "truncated_array": ('[{"text": "好"},\n{"text": "坏"', "text", "not valid JSON", 2, None),
    "after_the_array": ('[{"text": "好"}]\n[{"text": "坏"}]', "text", "extra data after the array", 2, None),
}


@pytest.mark.parametrize("case", sorted(BAD_SHAPES))
def test_unusable_shapes_are_refused_with_file_line_and_field(case, tmp_path):
    content, column, message, line, field = BAD_SHAPES[case]
    path = _write(tmp_path / "rows.json", content)
    with pytest.raises(UserError, match=re.escape(message)) as err:
        shaped("--input", path, "--text_column", column, output=tmp_path / "out")
    assert (err.value.path, err.value.line, err.value.field) == (str(path), line, field)
    assert err.value.fix


def test_decontamination_removes_real_ceval_and_cmmlu_questions_and_keeps_common_words(tmp_path):
    """Planted documents quoting a real C-Eval question (in a paragraph of a real article) and a real CMMLU
    question (in traditional characters, spaced out) are removed and counted per evaluation set; a document
    made of the same questions' words in pieces shorter than the n-gram is kept, as are real articles."""
    import csv

    ceval, cmmlu = shared_path("ceval"), shared_path("cmmlu")
    with open(ceval / "val" / "modern_chinese_history_val.csv", encoding="utf-8") as handle:
        ceval_question = next(row["question"] for row in csv.DictReader(handle) if len(row["question"]) > 30)
    with open(cmmlu / "dev" / "chinese_history.csv", encoding="utf-8") as handle:
        cmmlu_question = next(row["Question"] for row in csv.DictReader(handle) if len(row["Question"]) > 30)
    articles = [json.loads(line)["text"][:800] for line in
                shared_path("zhwiki_text/jastfkjg_wiki_00.jsonl").read_text(encoding="utf-8").splitlines()[10:14]]
    pieces = [q[i:i + 6] for q in (ceval_question, cmmlu_question) for i in range(0, len(q) - 6, 6)]
    docs = [articles[0] + ceval_question + articles[1][:200],
            to_traditional(" ".join(cmmlu_question)) + "\n" + articles[2][:300],
            "，据说".join(pieces) + "。" + articles[3][:100], *articles]
    path = _write(tmp_path / "docs.jsonl", "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in docs))
    report = prepare("--input", path, "--decontaminate", ceval, cmmlu, "--validation_ratio", "0",
                     output=tmp_path / "out")
    kept = [r["text"] for r in read_corpus(tmp_path / "out")]
    assert report["decontaminated"] == {"ceval": 1, "cmmlu": 1} and report["dropped"]["contaminated"] == 2
    assert len(kept) == 1 + len(articles) and report["steps"]["decontam"]["docs_out"] == len(kept)
    assert not any(ceval_question[:20] in text or to_simplified(cmmlu_question[:20]) in text for text in kept)
    not_questions = _write(tmp_path / "eval.csv", "id,text\n1,一个问题\n")
    with pytest.raises(UserError, match="no question column; the row has: id, text") as err:
        prepare("--input", path, "--decontaminate", not_questions, output=tmp_path / "out2")
    assert (err.value.path, err.value.line, err.value.field) == (str(not_questions), 2, "decontaminate")


@pytest.mark.slow  # runs a script in a process of its own
def test_an_evaluation_set_that_can_match_nothing_is_refused(tmp_path):
    """An empty --decontaminate folder was blamed on --input, and one without questions only logged: each is
    one error naming the folder and --decontaminate, and nothing is written."""
    corpus = _write(tmp_path / "docs.jsonl", json.dumps({"text": "春天的早晨，河边的柳树发出了嫩绿的新芽。"},
                                                        ensure_ascii=False) + "\n")
    empty, headers, short = tmp_path / "empty", tmp_path / "headers", tmp_path / "short"
    empty.mkdir()
    headers.mkdir()
    _write(headers / "law_val.csv", "id,question,A,B,C,D,answer\n")
    short.mkdir()
    _write(short / "law_val.csv", "id,question,A,B,C,D,answer\n0,何为法,甲,乙,丙,丁,A\n")
    for folder, message in ((empty, "holds no .csv, .jsonl, .json or .parquet file"), (headers, "holds no questions"),
                            (short, "none of its 5 question and option texts has 13 characters")):
        result = run_script("prepare_data.py", "--config", "none", "--input", str(corpus), "--output_dir",
                            str(tmp_path / "out"), "--decontaminate", str(folder), check=False)
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        assert f"error: {folder}, field 'decontaminate': " in result.stderr and message in result.stderr
        assert not (tmp_path / "out").exists()


def test_decontamination_finds_a_shared_ngram_at_every_offset_and_nothing_shorter(tmp_path):
    """The probe looks at every 4th window only: a shared 13-character run must still be found wherever it
    starts, with or without spaces inside, and a 12-character one never."""
    from utils.data.decontaminate import Decontaminator

    question = "天文台的望远镜观测到一颗新的彗星正在接近太阳系"  # our own question text, 23 characters
    path = _write(tmp_path / "eval.jsonl", json.dumps({"question": question}, ensure_ascii=False) + "\n")
    check = Decontaminator.from_paths([str(path)], 13, "t2s")
    filler = "山川河流湖泊海洋森林草原沙漠"
    for offset in range(9):
        for start in (0, 5, 10):
            shared = question[start:start + 13]
            assert check.matches(filler[:offset] + shared + filler) == ["eval"], (offset, start)
            assert check.matches(filler[:offset] + " ".join(shared) + filler) == ["eval"], (offset, start)
            assert check.matches(filler[:offset] + shared[:12] + filler + shared[1:]) == [], (offset, start)
    assert check.matches(question[:12]) == [] and check.matches("") == []


def to_traditional(text):
    import opencc

    return opencc.OpenCC("s2t").convert(text)


BAD_INPUTS = {
    "missing": (lambda d: d / "nope.xml.bz2", "no such file"),
    "not_a_dump": (lambda d: _write(d / "page.xml", "<html><body>hello</body></html>\n"), "not a MediaWiki"),
    "bad_jsonl": (lambda d: _write(d / "x.jsonl", '{"text": "好的中文句子"}\n{"text": oops}\n'), "line 2"),
    "no_column": (lambda d: _write(d / "x.jsonl", '{"content": "好的中文句子"}\n'), "field 'text'"),
    "empty_result": (lambda d: _write(d / "x.jsonl", '{"text": "hi"}\n'), "no document is left"),
}


def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_refused_and_existing_output_survives(case, tmp_path):
    make, expected = BAD_INPUTS[case]
    bad = make(tmp_path)
    out = tmp_path / "corpus"
    out.mkdir()
    (out / "keep.txt").write_text("previous run")
    with pytest.raises(UserError, match=expected) as err:
        prepare("--input", bad, "--overwrite_output_dir", "true", "--num_proc", "1", output=out)
    assert str(bad) in str(err.value) and "fix:" in str(err.value)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".corpus")], "temporary output left behind"


@pytest.mark.slow  # runs a script in a process of its own
def test_truncated_bz2_fails_from_the_command_line(zhwiki_xml, tmp_path):
    data = bz2.compress(zhwiki_xml.read_bytes())
    truncated = tmp_path / "zhwiki.xml.bz2"
    truncated.write_bytes(data[: len(data) // 2])
    result = run_script("prepare_data.py", "--config", "none", "--input", str(truncated),
                        "--output_dir", str(tmp_path / "out"), check=False)
    assert result.returncode == 2
    assert "truncated" in result.stderr and str(truncated) in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_truncated_plain_xml_is_refused(zhwiki_xml, tmp_path):
    cut = tmp_path / "cut.xml"
    cut.write_text(zhwiki_xml.read_text(encoding="utf-8")[:300_000], encoding="utf-8")
    with pytest.raises(UserError, match="ends early"):
        prepare("--input", cut, output=tmp_path / "out")


def test_the_same_command_again_does_nothing_and_another_is_refused(wiki_corpus, zhwiki_xml, capfd):
    out, report = wiki_corpus
    made = digest(out)
    assert prepare("--input", zhwiki_xml, "--num_proc", "2", output=out) == report
    assert "nothing to do" in capfd.readouterr().err and digest(out) == made
    with pytest.raises(UserError, match="overwrite_output_dir"):
        prepare("--input", zhwiki_xml, "--num_proc", "2", "--min_chars", "7", output=out)
    assert digest(out) == made


def test_outputs_have_the_modes_of_a_plain_write(wiki_corpus):
    out = wiki_corpus[0]
    mask = os.umask(0)
    os.umask(mask)
    modes = {p.name: p.stat().st_mode & 0o777 for p in [out, *out.rglob("*")]}
    assert modes == {p.name: (0o777 if p.is_dir() else 0o666) & ~mask for p in [out, *out.rglob("*")]}


def test_private_files_get_plain_modes(tmp_path):
    """safetensors writes `model.safetensors` 0600 (the toolkit's model files went out so); `honour_umask`,
    run on every output before it is renamed into place, gives it what any other file gets."""
    import torch
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, tmp_path / "model.safetensors")
    assert tmp_path.joinpath("model.safetensors").stat().st_mode & 0o777 == 0o600
    honour_umask(tmp_path)
    mask = os.umask(0)
    os.umask(mask)
    assert tmp_path.joinpath("model.safetensors").stat().st_mode & 0o777 == 0o666 & ~mask


def test_full_disk_while_writing_names_the_output_dir(tmp_path):
    out = tmp_path / "corpus"
    with pytest.raises(UserError, match="No space left on device") as err, atomic_output_dir(out):
        raise OSError(errno.ENOSPC, "No space left on device")  # what a write() on a full disk raises
    assert f"{out}, field 'output_dir'" in str(err.value) and "free some disk space" in str(err.value)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow  # runs a script in a process of its own
def test_killed_run_leaves_a_temporary_that_the_next_run_removes(tmp_path):
    """`kill -9` of prepare_data.py mid-run leaves its hidden temporary output folder; the next run
    removes it (its owner is dead) and writes the complete corpus."""
    corpus = tmp_path / "docs.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n"
                              for t in make_documents(5000, seed=5)), encoding="utf-8")
    out = tmp_path / "corpus"
    args = ["--config", "none", "--input", str(corpus), "--num_proc", "1", "--dedup", "false"]
    process = subprocess.Popen([sys.executable, "prepare_data.py", *args, "--output_dir", str(out)], cwd=REPO,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None and not list(tmp_path.glob(".corpus.*.tmp/*")):
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL, "prepare_data.py ended before it could be killed"
    left = list(tmp_path.glob(".corpus.*.tmp"))
    assert len(left) == 1 and f"-{process.pid}." in left[0].name and not out.exists()
    report = prepare(*args[2:], output=out)
    assert not left[0].exists() and [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    assert len(read_corpus(out)) == report["documents"] == 5000


@pytest.mark.slow  # runs a script in a process of its own
def test_only_temporaries_of_dead_owners_on_this_host_are_removed(tmp_path):
    out = tmp_path / "corpus"
    holder = subprocess.Popen(  # a live run, in the middle of writing `out`
        [sys.executable, "-c", "import sys, time\nfrom utils.io import atomic_output_dir\n"
         f"with atomic_output_dir({str(out)!r}) as tmp:\n    print(tmp.name, flush=True)\n    time.sleep(60)"],
        cwd=REPO, stdout=subprocess.PIPE, text=True)
    live = tmp_path / holder.stdout.readline().strip()
    remove_stale_temporaries(out)
    assert live.is_dir(), "a live run's temporary was removed"
    holder.kill()
    holder.wait()
    # the same owner, killed while swapping: the old output moved aside, the new one not yet in place
    old = live.with_name(live.name.rsplit(".", 2)[0] + ".old")
    old.mkdir()
    (old / "stats.json").write_text("{}")
    other_host = tmp_path / re.sub(r"\.[^.]+-(\d+)\.", r".elsewhere-\1.", live.name, count=1)
    other_host.mkdir()
    remove_stale_temporaries(out)
    assert not live.exists() and not old.exists() and other_host.is_dir()
    assert [p.name for p in out.iterdir()] == ["stats.json"]  # what was there before is back
