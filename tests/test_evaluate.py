"""Evaluation: C-Eval / CMMLU accuracy is exact on crafted models whose letter logits are known, batching
does not change scores, the shots that really ran are reported and a k-shot run without dev examples is
refused, bits per character equals a hand computation and is taken on OpenCC-converted text as the corpus
stage converts it, BLEU / ROUGE-L / triple F1 on hand-checked cases, training plots are valid PNGs, bad input
is refused clearly."""

from __future__ import annotations

import csv
import json
import math
import shutil
import struct

import pytest
import torch
import torch.nn.functional as F
from conftest import REPO, SENTENCES, run_script, shared_path
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

import eval_model
from model.evaluation.benchmarks import (
    LETTERS,
    answer_questions,
    choice_accuracy,
    choice_token_ids,
    letter_logits,
    load_benchmark,
    question_prompt,
    read_choice_csv,
    shots_for,
)
from model.evaluation.metrics import (
    TRADITIONAL_SHARE_WARNING,
    _windows,
    bits_per_character,
    parse_triples,
    text_metrics,
    triple_scores,
)
from model.evaluation.plots import find_trainer_state, plot_training
from model.evaluation.report import results_markdown
from model.inference.generation import load_for_inference
from utils.data.text import to_simplified
from utils.errors import UserError

pytestmark = pytest.mark.slow

CEVAL_SUBJECTS = ["computer_network", "high_school_physics", "modern_chinese_history"]
CMMLU_SUBJECTS = ["agronomy", "ancient_chinese", "high_school_physics"]


def craft_constant_answer(source, target, letter: str):
    """Save a copy of the tiny model at `source` whose reply always starts with `letter`, whatever the question.

    The layers that mix information between positions are zeroed (Llama: attention and MLP outputs, so the
    last position only sees its own token, always the "\\n" ending the generation prompt; T5: the decoder's
    cross-attention output, so the first decoder step only sees the start token). The final hidden state h
    at the reply position is then one constant vector; the LM-head rows of the four letters are set to
    +-20 h/|h|, so the logit of `letter` is 20|h| and the others' -20|h|.
    """
    config = json.loads((source / "config.json").read_text())
    seq2seq = config.get("is_encoder_decoder", False)
    model = (AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM).from_pretrained(source)
    tokenizer = AutoTokenizer.from_pretrained(source)
    with torch.no_grad():
        if seq2seq:
            for block in model.decoder.block:
                block.layer[1].EncDecAttention.o.weight.zero_()
        else:
            for layer in model.model.layers:
                layer.self_attn.o_proj.weight.zero_()
                layer.mlp.down_proj.weight.zero_()
        captured = []
        hook = model.lm_head.register_forward_hook(lambda module, inputs, output: captured.append(inputs[0]))
        ids = tokenizer.apply_chat_template([{"role": "user", "content": "你好"}], add_generation_prompt=True,
                                            tokenize=True, return_dict=False, return_tensors=None)
        ids = torch.tensor([ids])
        if seq2seq:
            model(input_ids=ids, decoder_input_ids=torch.tensor([[model.config.decoder_start_token_id]]))
        else:
            model(input_ids=ids)
        hook.remove()
        hidden = captured[0][0, -1]
        direction = hidden / hidden.norm()
        for candidate, token in zip(LETTERS, choice_token_ids(tokenizer)):
            model.lm_head.weight[token] = (20.0 if candidate == letter else -20.0) * direction
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


def answers_from_csv(folder, subjects, split, name_pattern):
    """{subject: [answer letters]} read with the csv module straight from the official files."""
    result = {}
    for subject in subjects:
        with open(folder / split / name_pattern.format(subject=subject), encoding="utf-8", newline="") as handle:
            rows = list(csv.DictReader(handle))
        result[subject] = [(row.get("answer") or row.get("Answer")).strip() for row in rows]
    return result


