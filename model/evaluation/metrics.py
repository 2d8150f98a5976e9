"""Evaluation data and metrics that need no model: C-Eval / CMMLU questions, character-level BLEU-4 and
ROUGE-L, (subject, relation, object) triple scores, the results table, and training-curve plots.

Model-side scoring (letter logits, bits per character, generation) is in `model/evaluation/scoring.py`.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from utils.data.text import CJK_CHAR, to_simplified
from utils.errors import UserError

logger = logging.getLogger(__name__)

LETTERS = ("A", "B", "C", "D")
CHANCE = 0.25
BENCHMARKS = ("ceval", "cmmlu")
# Share of Chinese characters that OpenCC t2s changes: ~0% in simplified text, 30-40% in traditional text.
TRADITIONAL_SHARE_WARNING = 0.05


@dataclass
class Question:
    subject: str
    question: str
    options: tuple[str, str, str, str]
    answer: str  # one of LETTERS


@dataclass
class Subject:
    name: str
    title: str  # the subject's Chinese name, used in the prompt
    categories: list[str]
    questions: list[Question] = field(default_factory=list)  # the evaluated split
    shots: list[Question] = field(default_factory=list)  # the dev split (k-shot examples)


def read_choice_csv(path: Path, subject: str) -> list[Question]:
    """Questions of one official C-Eval / CMMLU CSV (`id,question,A,B,C,D,answer[,explanation]` or CMMLU's
    `,Question,A,B,C,D,Answer`); column names are matched case-insensitively."""
    with open(path, encoding="utf-8-sig", newline="") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if header is None:
            raise UserError("the CSV file is empty", path=str(path), line=1,
                            fix="use the official C-Eval / CMMLU CSV files")
        columns = {name.strip().lower(): i for i, name in enumerate(header)}
        needed = ["question", *[x.lower() for x in LETTERS], "answer"]
        missing = [name for name in needed if name not in columns]
        if missing:
            raise UserError(f"missing column(s) {', '.join(missing)}; the header is: {','.join(header)}",
                            path=str(path), line=1, field=missing[0],
                            fix="use the official CSV layout: question,A,B,C,D,answer (C-Eval) or "
                                ",Question,A,B,C,D,Answer (CMMLU)")
        questions = []
        for row in reader:
            if not any(cell.strip() for cell in row):
                continue
            try:
                values = [row[columns[name]].strip() for name in needed]
            except IndexError:
                raise UserError(f"the row has {len(row)} fields, the header {len(header)}", path=str(path),
                                line=reader.line_num, fix="repair the CSV row (quote fields holding commas)") from None
            answer = values[-1].upper()
            if answer not in LETTERS:
                raise UserError(f"the answer '{values[-1]}' is not one of A, B, C, D", path=str(path),
                                line=reader.line_num, field="answer", fix="correct the answer letter")
            questions.append(Question(subject, values[0], tuple(values[1:5]), answer))
    return questions


def _subject_info(mapping: dict, subject: str) -> tuple[str, list[str]]:
    """(Chinese title, categories) of `subject` from C-Eval's or CMMLU's `subject_mapping.json`."""
    if "subcategories" in mapping:  # CMMLU: subject -> subcategories -> categories (may be several)
        subcategories = mapping["subcategories"].get(subject, [])
        categories = [c for c, subs in mapping.get("categories", {}).items() if set(subs) & set(subcategories)]
        return mapping.get("name_en2zh", {}).get(subject, subject), categories or ["Other"]
    if subject in mapping:  # C-Eval: subject -> [English name, Chinese name, category]
        return mapping[subject][1], [mapping[subject][2]]
    return subject, ["Other"]


def _split_dir(root: Path, split: str, field_name: str) -> Path:
    folder = root / split
    if not folder.is_dir():
        present = sorted(p.name for p in root.iterdir() if p.is_dir() and any(p.glob("*.csv")))
        raise UserError(f"no '{split}' split directory in the benchmark directory "
                        f"(splits present: {', '.join(present) or 'none'})", path=str(folder), field=field_name,
                        fix=f"pass --{field_name} with one of the splits present, or the directory of the "
                            "official CSVs (dev/, val/, test/)")
    return folder


def _subject_of(path: Path, split: str) -> str:
    return path.stem[:-len(split) - 1] if path.stem.endswith(f"_{split}") else path.stem


def load_local_benchmark(root: str | Path, split: str, subjects: Sequence[str] = (), shot_split: str = "dev",
                         task: str = "ceval", num_shots: int = 0) -> list[Subject]:
    """Subjects of a local directory of official CSVs: `{split}/*.csv` (C-Eval names them
    `{subject}_{split}.csv`, CMMLU `{subject}.csv`), k-shot examples from `{shot_split}/`, titles and
    categories from `subject_mapping.json` when present. With `num_shots` > 0 a subject without any
    `{shot_split}` example is refused: it would silently run zero-shot."""
    root = Path(root)
    if not root.is_dir():
        raise UserError("the benchmark directory does not exist", path=str(root), field=f"{task}_data",
                        fix="pass a directory of the official CSVs (e.g. ../shared/data/ceval) or a hub "
                            "dataset name (ceval/ceval-exam, haonan-li/cmmlu)")
    mapping_file = root / "subject_mapping.json"
    mapping = json.loads(mapping_file.read_text(encoding="utf-8")) if mapping_file.is_file() else {}
    files = {_subject_of(p, split): p for p in sorted(_split_dir(root, split, f"{task}_split").glob("*.csv"))}
    shot_dir = root / shot_split
    shot_files = {_subject_of(p, shot_split): p for p in sorted(shot_dir.glob("*.csv"))} if shot_dir.is_dir() else {}
    chosen = list(subjects) or sorted(files)
    unknown = [s for s in chosen if s not in files]
    if unknown:
        raise UserError(f"unknown subject(s) {', '.join(unknown)}", path=str(root / split), field=f"{task}_subjects",
                        fix=f"choose among: {', '.join(sorted(files))}")
    result = []
    for name in chosen:
        title, categories = _subject_info(mapping, name)
        shots = read_choice_csv(shot_files[name], name) if name in shot_files else []
        result.append(Subject(name, title, categories, read_choice_csv(files[name], name), shots))
    lacking = [s.name for s in result if not s.shots]
    if num_shots > 0 and lacking:
        first = lacking[0]
        path = shot_files.get(first, shot_dir / files[first].name.replace(f"_{split}.csv", f"_{shot_split}.csv"))
        problem = "is missing" if first not in shot_files else "holds no questions"
        raise UserError(f"--num_shots {num_shots} takes solved examples from the '{shot_split}' split, but the "
                        f"{'directory' if not shot_dir.is_dir() else 'file'} {problem} ({len(lacking)} of "
                        f"{len(result)} subjects have no examples: {', '.join(lacking[:5])}"
                        f"{' ...' if len(lacking) > 5 else ''})",
                        path=str(shot_dir if not shot_dir.is_dir() else path), field="num_shots",
                        fix=f"pass --num_shots 0 for a zero-shot run, or provide {shot_dir}/ with the official "
                            f"{shot_split} CSVs of these subjects")
    return result


def load_hub_benchmark(dataset_name: str, split: str, subjects: Sequence[str] = (), shot_split: str = "dev",
                       task: str = "ceval") -> list[Subject]:
    """Subjects of a hub dataset with one configuration per subject (ceval/ceval-exam, haonan-li/cmmlu)."""
    import datasets

    try:
        names = list(subjects) or datasets.get_dataset_config_names(dataset_name)
    except Exception as err:  # network, unknown repository, dataset script not supported ...
        raise UserError(f"not a local directory, and cannot read it as a hub dataset: {err}", path=dataset_name,
                        field=f"{task}_data", fix="pass the directory of the official CSVs (dev/, val/ or test/), "
                                                  "or a reachable hub dataset name") from None
    mapping = {}
    try:
        from huggingface_hub import hf_hub_download

        mapping = json.loads(Path(hf_hub_download(dataset_name, "subject_mapping.json", repo_type="dataset"))
                             .read_text(encoding="utf-8"))
    except Exception:  # optional: categories default to "Other"
        logger.info("no subject_mapping.json in %s: categories unknown", dataset_name)
    result = []
    for name in names:
        parts = {}
        for part in (split, shot_split):
            try:
                rows = datasets.load_dataset(dataset_name, name, split=part)
            except Exception as err:
                raise UserError(f"cannot load subject '{name}' split '{part}': {err}", path=dataset_name,
                                field=f"{task}_split", fix="check the subject and split names") from None
            parts[part] = [_hub_question(row, name, dataset_name) for row in rows]
        title, categories = _subject_info(mapping, name)
        result.append(Subject(name, title, categories, parts[split], parts[shot_split]))
    return result


def _hub_question(row: dict, subject: str, dataset_name: str) -> Question:
    row = {str(k).lower(): v for k, v in row.items()}
    missing = [k for k in ("question", "a", "b", "c", "d", "answer") if k not in row]
    if missing:
        raise UserError(f"missing column(s) {', '.join(missing)}", path=dataset_name, field=missing[0],
                        fix="use the official C-Eval / CMMLU datasets")
    return Question(subject, str(row["question"]).strip(), tuple(str(row[x.lower()]).strip() for x in LETTERS),
                    str(row["answer"]).strip().upper())


def load_benchmark(source: str, split: str, subjects: Sequence[str] = (), shot_split: str = "dev",
                   task: str = "ceval", num_shots: int = 0) -> list[Subject]:
    """A local directory of CSVs if `source` is a path that exists (or looks like one), else a hub dataset
    (whose loader refuses a missing `shot_split` itself)."""
    if Path(source).exists() or source.startswith((".", "/", "~")) or source.count("/") != 1:
        return load_local_benchmark(Path(source).expanduser(), split, subjects, shot_split, task, num_shots)
    return load_hub_benchmark(source, split, subjects, shot_split, task)


def choice_accuracy(subjects: Sequence[Subject], predictions: dict[str, list[str]],
                    shots: dict[str, list[int]]) -> dict:
    """Accuracy per subject, per category (a CMMLU subject may count in two) and overall (micro: all
    questions; macro: mean of subject accuracies), with the chance level, and the fewest and most solved
    examples that really preceded a question (`shots`: per subject, per question)."""
    per_subject, per_category = {}, {}
    for subject in subjects:
        answers = [q.answer for q in subject.questions]
        correct = sum(p == a for p, a in zip(predictions[subject.name], answers, strict=True))
        used = shots[subject.name] or [0]
        per_subject[subject.name] = {"title": subject.title, "categories": subject.categories,
                                     "correct": correct, "total": len(answers),
                                     "accuracy": correct / len(answers) if answers else 0.0,
                                     "shots_min": min(used), "shots_max": max(used)}
        for category in subject.categories:
            entry = per_category.setdefault(category, {"correct": 0, "total": 0})
            entry["correct"] += correct
            entry["total"] += len(answers)
    for entry in per_category.values():
        entry["accuracy"] = entry["correct"] / entry["total"] if entry["total"] else 0.0
    correct = sum(s["correct"] for s in per_subject.values())
    total = sum(s["total"] for s in per_subject.values())
    macro = sum(s["accuracy"] for s in per_subject.values()) / max(len(per_subject), 1)
    return {"accuracy": correct / total if total else 0.0, "macro_accuracy": macro, "correct": correct,
            "total": total, "chance": CHANCE,
            "shots_min": min((s["shots_min"] for s in per_subject.values()), default=0),
            "shots_max": max((s["shots_max"] for s in per_subject.values()), default=0),
            "categories": dict(sorted(per_category.items())), "subjects": per_subject}


def shots_label(entry: dict) -> str:
    """'5-shot', or '3-5-shot' when questions had different numbers of examples (a result saved before
    the shots that ran were recorded shows the number asked)."""
    low, high = entry.get("shots_min", entry.get("shots")), entry.get("shots_max", entry.get("shots"))
    return f"{low}-shot" if low == high else f"{low}-{high}-shot"


def convert_text_files(files: Sequence[str], split: str, opencc_config: str, target: Path) -> dict:
    """Write the `text` column of `files` (one row per document, as the token stream reads them) to the
    JSON-lines file `target`, converted with the OpenCC profile `opencc_config` as prepare_data.py does
    ('none' = as it is). Returns the conversion, the characters it changed, and the share of the Chinese
    characters that t2s changes (measured also when nothing is converted: how traditional the text is)."""
    from utils.examples.pretrain_data import load_text_files

    try:
        to_simplified("", "t2s" if opencc_config == "none" else opencc_config)
    except RuntimeError as err:
        raise UserError(f"not an OpenCC profile ({err})", field="opencc_config",
                        fix="pass one of OpenCC's profiles (t2s, tw2sp, hk2s, ...) as prepare_data.py takes, "
                            "or none") from None
    data, _ = load_text_files(list(files), split, ["text"])
    changed = traditional = chinese = 0
    with open(target, "w", encoding="utf-8") as handle:
        for batch in data.iter(batch_size=1024):
            for text in batch["text"]:
                simplified = to_simplified(text, "t2s")
                converted = text if opencc_config == "none" else simplified if opencc_config == "t2s" else \
                    to_simplified(text, opencc_config)
                traditional += _characters_changed(text, simplified)
                changed += _characters_changed(text, converted)
                chinese += len(CJK_CHAR.findall(text))
                handle.write(json.dumps({"text": converted}, ensure_ascii=False) + "\n")
    result = {"opencc_config": opencc_config, "characters_changed": changed,
              "traditional_share": traditional / chinese if chinese else 0.0}
    if traditional_warning(result):
        logger.warning("bpc text: %s", traditional_warning(result))
    elif opencc_config != "none":
        logger.info("bpc text: OpenCC %s changed %s of %s Chinese characters", opencc_config, f"{changed:,}",
                    f"{chinese:,}")
    return result


def traditional_warning(result: dict) -> str | None:
    """What is wrong with a bpc figure taken on largely traditional text left unconverted, or None."""
    if result.get("opencc_config", "none") != "none" or result.get("traditional_share", 0) < TRADITIONAL_SHARE_WARNING:
        return None
    return (f"{100 * result['traditional_share']:.0f}% of the Chinese characters are traditional and were scored as "
            "they are (--opencc_config none); prepare_data.py converts its corpus to simplified by default, so a "
            "model trained on it scores this text worse: pass --opencc_config t2s")


def _characters_changed(before: str, after: str) -> int:
    """Characters OpenCC replaced (it converts character for character; a length change counts in full)."""
    return sum(a != b for a, b in zip(before, after)) + abs(len(before) - len(after))


class _CharacterTokenizer:
    """rouge-score tokenizer: one token per non-space character (its default drops non-ASCII text)."""

    def tokenize(self, text: str) -> list[str]:
        return [c for c in text if not c.isspace()]


def text_metrics(hypotheses: Sequence[str], references: Sequence[str]) -> dict:
    """Character-level corpus BLEU-4 (sacrebleu, tokenize='char') and mean ROUGE-L F1 (rouge-score over
    characters), both in 0-100."""
    import sacrebleu
    from rouge_score import rouge_scorer

    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses for {len(references)} references")
    if not hypotheses:
        return {"bleu4": 0.0, "rougeL": 0.0, "examples": 0}
    bleu = sacrebleu.metrics.BLEU(tokenize="char").corpus_score(list(hypotheses), [list(references)])
    scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=_CharacterTokenizer())
    rouge = [scorer.score(ref, hyp)["rougeL"].fmeasure for hyp, ref in zip(hypotheses, references)]
    return {"bleu4": float(bleu.score), "rougeL": 100.0 * sum(rouge) / len(rouge), "examples": len(hypotheses)}


_TRIPLE = re.compile(r"[(（]([^()（）]*)[)）]")


def parse_triples(text: str) -> list[tuple[str, ...]]:
    """Triples of ChatLM-mini-Chinese's extraction format `[(s,r,o),(s,r,o)]` (ASCII or full-width
    parentheses, ASCII commas, spaces around items ignored). An item that does not split into exactly
    three non-empty parts is kept as it is, so it counts as a wrong prediction."""
    triples = []
    for inner in _TRIPLE.findall(text):
        parts = tuple(part.strip() for part in inner.split(","))
        triples.append(parts if len(parts) == 3 and all(parts) else (inner.strip(),))
    return triples


def triple_scores(predictions: Sequence[str], references: Sequence[str]) -> dict:
    """Micro precision / recall / F1 of predicted triples against reference triples (each text a list of
    triples; duplicates within one text count once) and the share of texts whose set is exactly right."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    true_positive = predicted = gold = exact = 0
    for prediction, reference in zip(predictions, references):
        pred_set, gold_set = set(parse_triples(prediction)), set(parse_triples(reference))
        true_positive += len(pred_set & gold_set)
        predicted += len(pred_set)
        gold += len(gold_set)
        exact += pred_set == gold_set
    precision = true_positive / predicted if predicted else 0.0
    recall = true_positive / gold if gold else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1,
            "exact_match": exact / len(predictions) if predictions else 0.0,
            "true_positives": true_positive, "predicted": predicted, "gold": gold, "examples": len(predictions)}


