"""Evaluate a trained model: C-Eval / CMMLU accuracy, bits per character, generation BLEU / ROUGE-L and
repetition (share of repeated 4-grams, distinct-1/2), triple extraction F1; or plot a run's training curves.

    python eval_model.py --task ceval cmmlu --ceval_data ../shared/data/ceval --cmmlu_data ../shared/data/cmmlu \
        --cmmlu_split dev --num_shots 5                     # model_save by default
    python eval_model.py --model_name_or_path model_save/sft --task bpc --bpc_files data/corpus
    python eval_model.py --task bpc --bpc_files held_out_zh_tw.jsonl --opencc_config tw2sp    # traditional text
    python eval_model.py --task generation --generation_files data/sft/test.jsonl
    python eval_model.py --task triples --triples_files data/ie/test.json
    python eval_model.py report --run_dir model_save/sft      # loss / eval loss / learning-rate PNGs

Results are merged into `<output_dir>/eval_results.json` (default output_dir: `<model>/eval`) and
printed as markdown tables (also saved as `eval_results.md`). Runs on one GPU if there is one, else CPU.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from model.evaluation.benchmarks import BENCHMARKS, answer_questions, choice_accuracy, load_benchmark, shots_label
from model.evaluation.metrics import bits_per_character, reply_to_prompts, text_metrics, triple_scores
from model.evaluation.plots import find_trainer_state, plot_training
from model.evaluation.report import results_markdown
from model.inference.generation import InferenceArguments, load_for_inference
from utils.cli import run_main
from utils.config import parse_config, recipe_path
from utils.hub import missing_path
from utils.io import check_writable, write_json_atomic, write_text_atomic
from utils.logging import setup_logging

logger = logging.getLogger("evaluate")
TASKS = ("ceval", "cmmlu", "bpc", "generation", "triples")


@dataclass
class EvalArguments(InferenceArguments):
    task: list[str] = field(default_factory=lambda: ["ceval"], metadata={
        "help": f"One or more of: {', '.join(TASKS)}."})
    output_dir: str | None = field(default=None, metadata={
        "help": "Where eval_results.json / .md go (merged with earlier results); default <model>/eval."})
    ceval_data: str = field(default="ceval/ceval-exam", metadata={
        "help": "C-Eval: directory of the official CSVs (dev/, val/, subject_mapping.json) or, with "
                "HF_HUB_OFFLINE=0, the hub dataset name."})
    ceval_split: str = field(default="val", metadata={"help": "C-Eval split to score (test answers are hidden)."})
    ceval_subjects: list[str] = field(default_factory=list, metadata={"help": "C-Eval subjects; empty = all."})
    cmmlu_data: str = field(default="haonan-li/cmmlu", metadata={
        "help": "CMMLU: directory of the official CSVs (dev/, test/, subject_mapping.json) or, with "
                "HF_HUB_OFFLINE=0, the hub dataset name."})
    cmmlu_split: str = field(default="test", metadata={
        "help": "CMMLU split to score. With 'dev', k-shot examples are the other dev questions (leave-one-out)."})
    cmmlu_subjects: list[str] = field(default_factory=list, metadata={"help": "CMMLU subjects; empty = all."})
    num_shots: int = field(default=0, metadata={
        "help": "Solved dev-split examples before each question (0 = zero-shot; fewer if the dev split has fewer "
                "or the prompt is too long: the results give the numbers that ran). A subject without dev "
                "examples is refused."})
    max_questions: int = field(default=-1, metadata={"help": "Questions per subject; -1 = all."})
    bpc_files: list[str] = field(default_factory=list, metadata={
        "help": ".txt/.jsonl/.parquet files with a 'text' column, or prepare_data.py output dirs (their "
                "validation shards)."})
    bpc_block_size: int = field(default=-1, metadata={
        "help": "Tokens per window (decoder) / chunk (T5); -1 = the model's context length."})
    bpc_stride: int = field(default=-1, metadata={
        "help": "Decoder windows advance by this many tokens (each token scored once); -1 = half the block."})
    opencc_config: str = field(default="t2s", metadata={
        "help": "OpenCC profile applied to the bpc text first, as prepare_data.py --opencc_config does to the "
                "corpus (t2s, tw2sp, hk2s ...); 'none' = score the text as it is."})
    generation_files: list[str] = field(default_factory=list, metadata={
        "help": "Files with 'prompt' and 'response' columns for BLEU-4 / ROUGE-L."})
    triples_files: list[str] = field(default_factory=list, metadata={
        "help": "Files with 'prompt' and 'response' columns, responses as [(s,r,o),(s,r,o)]."})
    max_examples: int = field(default=-1, metadata={"help": "Rows of generation / triples files; -1 = all."})
    max_new_tokens: int = field(default=256, metadata={"help": "Longest reply (tokens) for generation / triples."})
    num_beams: int = field(default=1, metadata={"help": "Beam search width for generation / triples (1 = greedy)."})
    max_length: int = field(default=-1, metadata={
        "help": "Longest multiple-choice prompt (tokens); -1 = the model's context length."})
    batch_size: int = field(default=8, metadata={"help": "Prompts / windows per forward pass."})

    def __post_init__(self):
        super().__post_init__()
        unknown = [t for t in self.task if t not in TASKS]
        if unknown or not self.task:
            raise ValueError(f"--task takes {', '.join(TASKS)}, not '{' '.join(unknown)}'")
        needs = {"bpc": "bpc_files", "generation": "generation_files", "triples": "triples_files"}
        for task, files in needs.items():
            if task in self.task and not getattr(self, files):
                raise ValueError(f"--task {task} needs --{files}")
        if self.num_shots < 0 or self.batch_size < 1:
            raise ValueError("--num_shots must be >= 0 and --batch_size >= 1")


@dataclass
class ReportArguments:
    run_dir: str = field(default="model_save", metadata={
        "help": "A training output directory (its trainer_state.json or that of its latest checkpoint)."})
    output_dir: str | None = field(default=None, metadata={"help": "Where the PNGs go; default <run_dir>/plots."})


def load_rows(files: Sequence[str], limit: int, field: str) -> tuple[list[str], list[str]]:
    from utils.examples.pretrain_data import load_text_files

    data, _ = load_text_files(list(files), "validation", ["prompt", "response"], field)
    if limit > 0:
        data = data.select(range(min(limit, len(data))))
    return [str(p) for p in data["prompt"]], [str(r) for r in data["response"]]


def load_task_data(task: str, args: EvalArguments):
    """The task's questions or rows, read (and checked) before the model is loaded."""
    if task in BENCHMARKS:
        subjects = load_benchmark(getattr(args, f"{task}_data"), getattr(args, f"{task}_split"),
                                  getattr(args, f"{task}_subjects"), task=task, num_shots=args.num_shots)
        if args.max_questions > 0:
            for subject in subjects:
                subject.questions = subject.questions[:args.max_questions]
        return subjects
    if task == "bpc":  # tokenised with the model's tokenizer; a missing file is refused before any task runs
        missing = next((name for name in args.bpc_files if not Path(name).exists()), None)
        if missing is not None:
            raise missing_path(missing, "bpc_files", "pass text / jsonl / parquet files or prepare_data.py output "
                                                     "folders")
        return None
    return load_rows(getattr(args, f"{task}_files"), args.max_examples, f"{task}_files")


