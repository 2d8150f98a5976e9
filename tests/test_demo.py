"""End to end, the way `make demo` runs it: the demo recipes, chained through their output directories."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
from conftest import REPO, run_script
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer


def test_demo_pipeline(tmp_path):
    corpus, tokenizer_dir = tmp_path / "corpus", tmp_path / "tokenizer"
    result = run_script("prepare_data.py", "--config", "config/demo/prepare_data.yaml",
                        "--output_dir", str(corpus))
    assert "corpus statistics" in result.stderr
    stats = json.loads((corpus / "stats.json").read_text())
    assert stats["dropped"].get("near_duplicate", 0) >= 2  # the demo dump plants near-duplicates
    assert stats["dropped"].get("too_short", 0) >= 1        # and stubs
    assert stats["steps"]["extract"]["docs_in"] >= 40       # redirects and other namespaces skipped

    run_script("train_tokenizer.py", "--config", "config/demo/tokenizer.yaml", "--input", str(corpus),
               "--output_dir", str(tokenizer_dir))
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    assert len(tokenizer) % 64 == 0
    text = pq.read_table(next(corpus.glob("validation-*.parquet"))).column("text")[0].as_py()
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text and tokenizer.unk_token_id not in ids
    assert len(ids) < len(text)  # it compresses held-out demo text
    report = json.loads((tokenizer_dir / "tokenizer_report.json").read_text())
    assert report["scores"][0]["unk_rate"] == 0.0

    pretrain = tmp_path / "pretrain"
    result = run_script("pre_train.py", "--config", "config/demo/pretrain.yaml", "--tokenizer_name_or_path",
                        str(tokenizer_dir), "--train_files", str(corpus), "--output_dir", str(pretrain),
                        "--max_steps", "40", "--eval_steps", "20", "--save_steps", "20")
    assert "step 40/40" in result.stderr
    summary = json.loads((pretrain / "training_summary.json").read_text())
    assert summary["objective"] == "span_corruption" and summary["eval_span_bpc"] > 0
    model = AutoModelForSeq2SeqLM.from_pretrained(pretrain)
    assert model.config.d_model == 256  # the demo-size T5 of config/models/t5-demo.yaml
    assert (REPO / "config/demo/pretrain.yaml").exists()