def results_markdown(results: dict) -> str:
    """The results of every task as markdown tables."""
    lines = []
    for task, result in results.items():
        if task in BENCHMARKS:
            ran, asked = shots_label(result), result.get("shots_asked")
            if asked is not None and ran != f"{asked}-shot":
                ran += f", {asked} asked"
            chance = f"{100 * result['chance']:.0f}%"
            lines += [f"### {task} ({ran}, split {result['split']})", "",
                      "| | questions | shots | accuracy | chance |", "|---|---:|---:|---:|---:|",
                      f"| **overall** | {result['total']} | {shots_label(result)} | {100 * result['accuracy']:.2f}% | "
                      f"{chance} |",
                      f"| macro (mean of subjects) | {len(result['subjects'])} subjects | | "
                      f"{100 * result['macro_accuracy']:.2f}% | {chance} |"]
            lines += [f"| {name} | {c['total']} | | {100 * c['accuracy']:.2f}% | {chance} |"
                      for name, c in result["categories"].items()]
            lines += [f"| {name} ({s['title']}) | {s['total']} | {shots_label(s) if 'shots_min' in s else ''} | "
                      f"{100 * s['accuracy']:.2f}% | {chance} |" for name, s in result["subjects"].items()]
        elif task == "bpc":
            lines += ["### bits per character", "",
                      "| file(s) | OpenCC conversion | characters changed | characters | tokens | bpc |",
                      "|---|---|---:|---:|---:|---:|",
                      f"| {', '.join(result['files'])} | {result.get('opencc_config', 'none')} | "
                      f"{result.get('characters_changed', 0):,} | {result['characters']:,} | {result['tokens']:,} | "
                      f"{result['bpc']:.4f} |"]
            if traditional_warning(result):
                lines += ["", f"Warning: {traditional_warning(result)}."]
        elif task == "generation":
            lines += ["### generation (character level)", "", "| examples | BLEU-4 | ROUGE-L |", "|---:|---:|---:|",
                      f"| {result['examples']} | {result['bleu4']:.2f} | {result['rougeL']:.2f} |"]
        elif task == "triples":
            lines += ["### triple extraction", "", "| examples | precision | recall | F1 | exact match |",
                      "|---:|---:|---:|---:|---:|",
                      f"| {result['examples']} | {100 * result['precision']:.2f}% | {100 * result['recall']:.2f}% | "
                      f"{100 * result['f1']:.2f}% | {100 * result['exact_match']:.2f}% |"]
        lines.append("")
    return "\n".join(lines)