def run_task(task: str, args: EvalArguments, data, model, tokenizer) -> dict:
    if task in BENCHMARKS:
        split = getattr(args, f"{task}_split")
        logger.info("%s: %d subjects, %d questions (%s split), %d-shot asked", task, len(data),
                    sum(len(s.questions) for s in data), split, args.num_shots)
        predictions, shots = answer_questions(model, tokenizer, data, args.num_shots, args.batch_size,
                                              args.max_length)
        result = {"source": getattr(args, f"{task}_data"), "split": split, "shots_asked": args.num_shots,
                  **choice_accuracy(data, predictions, shots)}
        short = {name: shots_label(s) for name, s in result["subjects"].items()
                 if s["shots_min"] < args.num_shots}
        if short:
            logger.warning("%s: %d-shot asked, but %d of %d subjects had fewer examples before some questions "
                           "(dev split smaller, the question itself left out, or the prompt too long): %s", task,
                           args.num_shots, len(short), len(data), ", ".join(f"{n} {x}" for n, x in short.items()))
        return result
    if task == "bpc":
        return bits_per_character(model, tokenizer, args.bpc_files, block_size=args.bpc_block_size,
                                  stride=args.bpc_stride, batch_size=args.batch_size, opencc_config=args.opencc_config)
    prompts, references = data
    replies = reply_to_prompts(model, tokenizer, prompts, args.max_new_tokens, args.num_beams, args.batch_size)
    scores = text_metrics(replies, references) if task == "generation" else triple_scores(replies, references)
    samples = [{"prompt": p, "reference": r, "reply": y} for p, r, y in list(zip(prompts, references, replies))[:5]]
    return {**scores, "files": list(getattr(args, f"{task}_files")), "samples": samples}


def report(argv: Sequence[str]) -> list[Path]:
    (args,) = parse_config([ReportArguments], argv, description=__doc__)
    state = find_trainer_state(args.run_dir)
    written = plot_training(state, args.output_dir or Path(args.run_dir) / "plots")
    logger.info("plotted %s -> %s", state, ", ".join(map(str, written)))
    return written


def main(argv: Sequence[str] | None = None) -> dict | list[Path]:
    setup_logging()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["report"]:
        return report(argv[1:])
    (args,) = parse_config([EvalArguments], argv, default_recipe=recipe_path("evaluate"), description=__doc__)
    tasks = list(dict.fromkeys(args.task))
    output = Path(args.output_dir or Path(args.model_name_or_path) / "eval")
    check_writable(output, "output_dir")  # before the tasks, which may run for hours
    data = {task: load_task_data(task, args) for task in tasks}
    model, tokenizer = load_for_inference(args.model_name_or_path, args.device, args.dtype)
    logger.info("model %s (%s) on %s", args.model_name_or_path, type(model).__name__, model.device)
    results = {}
    for task in tasks:
        began = time.perf_counter()
        results[task] = {**run_task(task, args, data[task], model, tokenizer),
                         "seconds": round(time.perf_counter() - began, 2)}
    merged = _previous_results(output / "eval_results.json", args.model_name_or_path)
    merged.update(model=args.model_name_or_path, results={**merged.get("results", {}), **results})
    write_json_atomic(output / "eval_results.json", merged)
    table = results_markdown(merged["results"])
    write_text_atomic(output / "eval_results.md", f"# Evaluation of {args.model_name_or_path}\n\n{table}")
    print(results_markdown(results))
    logger.info("results -> %s", output / "eval_results.json")
    return results


def _previous_results(path: Path, model: str) -> dict:
    """Earlier results of the same model in this output directory (other tasks are kept)."""
    import json

    try:
        previous = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return previous if isinstance(previous, dict) and previous.get("model") == model else {}


if __name__ == "__main__":
    run_main(main)
