"""Corpus preparation: Wikipedia dump / wikiextractor output / jsonl / parquet / txt -> clean parquet shards.

    python prepare_data.py --input data/raw/zhwiki-latest-pages-articles.xml.bz2 --output_dir data/corpus
    python prepare_data.py --config config/demo/prepare_data.yaml      # the demo corpus
    python prepare_data.py --executor slurm --slurm_partition cpu --tasks 256 --workers 64 --input /shared/corpus ...
    RAY_ADDRESS=HEAD:6379 python prepare_data.py --executor ray --tasks 256 --input /shared/corpus ...

Get the dump from https://dumps.wikimedia.org/zhwiki/latest/zhwiki-latest-pages-articles.xml.bz2
(about 2.7 GB). Steps: wikiextractor -> OpenCC t2s -> normalisation -> quality filters -> MinHash
near-duplicate removal -> shuffled `train-*.parquet` / `validation-*.parquet` shards with a `text`
column, plus `stats.json` (documents and characters in/out and seconds per step) and `config.yaml`.
`--executor local|slurm|ray` runs the same stage as a datatrove pipeline (same documents and shards) on this
machine, a Slurm cluster or a Ray cluster: docs/CORPUS_AT_SCALE.md.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

from utils.cli import run_main
from utils.config import already_made, parse_config, recipe_path, save_config
from utils.data.corpus import CleaningArguments, DedupArguments, InputArguments, OutputArguments, prepare_corpus
from utils.data.executors import ExecutorArguments, run_corpus_stage
from utils.io import atomic_output_dir
from utils.logging import setup_logging

logger = logging.getLogger("prepare_data")


def main(argv: Sequence[str] | None = None) -> dict | None:
    setup_logging()
    inputs, cleaning, dedup, outputs, executor = parse_config(
        [InputArguments, CleaningArguments, DedupArguments, OutputArguments, ExecutorArguments], argv,
        default_recipe=recipe_path("prepare_data"), description=__doc__)
    if not outputs.overwrite_output_dir and already_made(outputs.output_dir, inputs, cleaning, dedup, outputs,
                                                         inputs=inputs.input):
        return json.loads((Path(outputs.output_dir) / "stats.json").read_text(encoding="utf-8"))
    if executor.executor != "builtin":  # a datatrove pipeline; submitted to Slurm, it returns None at once
        return run_corpus_stage(executor, inputs, cleaning, dedup, outputs)
    with atomic_output_dir(outputs.output_dir, outputs.overwrite_output_dir) as workdir:
        report = prepare_corpus(inputs, cleaning, dedup, outputs, workdir)
        save_config(workdir, inputs, cleaning, dedup, outputs)
    logger.info("wrote %d documents (%s characters) in %d shards to %s", report["documents"],
                f"{report['characters']:,}", len(report["shards"]), outputs.output_dir)
    return report


if __name__ == "__main__":
    run_main(main)