@pytest.fixture(scope="module")
def crafted(tiny_llama, tiny_t5, tmp_path_factory):
    root = tmp_path_factory.mktemp("crafted")
    return {"llama_C": craft_constant_answer(tiny_llama, root / "llama_C", "C"),
            "t5_A": craft_constant_answer(tiny_t5, root / "t5_A", "A")}


def test_ceval_accuracy_is_exact_on_a_model_that_always_answers_c(crafted, tmp_path):
    ceval = shared_path("ceval")
    results = eval_model.main(["--config", "none", "--model_name_or_path", str(crafted["llama_C"]), "--task", "ceval",
                             "--ceval_data", str(ceval), "--ceval_subjects", *CEVAL_SUBJECTS, "--num_shots", "2",
                             "--max_length", "100000",  # the tiny context would leave room for no example
                             "--batch_size", "5", "--output_dir", str(tmp_path)])
    answers = answers_from_csv(ceval, CEVAL_SUBJECTS, "val", "{subject}_val.csv")
    mapping = json.loads((ceval / "subject_mapping.json").read_text(encoding="utf-8"))
    result = results["ceval"]
    for subject, letters in answers.items():
        assert result["subjects"][subject]["total"] == len(letters)
        assert result["subjects"][subject]["accuracy"] == pytest.approx(letters.count("C") / len(letters))
        assert result["subjects"][subject]["categories"] == [mapping[subject][2]]
    every = [a for letters in answers.values() for a in letters]
    assert result["accuracy"] == pytest.approx(every.count("C") / len(every))
    assert 0 < result["accuracy"] < 1 and result["chance"] == 0.25
    for category in {mapping[s][2] for s in CEVAL_SUBJECTS}:
        in_category = [a for s in CEVAL_SUBJECTS if mapping[s][2] == category for a in answers[s]]
        assert result["categories"][category]["accuracy"] == pytest.approx(in_category.count("C") / len(in_category))
    saved = json.loads((tmp_path / "eval_results.json").read_text())
    assert saved["results"]["ceval"]["accuracy"] == result["accuracy"]
    assert (saved["results"]["ceval"]["shots_asked"], result["shots_min"], result["shots_max"]) == (2, 2, 2)
    table = (tmp_path / "eval_results.md").read_text()
    assert "| **overall** |" in table and "### ceval (2-shot, split val)" in table


def test_cmmlu_accuracy_is_exact_on_a_t5_that_always_answers_a(crafted):
    cmmlu = shared_path("cmmlu")
    model, tokenizer = load_for_inference(str(crafted["t5_A"]), device="cpu")
    subjects = load_benchmark(str(cmmlu), "dev", CMMLU_SUBJECTS, task="cmmlu")
    predictions, shots = answer_questions(model, tokenizer, subjects, num_shots=3, batch_size=4, progress=False)
    assert all(counts == [3] * len(s.questions) for s, counts in zip(subjects, shots.values()))
    answers = answers_from_csv(cmmlu, CMMLU_SUBJECTS, "dev", "{subject}.csv")
    for subject in subjects:
        assert predictions[subject.name] == ["A"] * len(answers[subject.name])
        assert [q.answer for q in subject.questions] == answers[subject.name]
        # dev is also the shot split: a question is never its own example
        assert all(q not in shots_for(q, subject, 5) for q in subject.questions)
    every = [a for letters in answers.values() for a in letters]
    assert choice_accuracy(subjects, predictions, shots)["accuracy"] == pytest.approx(every.count("A") / len(every))
    # 5 shots asked of a 5-question dev split that is also the evaluated split: 4 ran, and the result says so
    _, five = answer_questions(model, tokenizer, subjects, num_shots=5, batch_size=8, progress=False)
    result = choice_accuracy(subjects, predictions, five)
    assert (result["shots_min"], result["shots_max"]) == (4, 4)
    assert "### cmmlu (4-shot, 5 asked, split dev)" in results_markdown({"cmmlu": {
        **result, "split": "dev", "shots_asked": 5}})
    mapping = json.loads((cmmlu / "subject_mapping.json").read_text(encoding="utf-8"))
    ancient = next(s for s in subjects if s.name == "ancient_chinese")
    assert set(ancient.categories) == {c for c, subs in mapping["categories"].items()
                                       if set(subs) & set(mapping["subcategories"]["ancient_chinese"])}
    assert len(ancient.categories) == 2  # counted in both of its categories


