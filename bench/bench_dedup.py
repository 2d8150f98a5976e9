"""Near-duplicate removal benchmark (issue 2): quality and speed of prepare_data.py's MinHash step
(`utils/data/dedup.py`: MinHash LSH over character 5-gram shingles, rensa) against the character-SET MinHash
of ChatLM-mini-Chinese, on planted near-duplicates of real text.

    .venv/bin/python bench/bench_dedup.py            # about a minute on 2 cores
    .venv/bin/python bench/bench_dedup.py --quick    # seconds (smoke test; no docs)

Quality: the real documents (zhwiki articles and ChatLM-mini-Chinese pretraining pairs from ../shared,
at least 50 characters, as prepare_data.py's default --min_chars) are added to the index first; then
planted near-duplicates (a copy of a real document with 0.5 / 1 / 2 / 5 % of its characters substituted,
deleted or inserted) and "shuffled" documents (a real document's characters in a random order: a
different text with the same character set, which must be kept). A method flags a document when the
index already holds a near-duplicate of it. Speed: documents per second of signature + index, in one
process and with the signatures computed in a 2-process pool as prepare_data.py does.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import random
import re
import resource
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import rensa
from common import MixSpec, load_real_texts, log, markdown_table, mixed_documents, write_section

from utils.data.dedup import NearDuplicateIndex, minhash_signature  # noqa: E402

EDIT_RATES = (0.005, 0.01, 0.02, 0.05)
SHINGLE_SIZE, NUM_PERM, THRESHOLD, SEED = 5, 128, 0.8, 42  # config/prepare_data.yaml defaults
# ChatLM-mini-Chinese utils/functions.py DropDatasetDuplicate: keep only Han/ASCII letters/digits/_
# (its character class also keeps '[', '|'), MinHash over the single characters, LSH threshold 0.85,
# 256 permutations.
CHATLM_NON_CHAR = re.compile("[^[\u4E00-\u9FA5|A-Za-z_0-9]")
CHATLM_THRESHOLD, CHATLM_NUM_PERM = 0.85, 256


def ours_signature(text: str, shingle_size: int = SHINGLE_SIZE) -> rensa.RMinHash:
    return minhash_signature(text, shingle_size, NUM_PERM, SEED)


def ours_signature_3gram(text: str) -> rensa.RMinHash:
    return ours_signature(text, 3)


def chatlm_signature(text: str) -> rensa.RMinHash:
    """ChatLM's scheme (datasketch MinHash updated with each character) with rensa's MinHash: the
    signature depends only on the SET of characters (rensa is used because datasketch is not a
    dependency; the hashing scheme, threshold and permutations are ChatLM's)."""
    signature = rensa.RMinHash(num_perm=CHATLM_NUM_PERM, seed=SEED)
    signature.update(list("".join(CHATLM_NON_CHAR.split(text))))
    return signature


@dataclass(frozen=True)
class Method:
    name: str
    signature: Callable[[str], rensa.RMinHash]
    threshold: float
    num_perm: int

    def index(self):
        return (NearDuplicateIndex(self.threshold, self.num_perm, SEED) if self.signature is not chatlm_signature
                else rensa.RMinHashDeduplicator(threshold=self.threshold, num_perm=self.num_perm, use_lsh=True,
                                                       seed=SEED))


METHODS = [Method("ours: 5-gram shingles, LSH 0.8, 128 perm (utils/data/dedup.py)", ours_signature, THRESHOLD, NUM_PERM),
           Method("ChatLM-mini-Chinese: character set, LSH 0.85, 256 perm", chatlm_signature, CHATLM_THRESHOLD,
                  CHATLM_NUM_PERM),
           # Other settings of our step (prepare_data.py --dedup_threshold / --shingle_size), for tuning.
           Method("ours with --dedup_threshold 0.7", ours_signature, 0.7, NUM_PERM),
           Method("ours with --shingle_size 3", ours_signature_3gram, THRESHOLD, NUM_PERM),
           Method("ours with --shingle_size 3 --dedup_threshold 0.7", ours_signature_3gram, 0.7, NUM_PERM)]


def perturb(text: str, rate: float, alphabet: str, rng: random.Random) -> str:
    """`text` with round(rate * len) characters (at least one) substituted, deleted or inserted."""
    chars = list(text)
    for _ in range(max(1, round(rate * len(text)))):
        position = rng.randrange(len(chars))
        operation = rng.random()
        if operation < 0.5:
            chars[position] = rng.choice(alphabet)
        elif operation < 0.75 and len(chars) > 1:
            del chars[position]
        else:
            chars.insert(position, rng.choice(alphabet))
    return "".join(chars)


@dataclass(frozen=True)
class Doc:
    text: str
    kind: str  # original / near-dup / shuffled
    rate: float = 0.0


def build_documents(planted_per_rate: int, shuffled: int, max_originals: int | None) -> list[Doc]:
    rng = random.Random(SEED)
    originals = sorted({t.text for t in load_real_texts() if len(t.text) >= 50})
    rng.shuffle(originals)
    originals = originals[:max_originals] if max_originals else originals
    alphabet = "".join(sorted({c for t in originals for c in t if "\u4e00" <= c <= "\u9fa5"}))
    sources = rng.sample(originals, planted_per_rate * len(EDIT_RATES) + shuffled)
    variants = [Doc(perturb(text, EDIT_RATES[i % len(EDIT_RATES)], alphabet, rng), "near-dup",
                    EDIT_RATES[i % len(EDIT_RATES)]) for i, text in enumerate(sources[:-shuffled])]
    variants += [Doc("".join(rng.sample(text, len(text))), "shuffled") for text in sources[-shuffled:]]
    rng.shuffle(variants)
    return [Doc(t, "original") for t in originals] + variants


def flags(method: Method, docs: Sequence[Doc]) -> list[bool]:
    """True for each document the index rejects as a near-duplicate of an earlier one."""
    index = method.index()
    return [not index.add(str(i), method.signature(d.text)) for i, d in enumerate(docs)]


def quality_row(method: Method, docs: list[Doc], flagged: list[bool]) -> tuple[list[str], dict]:
    def share(kind: str, rate: float | None = None) -> float:
        picked = [f for d, f in zip(docs, flagged) if d.kind == kind and (rate is None or d.rate == rate)]
        return sum(picked) / max(len(picked), 1)

    true_pos = sum(f for d, f in zip(docs, flagged) if d.kind == "near-dup")
    false_pos = sum(f for d, f in zip(docs, flagged) if d.kind != "near-dup")
    planted = sum(d.kind == "near-dup" for d in docs)
    precision, recall = true_pos / max(true_pos + false_pos, 1), true_pos / max(planted, 1)
    row = [method.name, f"{precision:.3f}", f"{recall:.3f}", *(f"{share('near-dup', r):.3f}" for r in EDIT_RATES),
           f"{share('shuffled'):.3f}", f"{sum(f for d, f in zip(docs, flagged) if d.kind == 'original'):,}"]
    return row, {"precision": precision, "recall": recall, "shuffled_flagged": share("shuffled")}


def _signatures(texts: list[str]) -> list[rensa.RMinHash]:
    return [ours_signature(t) for t in texts]


def cpu_seconds() -> float:
    """CPU time of this process and its reaped children (the pool's workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def throughput(texts: list[str], processes: int) -> tuple[float, float]:
    """Documents per wall second and per CPU second of prepare_data's dedup work: signatures (in
    `processes` workers when > 1, batches of 64 as prepare_data.py sends them) and the LSH index in
    this process."""
    index = NearDuplicateIndex(THRESHOLD, NUM_PERM, SEED)
    batches = [texts[i:i + 64] for i in range(0, len(texts), 64)]
    start, cpu_start = time.perf_counter(), cpu_seconds()
    if processes == 1:
        for batch in batches:
            for text in batch:
                index.add(str(len(index)), ours_signature(text))
    else:
        with multiprocessing.get_context("fork").Pool(processes) as pool:
            key = 0
            for signatures in pool.imap(_signatures, batches, chunksize=1):
                for signature in signatures:
                    index.add(str(key), signature)
                    key += 1
    wall = time.perf_counter() - start
    return len(texts) / wall, len(texts) / (cpu_seconds() - cpu_start)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--planted_per_rate", type=int, default=400, help="Near-duplicates per edit rate.")
    parser.add_argument("--shuffled", type=int, default=1000, help="Shuffled-character documents.")
    parser.add_argument("--speed_docs", type=int, default=20000, help="Synthetic ~1,000-character documents "
                        "for the throughput table.")
    parser.add_argument("--quick", action="store_true", help="Small sizes, no docs/BENCHMARKS.md update.")
    args = parser.parse_args(argv)
    max_originals = None
    if args.quick:
        args.planted_per_rate, args.shuffled, args.speed_docs, max_originals = 10, 20, 500, 300

    docs = build_documents(args.planted_per_rate, args.shuffled, max_originals)
    counts = {kind: sum(d.kind == kind for d in docs) for kind in ("original", "near-dup", "shuffled")}
    log(f"{len(docs):,} documents: {counts}")
    rows, summary = [], {}
    for method in METHODS:
        start = time.perf_counter()
        flagged = flags(method, docs)
        row, summary[method.name] = quality_row(method, docs, flagged)
        rows.append(row)
        log(f"{method.name}: {time.perf_counter() - start:.1f} s")
    quality = markdown_table(["method", "precision", "recall", *(f"recall @{r:.1%} edits" for r in EDIT_RATES),
                              "shuffled flagged", "originals flagged"], rows)
    print(quality)

    real_texts = [d.text for d in docs]
    spec = MixSpec(seed=7)
    synthetic = [doc for doc, _ in zip(mixed_documents([d.text for d in docs if d.kind == "original"], spec),
                                       range(args.speed_docs))]
    speed_rows = []
    for label, texts in (("real documents of the quality test", real_texts),
                         ("synthetic ~1,000-character documents", synthetic)):
        mean_chars = sum(map(len, texts)) / len(texts)
        for processes in (1, 2):
            load = os.getloadavg()[0]
            docs_s, docs_cpu_s = throughput(texts, processes)
            log(f"{label}, {processes} process(es): {docs_s:,.0f} docs/s, {docs_cpu_s:,.0f} docs per CPU-s")
            speed_rows.append([label, f"{len(texts):,}", f"{mean_chars:,.0f}", processes, f"{docs_s:,.0f}",
                               f"{docs_s * mean_chars / 1e6:.2f}", f"{docs_cpu_s:,.0f}", f"{load:.1f}"])
    speed = markdown_table(["documents", "count", "mean chars", "processes", "docs/s", "Mchars/s",
                            "docs per CPU-s", "load avg"], speed_rows)
    print(speed)
    if args.quick:
        return

    ours, chatlm = summary[METHODS[0].name], summary[METHODS[1].name]
    best = max(float(r[4].replace(",", "")) for r in speed_rows if r[0].startswith("synthetic"))
    single = next(float(r[4].replace(",", "")) for r in speed_rows if r[0].startswith("synthetic") and r[3] == 1)
    pooled = next(float(r[4].replace(",", "")) for r in speed_rows if r[0].startswith("synthetic") and r[3] == 2)
    pool_note = (f"With 2 processes this step alone is slower ({pooled:,.0f} vs {single:,.0f} docs/s): shipping "
                 "the signatures back from the pool costs more than computing them; the pool pays for itself "
                 "in prepare_data.py only through the other per-document work its workers do (extraction, "
                 "t2s, normalisation) - not measured here." if pooled < single else "")
    per_cpu = next(float(r[6].replace(",", "")) for r in speed_rows if r[0].startswith("synthetic") and r[3] == 1)
    body = f"""
