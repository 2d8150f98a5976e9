"""The results of `eval_model.py` as markdown tables (printed, and saved as `eval_results.md`)."""

from __future__ import annotations

from model.evaluation.benchmarks import BENCHMARKS, shots_label
from model.evaluation.metrics import traditional_warning


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
            lines += ["### generation (character level)", "",
                      "| examples | BLEU-4 | ROUGE-L | repeated 4-grams | distinct-1 | distinct-2 |",
                      "|---:|---:|---:|---:|---:|---:|",
                      f"| {result['examples']} | {result['bleu4']:.2f} | {result['rougeL']:.2f} | "
                      f"{100 * result['repeated_4gram']:.1f}% | {result['distinct_1']:.3f} | "
                      f"{result['distinct_2']:.3f} |"]
        elif task == "triples":
            lines += ["### triple extraction", "", "| examples | precision | recall | F1 | exact match |",
                      "|---:|---:|---:|---:|---:|",
                      f"| {result['examples']} | {100 * result['precision']:.2f}% | {100 * result['recall']:.2f}% | "
                      f"{100 * result['f1']:.2f}% | {100 * result['exact_match']:.2f}% |"]
        lines.append("")
    return "\n".join(lines)