def test_batching_and_padding_do_not_change_letter_logits(tiny_llama, tiny_t5):
    ceval = shared_path("ceval")
    subjects = load_benchmark(str(ceval), "val", ["computer_network"])
    for path in (tiny_llama, tiny_t5):
        model, tokenizer = load_for_inference(str(path), device="cpu")
        prompts = [question_prompt(tokenizer, q, subjects[0].shots[:i % 3], subjects[0].title, 256)[0]
                   for i, q in enumerate(subjects[0].questions[:7])]
        assert len({len(p) for p in prompts}) > 3  # really different lengths, so padding happens
        ids = choice_token_ids(tokenizer)
        alone = letter_logits(model, prompts, ids, tokenizer.pad_token_id, batch_size=1, progress=False)
        batched = letter_logits(model, prompts, ids, tokenizer.pad_token_id, batch_size=7, progress=False)
        torch.testing.assert_close(batched, alone, atol=1e-4, rtol=1e-4)
        # and equal to a plain unpadded forward pass of the first prompt
        one = torch.tensor([prompts[0]])
        if model.config.is_encoder_decoder:
            plain = model(input_ids=one, decoder_input_ids=torch.tensor([[model.config.decoder_start_token_id]])).logits
        else:
            plain = model(input_ids=one).logits
        torch.testing.assert_close(alone[0], plain[0, -1, ids].detach(), atol=1e-4, rtol=1e-4)


def test_k_shot_prompt_drops_examples_that_do_not_fit(tiny_llama):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    subject = load_benchmark(str(shared_path("ceval")), "val", ["computer_network"])[0]
    question = subject.questions[0]
    full, five = question_prompt(tokenizer, question, subject.shots[:5], subject.title, 100_000)
    zero, none = question_prompt(tokenizer, question, [], subject.title, 100_000)
    fitted, fewer = question_prompt(tokenizer, question, subject.shots[:5], subject.title, len(full) - 1)
    assert len(zero) < len(fitted) < len(full) and (five, fewer, none) == (5, 4, 0)
    text = tokenizer.decode(full)
    assert text.count("<|user|>") == 6 and text.endswith("答案：<|end|>\n<|assistant|>\n")
    assert f"<|assistant|>\n{subject.shots[0].answer}<|end|>" in text


def benchmark_copy(root, dev_rows):
    """A C-Eval directory of the given subjects' val files and `dev_rows[subject]` of their dev questions
    (None: no dev file; an empty dict: no dev directory at all)."""
    ceval = shared_path("ceval")
    (root / "val").mkdir(parents=True)
    shutil.copy(ceval / "subject_mapping.json", root)
    for subject, rows in dev_rows.items():
        shutil.copy(ceval / "val" / f"{subject}_val.csv", root / "val")
        if rows is not None:
            (root / "dev").mkdir(exist_ok=True)
            with open(ceval / "dev" / f"{subject}_dev.csv", encoding="utf-8", newline="") as source, \
                    open(root / "dev" / f"{subject}_dev.csv", "w", encoding="utf-8", newline="") as target:
                csv.writer(target).writerows(list(csv.reader(source))[:rows + 1])
    return root