What it measures: the near-duplicate step of `prepare_data.py` (`utils/data/dedup.py`: rensa MinHash LSH over
character {SHINGLE_SIZE}-gram shingles of the text without whitespace, threshold {THRESHOLD}, {NUM_PERM}
permutations, the `config/prepare_data.yaml` defaults) against ChatLM-mini-Chinese's `DropDatasetDuplicate`
(MinHash updated with each single character after dropping punctuation, i.e. a signature of the character
*set*; LSH threshold {CHATLM_THRESHOLD}, {CHATLM_NUM_PERM} permutations; computed here with rensa instead of
datasketch, same scheme).

Data: {counts['original']:,} real documents (zhwiki articles and ChatLM-mini-Chinese pretraining pairs of
`../shared/data`, >= 50 characters, exact duplicates removed) indexed first, then in random order
{counts['near-dup']:,} planted near-duplicates ({args.planted_per_rate} per edit rate: a copy of a real document
with that share of its characters substituted, deleted or inserted, at least one) and {counts['shuffled']:,}
shuffled documents (a real document's characters in random order: same character set, different text, so
NOT a duplicate). Precision = flagged near-duplicates / all flagged documents; recall = flagged / planted
near-duplicates; "originals flagged" are real documents flagged against an earlier real one (the real data
may hold genuine near-duplicates; both methods see the same ones).

