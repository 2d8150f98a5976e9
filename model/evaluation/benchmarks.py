"""C-Eval / CMMLU multiple choice: the official CSVs or hub datasets, the prompts, the model's answers by
letter logits, and accuracy per subject, category and overall with the solved examples that really ran.

Each question is a chat - a system line naming the subject, k solved dev examples as user/assistant turns
(the assistant answers with the letter), then the question as the last user turn - rendered with the
toolkit's chat format (`render_prompt`); examples that do not fit the prompt length are left out, last
first. The model's answer is the letter among A/B/C/D whose token has the highest logit at the first reply
position: for a decoder the last prompt position, for T5 the first decoder step given the prompt as
encoder input.
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from model.inference.generation import context_length
from utils.errors import UserError
from utils.hub import from_hub, missing_path
from utils.tokenization.chat_format import render_prompt

logger = logging.getLogger(__name__)

LETTERS = ("A", "B", "C", "D")
CHANCE = 0.25
BENCHMARKS = ("ceval", "cmmlu")
SYSTEM_PROMPT = "以下是中国关于{title}考试的单项选择题，请选出其中的正确答案。"


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
    fix = "pass a directory of the official CSVs (e.g. ../shared/data/ceval)"
    if not Path(root).exists():
        raise missing_path(str(root), f"{task}_data", fix)
    root = Path(root).expanduser()
    if not root.is_dir():
        raise UserError("not a directory", path=str(root), field=f"{task}_data", fix=fix)
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
    """A hub dataset if `source` is a hub id and the hub is allowed (`utils.hub`; its loader refuses a missing
    `shot_split` itself), else a local directory of CSVs."""
    if not from_hub(source):
        return load_local_benchmark(source, split, subjects, shot_split, task, num_shots)
    return load_hub_benchmark(source, split, subjects, shot_split, task)


def choice_token_ids(tokenizer) -> list[int]:
    """The token that starts a reply "A", "B", "C" or "D"; refused if two letters share it."""
    ids = [tokenizer.encode(letter, add_special_tokens=False)[0] for letter in LETTERS]
    if len(set(ids)) != len(ids):
        raise UserError("the tokenizer does not give A, B, C and D distinct first tokens",
                        field="model_name_or_path", fix="use a tokenizer trained by train_tokenizer.py")
    return ids


def question_text(question: Question) -> str:
    options = "\n".join(f"{letter}. {option}" for letter, option in zip(LETTERS, question.options))
    return f"{question.question}\n{options}\n答案："


def question_messages(question: Question, shots: Sequence[Question], title: str) -> list[dict]:
    messages = [{"role": "system", "content": SYSTEM_PROMPT.format(title=title)}]
    for shot in shots:
        messages += [{"role": "user", "content": question_text(shot)}, {"role": "assistant", "content": shot.answer}]
    return messages + [{"role": "user", "content": question_text(question)}]


def question_prompt(tokenizer, question: Question, shots: Sequence[Question], title: str,
                    max_tokens: int) -> tuple[list[int], int]:
    """Prompt ids with as many of `shots` as fit in `max_tokens`, and how many that is (the question
    itself is truncated from the left only if it does not fit alone)."""
    for count in range(len(shots), 0, -1):
        prompt = render_prompt(tokenizer, question_messages(question, shots[:count], title), max_tokens)
        if not prompt.trimmed:
            return prompt.ids, count
    return render_prompt(tokenizer, question_messages(question, [], title), max_tokens).ids, 0


def shots_for(question: Question, subject: Subject, num_shots: int) -> list[Question]:
    """The first `num_shots` dev examples of the subject, never the question itself (when the evaluated
    split is the dev split, leave-one-out)."""
    return [shot for shot in subject.shots if shot != question][:num_shots]


def max_prompt_length(model, tokenizer, max_length: int) -> int:
    if max_length > 0:
        return max_length
    limit = context_length(model, tokenizer)
    return limit if limit <= 1_000_000 else 1024  # tokenizers without a recorded length


@torch.inference_mode()
def letter_logits(model, prompts: Sequence[Sequence[int]], choice_ids: Sequence[int], pad_token_id: int,
                  batch_size: int = 8, progress: bool = True) -> torch.Tensor:
    """Logits of the `choice_ids` tokens at the first reply position of each prompt, shape (N, 4), float32.

    Prompts are batched by length. Decoders are left-padded with position ids counted over the real
    tokens, so padding does not change the result; T5 encoder inputs are right-padded and masked.
    """
    seq2seq = bool(model.config.is_encoder_decoder)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out = torch.empty(len(prompts), len(choice_ids), dtype=torch.float32)
    device, choices = model.device, torch.tensor(list(choice_ids), device=model.device)
    for start in tqdm(range(0, len(order), batch_size), desc="score", unit="batch", disable=not progress):
        index = order[start:start + batch_size]
        batch = [list(prompts[i]) for i in index]
        width = max(map(len, batch))
        pads = [width - len(p) for p in batch]
        if seq2seq:
            ids = torch.tensor([p + [pad_token_id] * n for p, n in zip(batch, pads)], device=device)
            mask = torch.tensor([[1] * len(p) + [0] * n for p, n in zip(batch, pads)], device=device)
            start_id = model.config.decoder_start_token_id
            decoder = torch.full((len(batch), 1), pad_token_id if start_id is None else start_id, device=device)
            logits = model(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder).logits[:, 0]
        else:
            ids = torch.tensor([[pad_token_id] * n + p for p, n in zip(batch, pads)], device=device)
            mask = torch.tensor([[0] * n + [1] * len(p) for p, n in zip(batch, pads)], device=device)
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=1).logits[:, -1]
        out[index] = logits.index_select(-1, choices).float().cpu()
    return out


def answer_questions(model, tokenizer, subjects: Sequence[Subject], num_shots: int = 0, batch_size: int = 8,
                     max_length: int = -1, progress: bool = True) -> tuple[dict[str, list[str]], dict[str, list[int]]]:
    """The predicted letter of every question of every subject, {subject name: [letter, ...]}, and the
    number of solved examples its prompt really held, {subject name: [shots, ...]}: fewer than `num_shots`
    when the dev split has fewer (one fewer when it is the evaluated split) or the prompt would be too long."""
    choice_ids = choice_token_ids(tokenizer)
    limit = max_prompt_length(model, tokenizer, max_length)
    prompts, owners = [], []
    shots: dict[str, list[int]] = {s.name: [] for s in subjects}
    for subject in subjects:
        for question in subject.questions:
            ids, count = question_prompt(tokenizer, question, shots_for(question, subject, num_shots),
                                         subject.title, limit)
            prompts.append(ids)
            owners.append(subject.name)
            shots[subject.name].append(count)
    logits = letter_logits(model, prompts, choice_ids, tokenizer.pad_token_id, batch_size, progress)
    predictions: dict[str, list[str]] = {s.name: [] for s in subjects}
    for owner, best in zip(owners, logits.argmax(-1).tolist()):
        predictions[owner].append(LETTERS[best])
    return predictions, shots


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