def test_k_shot_without_dev_examples_is_refused(tmp_path):
    no_dev = benchmark_copy(tmp_path / "no_dev", {"computer_network": None})
    args = ["--config", "none", "--model_name_or_path", str(tmp_path / "unused"), "--task", "ceval",
            "--num_shots", "5", "--output_dir", str(tmp_path / "out")]
    with pytest.raises(UserError, match="--num_shots 5 takes solved examples from the 'dev' split") as err:
        eval_model.main([*args, "--ceval_data", str(no_dev)])
    assert err.value.path == str(no_dev / "dev") and err.value.field == "num_shots"
    assert "--num_shots 0" in err.value.fix and "directory is missing" in err.value.problem
    one_lacking = benchmark_copy(tmp_path / "one_lacking", {"computer_network": 5, "high_school_physics": None,
                                                            "modern_chinese_history": 0})
    with pytest.raises(UserError, match="2 of 3 subjects have no examples") as err:
        load_benchmark(str(one_lacking), "val", num_shots=1)
    assert err.value.path == str(one_lacking / "dev" / "high_school_physics_dev.csv")
    assert len(load_benchmark(str(one_lacking), "val", num_shots=0)) == 3  # zero-shot needs no dev split
    result = run_script("eval_model.py", *args, "--ceval_data", str(no_dev), check=False)
    assert result.returncode == 2 and "no_dev/dev" in result.stderr and "fix: pass --num_shots 0" in result.stderr


def test_shots_that_ran_are_reported_per_subject(tiny_llama, tmp_path):
    data = benchmark_copy(tmp_path / "ceval", {"computer_network": 5, "modern_chinese_history": 1})
    out = tmp_path / "out"
    results = eval_model.main(["--config", "none", "--model_name_or_path", str(tiny_llama), "--task", "ceval",
                             "--ceval_data", str(data), "--num_shots", "3", "--max_questions", "2",
                             "--max_length", "100000", "--output_dir", str(out)])  # no shot cut for length
    subjects = results["ceval"]["subjects"]
    assert (subjects["computer_network"]["shots_min"], subjects["computer_network"]["shots_max"]) == (3, 3)
    assert (subjects["modern_chinese_history"]["shots_min"], subjects["modern_chinese_history"]["shots_max"]) == (1, 1)
    saved = json.loads((out / "eval_results.json").read_text())["results"]["ceval"]
    assert (saved["shots_asked"], saved["shots_min"], saved["shots_max"]) == (3, 1, 3)
    table = (out / "eval_results.md").read_text()
    assert "### ceval (1-3-shot, 3 asked, split val)" in table
    assert "| modern_chinese_history (近代史纲要) | 2 | 1-shot |" in table
    assert "| computer_network (计算机网络) | 2 | 3-shot |" in table


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("bpc") / "text.jsonl"
    documents = ["".join(SENTENCES[:3]), SENTENCES[5] + "\n" + SENTENCES[9], SENTENCES[11]]
    path.write_text("".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in documents), encoding="utf-8")
    return path, documents