{quality}

Throughput of our dedup step on this machine (signature + LSH index insert/query; with 2 processes the
signatures are computed in a fork pool in batches of 64 as `prepare_data.py` does, the index stays in the
main process). The synthetic documents are slices of the real text glued to about the length of a cleaned
zhwiki article. The machine is shared with other engineers' tests ("load avg" = 1-minute load average of
the 2 cores when the row started), so the docs/s (wall clock) figures are lower bounds; "docs per CPU-s" is
the work per CPU second (this process + its pool workers), which other jobs do not disturb.

{speed}

Reading: ours keeps shuffled-character documents ({ours['shuffled_flagged']:.1%} flagged vs
{chatlm['shuffled_flagged']:.1%} for the character-set scheme) at precision {ours['precision']:.3f} vs
{chatlm['precision']:.3f}; recall {ours['recall']:.3f} vs {chatlm['recall']:.3f} overall; 5-gram shingles
stop seeing a copy as a near-duplicate once edits push its shingle Jaccard below the threshold (see the
recall by edit rate). Throughput goal (issue 2): >= 5,000 docs/s on this 2-core machine: measured
{best:,.0f} docs/s wall-clock on ~1,000-character documents under the load above
({'met' if best >= 5000 else 'NOT met as measured'}); one process does {per_cpu:,.0f} documents per CPU second, so an
idle core alone would reach about that ({'above' if per_cpu >= 5000 else 'below'} the goal). Reference:
Baby-Llama2-Chinese's ~250 docs/s. {pool_note}
The last rows of the quality table show how `--dedup_threshold` and `--shingle_size` trade recall of
heavier edits against keeping distinct documents (the defaults are the first row).
"""
    write_section("bench_dedup.py", "Near-duplicate removal (MinHash): quality and speed", ["rensa"], body)
    log("wrote the bench_dedup.py section of docs/BENCHMARKS.md")


if __name__ == "__main__":
    sys.exit(main())
