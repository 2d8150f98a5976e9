"""Smoke test of the benchmarks in bench/: each runs end to end with `--quick` (tiny sizes, real data from
../shared, no docs/BENCHMARKS.md update). Benchmarks are never timed here; their figures are in
docs/BENCHMARKS.md. bench_pretrain.py --quick takes longer than this file's budget and is not run here."""

from __future__ import annotations

import json
import sys

import pytest
from conftest import REPO, shared_path

sys.path.insert(0, str(REPO / "bench"))


@pytest.fixture(autouse=True)
def shared_data(monkeypatch):
    monkeypatch.setenv("ZHLM_SHARED_DATA", str(shared_path("")))
    monkeypatch.setenv("ZHLM_SHARED_ANCHORS", str(shared_path("", "ZHLM_SHARED_ANCHORS")))


def test_bench_dedup_quick_keeps_shuffled_documents(capsys):
    import bench_dedup

    bench_dedup.main(["--quick"])
    out = capsys.readouterr().out
    ours = next(line for line in out.splitlines() if line.startswith("| ours"))
    chatlm = next(line for line in out.splitlines() if line.startswith("| ChatLM"))
    shuffled = lambda row: float(row.split("|")[-3])  # noqa: E731
    assert shuffled(ours) == 0.0  # 5-gram shingles see word order
    assert shuffled(chatlm) > 0.5  # a character-set signature cannot
    assert "docs/s" in out


def test_bench_tokenizer_quick_measures_and_scores():
    import bench_tokenizer
    from common import WORK

    bench_tokenizer.main(["--quick"])
    results = json.loads((WORK / "tokenizer_quick" / "results.json").read_text())
    assert len(results["runs"]) == 2 and all(r["peak_rss_mb"] > 0 and r["wall_s"] > 0 for r in results["runs"])
    budgeted = results["runs"][1]
    assert budgeted["train_chars"] < budgeted["chars"]  # the budget made it sample
    assert [s["name"] for s in results["scores"]][1:] == ["chatlm_mini_chinese_tokenizer", "chatglm2_tokenizer"]
    assert results["scores"][0]["unk_rate"] == 0.0