def stream_ids(tokenizer, documents):
    """The toolkit's token stream by hand: each document's tokens, then EOS."""
    ids = []
    for document in documents:
        ids += tokenizer(document, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return ids


def test_bpc_of_a_decoder_equals_a_hand_computation(tiny_llama, text_file):
    path, documents = text_file
    model, tokenizer = load_for_inference(str(tiny_llama), device="cpu")
    ids = [tokenizer.eos_token_id] + stream_ids(tokenizer, documents)
    characters = sum(map(len, documents))
    with torch.no_grad():
        # one window holding everything: a single plain forward pass
        logits = model(input_ids=torch.tensor([ids])).logits[0]
        whole = F.cross_entropy(logits[:-1], torch.tensor(ids[1:]), reduction="sum").item() / math.log(2)
        # windows of 2 advancing by 1: every token predicted from its previous token only. (The tokenizer
        # merges each of the tiny corpus's sentences into a token or two and its documents are sentences in
        # random order, so more than a few tokens of context tell this model nothing more.)
        short = 0.0
        for t in range(1, len(ids)):
            context = torch.tensor([ids[max(0, t - 1):t + 1]])
            short -= torch.log_softmax(model(input_ids=context).logits[0, -2], -1)[ids[t]].item() / math.log(2)
    result = bits_per_character(model, tokenizer, [str(path)], block_size=512, batch_size=2, progress=False)
    assert result["characters"] == characters and result["tokens"] == len(ids) - 1
    assert result["bpc"] == pytest.approx(whole / characters, rel=1e-5)
    sliding = bits_per_character(model, tokenizer, [str(path)], block_size=2, stride=1, batch_size=16, progress=False)
    assert sliding["bpc"] == pytest.approx(short / characters, rel=1e-5)
    assert sliding["bpc"] > result["bpc"]  # 1 token of context predicts worse than the whole text
    halves = bits_per_character(model, tokenizer, [str(path)], block_size=4, batch_size=3, progress=False)
    assert result["bpc"] <= halves["bpc"] <= sliding["bpc"] * 1.001


def test_sliding_windows_score_every_token_once():
    for length, block, stride in [(100, 16, 8), (17, 16, 15), (5, 16, 8), (50, 10, 1)]:
        windows = _windows(length, block, stride)
        scored = [t for _, first, end in windows for t in range(first, end)]
        assert scored == list(range(1, length))
        assert all(end - start <= block and start < first for start, first, end in windows)


def test_bpc_of_t5_equals_decoder_nll_given_eos(tiny_t5, text_file):
    path, documents = text_file
    model, tokenizer = load_for_inference(str(tiny_t5), device="cpu")
    ids = stream_ids(tokenizer, documents)
    bits = 0.0
    with torch.no_grad():
        for start in range(0, len(ids), 20):
            chunk = torch.tensor([ids[start:start + 20]])
            loss = model(input_ids=torch.tensor([[tokenizer.eos_token_id]]), labels=chunk).loss.item()
            bits += loss * chunk.shape[1] / math.log(2)
    result = bits_per_character(model, tokenizer, [str(path)], block_size=20, batch_size=4, progress=False)
    assert result["bpc"] == pytest.approx(bits / sum(map(len, documents)), rel=1e-5)
    assert result["method"] == "t5_decoder_given_eos"


def test_bpc_converts_traditional_text_as_the_corpus_stage_does(tiny_llama, tmp_path, caplog):
    documents = ["".join(SENTENCES[:4]), SENTENCES[6] + "\n" + SENTENCES[10]]
    traditional = [to_simplified(d, "s2t") for d in documents]  # the same text in traditional characters
    simplified = [to_simplified(d, "t2s") for d in traditional]
    files = {}
    for name, texts in (("traditional", traditional), ("simplified", simplified)):
        files[name] = tmp_path / f"{name}.jsonl"
        files[name].write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts),
                               encoding="utf-8")
    model, tokenizer = load_for_inference(str(tiny_llama), device="cpu")

    def bpc(name, conversion):
        return bits_per_character(model, tokenizer, [str(files[name])], block_size=64, batch_size=4,
                                  opencc_config=conversion, progress=False)

    converted, reference = bpc("traditional", "t2s"), bpc("simplified", "none")
    for key in ("bpc", "bits", "characters", "tokens"):
        assert converted[key] == reference[key]
    changed = sum(a != b for t, s in zip(traditional, simplified) for a, b in zip(t, s))
    assert converted["characters_changed"] == changed > 0 and reference["characters_changed"] == 0
    assert converted["traditional_share"] > 0.2 and reference["traditional_share"] == 0
    caplog.clear()
    as_is = bpc("traditional", "none")
    assert as_is["bpc"] != converted["bpc"] and as_is["characters_changed"] == 0
    assert as_is["traditional_share"] == converted["traditional_share"] >= TRADITIONAL_SHARE_WARNING
    assert any("traditional" in r.message and r.levelname == "WARNING" for r in caplog.records)
    assert "| t2s | " in results_markdown({"bpc": converted})
    assert "Warning" in results_markdown({"bpc": as_is}) and "Warning" not in results_markdown({"bpc": reference})
    with pytest.raises(UserError, match="not an OpenCC profile") as err:
        bpc("traditional", "no_such_profile")
    assert err.value.field == "opencc_config"