def find_trainer_state(run_dir: str | Path) -> Path:
    """`trainer_state.json` of a run: in `run_dir` itself, else in its latest `checkpoint-N` (also one
    level down, e.g. DPO's `adapter/` directory)."""
    from model.training.trainer import latest_checkpoint

    root = Path(run_dir)
    if not root.is_dir():
        raise UserError("the run directory does not exist", path=str(root), field="run_dir",
                        fix="pass the --output_dir of a training stage (e.g. model_save/sft)")
    if (root / "trainer_state.json").is_file():
        return root / "trainer_state.json"
    candidates = [c for c in [latest_checkpoint(root)] + [latest_checkpoint(d) for d in sorted(root.iterdir())
                                                          if d.is_dir()] if c and (c / "trainer_state.json").is_file()]
    if not candidates:
        raise UserError("no trainer_state.json in the run directory or its checkpoints", path=str(root),
                        field="run_dir", fix="pass a training output directory that holds checkpoint-N "
                                             "directories (keep --save_strategy on)")
    return max(candidates, key=lambda c: int(c.name.rsplit("-", 1)[1]))  / "trainer_state.json"


def plot_training(state_file: str | Path, output_dir: str | Path) -> list[Path]:
    """PNG plots of a run's `log_history`: loss.png (training loss and every eval_*loss), learning_rate.png,
    and, when logged, bpc.png (eval bits per character) and rewards.png (DPO rewards). Written atomically."""
    import os
    import tempfile

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    state_file, output_dir = Path(state_file), Path(output_dir)
    try:
        history = json.loads(state_file.read_text(encoding="utf-8"))["log_history"]
    except (json.JSONDecodeError, KeyError) as err:
        raise UserError(f"not a trainer state file ({err})", path=str(state_file),
                        fix="pass a run directory written by the HF Trainer") from None

    def series(key):
        points = [(h["step"], h[key]) for h in history if key in h and isinstance(h[key], (int, float))
                  and math.isfinite(h[key])]
        return [p[0] for p in points], [p[1] for p in points]

    keys = sorted({k for h in history for k in h})
    groups = {"loss": ["loss"] + [k for k in keys if k.startswith("eval_") and k.endswith("loss")],
              "learning_rate": ["learning_rate"],
              "bpc": [k for k in keys if k.endswith("bpc")],
              "rewards": [k for k in keys if k.startswith("rewards/") and not k.startswith("eval_")]}
    run = state_file.parent
    run_name = f"{run.parent.name}/{run.name}" if run.name.startswith("checkpoint-") else run.name
    output_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, names in groups.items():
        curves = [(k, *series(k)) for k in names]
        curves = [c for c in curves if c[1]]
        if not curves:
            continue
        figure, axes = plt.subplots(figsize=(7, 4), dpi=100)
        for key, steps, values in curves:
            axes.plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=3, label=key)
        axes.set_xlabel("step")
        axes.set_ylabel(name.replace("_", " "))
        axes.set_title(f"{name.replace('_', ' ')} - {run_name}")
        axes.grid(alpha=0.3)
        axes.legend()
        figure.tight_layout()
        target = output_dir / f"{name}.png"
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp.png", dir=output_dir)
        os.close(fd)
        try:
            figure.savefig(tmp, format="png")
            os.replace(tmp, target)
        finally:
            plt.close(figure)
            Path(tmp).unlink(missing_ok=True)
        written.append(target)
    if not written:
        raise UserError("the trainer state holds no loss or learning rate values", path=str(state_file),
                        fix="train for at least --logging_steps steps before plotting")
    return written