def test_bpc_conversion_defaults_to_the_corpus_stage_default():
    import yaml

    from utils.config import parse_config, recipe_path
    from utils.data.corpus import CleaningArguments

    (args,) = parse_config([eval_model.EvalArguments], ["--task", "bpc", "--bpc_files", "x.txt"],
                           default_recipe=recipe_path("evaluate"))
    corpus = yaml.safe_load(recipe_path("prepare_data").read_text())["opencc_config"]
    assert args.opencc_config == corpus == CleaningArguments().opencc_config == eval_model.EvalArguments().opencc_config


def test_generation_metrics_on_known_pairs():
    same = text_metrics(["今天天气很好", "我们去公园散步吧"], ["今天天气很好", "我们去公园散步吧"])
    assert same["bleu4"] == pytest.approx(100) and same["rougeL"] == pytest.approx(100)
    disjoint = text_metrics(["甲乙丙丁戊"], ["子丑寅卯辰"])
    assert disjoint["bleu4"] == pytest.approx(0) and disjoint["rougeL"] == pytest.approx(0)
    # one extra character: n-gram precisions 6/7, 5/6, 4/5, 3/4, no brevity penalty -> BLEU (3/7)^(1/4);
    # longest common subsequence 6 of 7 and 6 -> ROUGE-L F1 = 2 * (6/7) * 1 / (6/7 + 1) = 12/13
    partial = text_metrics(["今天天气很好啊"], ["今天天气很好"])
    assert partial["bleu4"] == pytest.approx(100 * (3 / 7) ** 0.25, abs=1e-6)
    assert partial["rougeL"] == pytest.approx(100 * 12 / 13)
    assert text_metrics(["今 天"], ["今天"])["rougeL"] == pytest.approx(100)  # characters, spaces ignored


def test_repetition_metrics_on_known_replies():
    """Repeated 4-grams within a reply, distinct-1/2 over all replies, by characters (spaces ignored)."""
    parrot = text_metrics(["好的好的好的好的"], ["好的"])  # 5 4-grams, 2 distinct (好的好的, 的好的好)
    assert parrot["repeated_4gram"] == pytest.approx(3 / 5)
    assert parrot["distinct_1"] == pytest.approx(2 / 8) and parrot["distinct_2"] == pytest.approx(2 / 7)
    varied = text_metrics(["今天 天气很好", "我们去公园"], ["", ""])
    assert varied["repeated_4gram"] == 0 and varied["distinct_1"] == pytest.approx(10 / 11)  # 天 twice
    assert varied["distinct_2"] == pytest.approx(1.0) and text_metrics(["短"], ["短"])["repeated_4gram"] == 0


def test_triple_scores_on_hand_made_cases():
    gold = "[(李白,朝代,唐朝),(李白,作品,静夜思)]"
    assert parse_triples(gold) == [("李白", "朝代", "唐朝"), ("李白", "作品", "静夜思")]
    assert parse_triples("[（杭州, 位于, 浙江）]") == [("杭州", "位于", "浙江")]
    perfect = triple_scores([gold], [gold])
    assert perfect["precision"] == perfect["recall"] == perfect["f1"] == perfect["exact_match"] == 1.0
    # example 1: 1 of 3 predictions right (one malformed), 1 of 2 gold found; example 2: nothing predicted
    scores = triple_scores(["[(李白,朝代,唐朝),(李白,作品,将进酒),(坏的三元组)]", "[]"],
                           [gold, "[(西湖,位于,杭州)]"])
    assert (scores["true_positives"], scores["predicted"], scores["gold"]) == (1, 3, 3)
    assert scores["precision"] == pytest.approx(1 / 3) and scores["recall"] == pytest.approx(1 / 3)
    assert scores["f1"] == pytest.approx(1 / 3) and scores["exact_match"] == 0
    duplicates = triple_scores(["[(a,b,c),(a,b,c)]"], ["[(a,b,c),(d,e,f)]"])
    assert duplicates["precision"] == 1.0 and duplicates["recall"] == 0.5 and duplicates["f1"] == pytest.approx(2 / 3)
    assert triple_scores(["没有三元组"], [gold])["f1"] == 0.0


def test_generation_and_triples_tasks_run_end_to_end(tiny_llama, tmp_path):
    rows = [{"prompt": "请抽取出给定句子中的所有三元组。给定句子：" + s, "response": "[(小明,交通工具,自行车)]"}
            for s in SENTENCES[:3]]
    data = tmp_path / "ie.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    out = tmp_path / "out"
    results = eval_model.main(["--config", "none", "--model_name_or_path", str(tiny_llama), "--task", "generation",
                             "triples", "--generation_files", str(data), "--triples_files", str(data),
                             "--max_new_tokens", "8", "--batch_size", "2", "--output_dir", str(out)])
    assert results["generation"]["examples"] == results["triples"]["examples"] == 3
    assert 0 <= results["generation"]["rougeL"] <= 100 and results["triples"]["gold"] == 3
    assert 0 <= results["generation"]["repeated_4gram"] <= 1 and 0 < results["generation"]["distinct_2"] <= 1
    assert "repeated 4-grams" in (out / "eval_results.md").read_text()
    assert len(results["triples"]["samples"]) == 3
    # a second run with another task keeps the first run's results in the same file
    text = tmp_path / "text.txt"
    text.write_text("春天来了。\n花开了。\n", encoding="utf-8")
    eval_model.main(["--config", "none", "--model_name_or_path", str(tiny_llama), "--task", "bpc",
                   "--bpc_files", str(text), "--output_dir", str(out)])
    saved = json.loads((out / "eval_results.json").read_text())
    assert set(saved["results"]) == {"generation", "triples", "bpc"}


def is_png(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_report_plots_a_real_run(tiny_corpus, tiny_tokenizer, tmp_path):
    import pre_train

    run = tmp_path / "run"
    pre_train.main(["--config", "none", "--model_config", "llama-tiny", "--tokenizer_name_or_path",
                    str(tiny_tokenizer), "--train_files", str(tiny_corpus), "--validation_files", str(tiny_corpus),
                    "--output_dir", str(run), "--block_size", "32", "--per_device_train_batch_size", "2",
                    "--max_steps", "6", "--logging_steps", "1", "--eval_strategy", "steps", "--eval_steps", "3",
                    "--save_steps", "3", "--report_to", "none", "--preprocessing_num_workers", "1"])
    written = eval_model.main(["report", "--run_dir", str(run)])
    names = {p.name for p in written}
    assert {"loss.png", "learning_rate.png", "bpc.png"} <= names
    for path in written:
        width, height = is_png(path)
        assert (width, height) == (700, 400)
    # the finished run's own trainer state (written by save_final) has every step
    assert find_trainer_state(run) == run / "trainer_state.json"
    assert json.loads((run / "trainer_state.json").read_text())["global_step"] == 6
    # a run directory without a trainer state at its root (an interrupted run): the latest checkpoint's is used
    state = json.loads((run / "checkpoint-6" / "trainer_state.json").read_text())
    assert any("eval_loss" in h for h in state["log_history"])
    (run / "trainer_state.json").unlink()
    shutil.rmtree(run / "checkpoint-6")
    older = plot_training(evaluate_state(run), tmp_path / "older")
    assert {p.name for p in older} >= {"loss.png", "learning_rate.png"}
    assert sorted((tmp_path / "older").iterdir()) == sorted(older)  # written atomically: no temporaries left


def evaluate_state(run):
    found = find_trainer_state(run)
    assert found.parent.name == "checkpoint-3"
    return found


def test_a_missing_bpc_file_or_an_unwritable_output_is_refused_before_any_task_runs(tmp_path, tiny_llama):
    """They were found after the tasks before them had run (C-Eval first: hours on a real model)."""
    result = run_script("eval_model.py", "--config", "none", "--model_name_or_path", str(tiny_llama), "--task", "ceval",
                        "bpc", "--ceval_data", "data/demo/eval_ceval", "--bpc_files", str(tmp_path / "held_out.jsonl"),
                        "--output_dir", str(tmp_path / "eval"), check=False)
    assert result.returncode == 2 and "Loading weights" not in result.stderr
    assert f"error: {tmp_path / 'held_out.jsonl'}, field 'bpc_files': no such file or directory" in result.stderr
    (tmp_path / "taken").write_text("a file where the output folder would go")
    result = run_script("eval_model.py", "--config", "none", "--model_name_or_path", str(tiny_llama), "--task", "ceval",
                        "--ceval_data", "data/demo/eval_ceval", "--output_dir", str(tmp_path / "taken" / "eval"),
                        check=False)
    assert result.returncode == 2 and "Loading weights" not in result.stderr
    assert "field 'output_dir': cannot write here" in result.stderr and not (tmp_path / "eval").exists()
    with pytest.raises(UserError, match="must all be .parquet") as err:  # was blamed on pre_train's --train_files
        eval_model.main(["--config", "none", "--model_name_or_path", str(tiny_llama), "--task", "bpc", "--bpc_files",
                       str(REPO / "README.md"), "--output_dir", str(tmp_path / "eval")])
    assert err.value.field == "bpc_files" and not (tmp_path / "eval").exists()


def test_bad_input_is_refused_clearly(tmp_path, tiny_llama):
    with pytest.raises(UserError, match="no such file or directory"):
        load_benchmark(str(tmp_path / "missing"), "val")
    broken = tmp_path / "broken"
    (broken / "val").mkdir(parents=True)
    (broken / "val" / "demo_val.csv").write_text("id,question,A,B,C,answer\n0,问题,甲,乙,丙,A\n", encoding="utf-8")
    with pytest.raises(UserError) as err:
        load_benchmark(str(broken), "val")
    assert err.value.field == "d" and err.value.line == 1 and "demo_val.csv" in err.value.path
    bad_answer = "id,question,A,B,C,D,answer\n0,问题,甲,乙,丙,丁,E\n"
    (broken / "val" / "demo_val.csv").write_text(bad_answer, encoding="utf-8")
    with pytest.raises(UserError, match="not one of A, B, C, D") as err:
        read_choice_csv(broken / "val" / "demo_val.csv", "demo")
    assert err.value.line == 2
    with pytest.raises(UserError, match="no 'test' split") as err:
        load_benchmark(str(shared_path("cmmlu")), "test", task="cmmlu")
    assert "dev" in str(err.value) and err.value.field == "cmmlu_split"
    with pytest.raises(UserError, match="unknown subject"):
        load_benchmark(str(shared_path("ceval")), "val", ["no_such_subject"])
    result = run_script("eval_model.py", "--config", "none", "--model_name_or_path", str(tmp_path / "nothing"),
                        "--task", "ceval", "--ceval_data", "data/demo/eval_ceval", check=False)
    assert result.returncode == 2 and "nothing, field 'model_name_or_path': no such file or directory" in result.stderr
    result = run_script("eval_model.py", "--config", "none", "--task", "bpc", check=False)
    assert result.returncode == 2 and "--bpc_files" in result.stderr
    bare = tmp_path / "bare_model"  # a model directory that was never trained here
    bare.mkdir()
    (bare / "config.json").write_text("{}")
    with pytest.raises(UserError, match="no trainer_state.json"):
        eval_model.main(["report", "--run_dir", str(bare)])


def test_help_and_recipes_parse():
    assert "--ceval_data" in run_script("eval_model.py", "--help").stdout
    assert "--run_dir" in run_script("eval_model.py", "report", "--help").stdout
    from utils.config import REPO_ROOT, parse_config

    for recipe in ("config/evaluate.yaml", "config/demo/evaluate.yaml"):
        (args,) = parse_config([eval_model.EvalArguments], ["--config", str(REPO_ROOT / recipe)])
        assert args.task
