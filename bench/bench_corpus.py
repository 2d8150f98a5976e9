"""The corpus stage at dump scale (issue 13): `prepare_data.py` on a MediaWiki `pages-articles` .xml.bz2 built
from the real pages of ../shared/data at several sizes, and on chinese-poetry; then pre_train.py's tokenisation
of a corpus into its memory-mapped token file, and a restart that reuses it.

    .venv/bin/python -m bench.bench_corpus                     # 30, 100, 300, 1000 MB dumps (~25 min, 2 cores)
    .venv/bin/python -m bench.bench_corpus --sizes_mb 10 30 90   # smaller, for a quick look at the growth
    .venv/bin/python -m bench.bench_corpus --quick              # seconds, no docs update

The dump: the <siteinfo> and the 33 pages of zhwiki_xml/zhwiki-test-pages.xml (real wikitext: templates,
<ref>, conversion markup; 23 articles, the rest project pages and redirects, skipped as in a real dump) and
the 80 articles of zhwiki_text (plain text, which is valid wikitext) are recombined page by page: a source page,
a random run of its sections (the lead first 70% of the time), 30% of the time followed by sections of a second
source page; then every Han character of the page (title included) is replaced through a permutation of the
Han alphabet drawn for that page (characters of namespace names such as 模块 excepted, so links keep their
meaning). Markup, lengths, digits, Latin text and the character frequencies stay real; each page's text is
new, so near-duplicate removal keeps nearly every page. Each run is measured from outside: wall time, peak RSS
of the whole process tree (psutil, sampled every 0.2 s), the output folder's peak disk use; per-step figures
come from the run's stats.json (step seconds are summed over the worker processes: per-process rates).
"""

from __future__ import annotations

import argparse
import bz2
import json
import os
import random
import re
import shutil
import statistics
import sys
from pathlib import Path
from xml.sax.saxutils import escape

import numpy as np

from bench.corpora import WIKI_DOC, WIKI_JSONL, WIKI_XML, poetry_package, shared_path
from bench.harness import (
    PYTHON,
    WORK,
    folder_bytes,
    log,
    markdown_table,
    recorded_run,
    run_command,
    timed,
    write_section,
)
from utils.data.sources import read_records

DUMP_SEED = 13
TITLE = "The corpus stage at dump scale: prepare_data.py and tokenisation"
MAIN_PROCESS_STEPS = ("read", "dedup", "write")  # the steps of stats.json the main process runs
PACKAGES = ["wikiextractor", "opencc", "rensa", "pyarrow", "tokenizers", "datasets"]
_PAGE = re.compile(r"  <page>.*?</page>\n", re.DOTALL)
_TEXT = re.compile(r'(<text xml:space="preserve"[^>]*>)(.*?)(</text>)', re.DOTALL)
_TITLE = re.compile(r"<title>(.*?)</title>")
_SECTION = re.compile(r"\n(?===[^=])")


# ------------------------------------------------------------------------------------------- the dump

def source_pages() -> tuple[str, list[str], list[str]]:
    """The dump header, the real pages as XML (<page> elements) and the plain-text articles as XML pages."""
    xml = shared_path(WIKI_XML).read_text(encoding="utf-8")
    header = xml[:xml.index("  <page>")]
    pages = _PAGE.findall(xml)
    template = next(p for p in pages if "<ns>0</ns>" in p and "<redirect" not in p)
    texts = []
    for name in (WIKI_JSONL, WIKI_DOC):
        for record, _ in read_records(shared_path(name)):
            title, body = f"<title>{escape(record.title or 'x')}</title>", escape(record.text)
            page = _TITLE.sub(lambda _, title=title: title, template, count=1)
            texts.append(_TEXT.sub(lambda m, body=body: m.group(1) + body + m.group(3), page, count=1))
    return header, pages, texts


class Recombiner:
    """Endless seeded stream of new <page> elements made from the source pages (see the module docstring)."""

    def __init__(self, header: str, pages: list[str], seed: int = DUMP_SEED):
        self.pages, self.rng = pages, random.Random(seed)
        self.sections = [_SECTION.split(_TEXT.search(p).group(2)) if _TEXT.search(p) else [""] for p in pages]
        protected = {c for name in re.findall(r"<namespace[^>]*>([^<]*)</namespace>", header) for c in name}
        han = sorted({c for p in pages for c in p if "\u4e00" <= c <= "\u9fff"} - protected)
        self.alphabet = np.array([ord(c) for c in han], dtype=np.uint32)
        self.np_rng = np.random.default_rng(seed)
        self.count = 0

    def __iter__(self):
        return self

    def __next__(self) -> str:
        self.count += 1
        first = self.rng.randrange(len(self.pages))
        text = self._run(first, lead=self.rng.random() < 0.7)
        if self.rng.random() < 0.3:
            text += "\n" + self._run(self.rng.randrange(len(self.pages)), lead=False)
        page = _TEXT.sub(lambda m: m.group(1) + text + m.group(3), self.pages[first], count=1)
        page = _TITLE.sub(lambda m: f"<title>{m.group(1)} {self.count}</title>", page, count=1)
        page = re.sub(r"<id>\d+</id>", f"<id>{self.count}</id>", page, count=1)
        return self._permute(page)

    def _run(self, index: int, lead: bool) -> str:
        sections = self.sections[index]
        start = 0 if lead or len(sections) == 1 else self.rng.randrange(1, len(sections))
        stop = self.rng.randint(start + 1, len(sections))
        return "\n".join(sections[start:stop])

    def _permute(self, page: str) -> str:
        lookup = np.arange(0x10000, dtype=np.uint32)
        lookup[self.alphabet] = self.alphabet[self.np_rng.permutation(len(self.alphabet))]
        codes = np.frombuffer(page.encode("utf-32-le"), dtype=np.uint32)
        mapped = np.where(codes < 0x10000, lookup[np.minimum(codes, 0xFFFF)], codes)
        return mapped.astype(np.uint32).tobytes().decode("utf-32-le")


def build_dump(size_mb: float, seed: int = DUMP_SEED) -> dict:
    """bench/_work/corpus/zhwiki-recombined-{size}MB.xml.bz2 of `size_mb` MB of XML (uncompressed), pages drawn
    with `seed` (dumps of other seeds share no page); reused when it exists (its sizes recorded beside it)."""
    name = f"zhwiki-recombined-{size_mb:g}MB" + ("" if seed == DUMP_SEED else f"-seed{seed}")
    path = WORK / "corpus" / f"{name}.xml.bz2"
    info_path = path.with_suffix(".json")
    if path.exists() and info_path.exists():
        return json.loads(info_path.read_text())
    path.parent.mkdir(parents=True, exist_ok=True)
    header, pages, texts = source_pages()
    recombiner = Recombiner(header, pages + texts, seed)
    size, count = 0, 0
    tmp = path.with_suffix(".tmp")
    with timed() as building, bz2.open(tmp, "wt", encoding="utf-8") as handle:
        handle.write(header)
        while size < size_mb * 1e6:
            page = next(recombiner)
            handle.write(page)
            size, count = size + len(page.encode("utf-8")), count + 1
        handle.write("</mediawiki>\n")
    tmp.rename(path)
    info = {"path": str(path), "pages": count, "xml_bytes": size, "bz2_bytes": path.stat().st_size,
            "build_s": round(building.wall_s, 1)}
    info_path.write_text(json.dumps(info))
    log(f"built {path.name}: {count:,} pages, {size / 1e6:,.0f} MB XML, {info['bz2_bytes'] / 1e6:,.0f} MB bz2 "
        f"({info['build_s']} s)")
    return info


# ------------------------------------------------------------------------------------------ measuring

def prepare(inputs: list[str], output: Path, num_proc: int, extra: list[str], label: str) -> dict:
    output.parent.mkdir(parents=True, exist_ok=True)
    command = [PYTHON, "prepare_data.py", "--config", "none", "--input", *inputs, "--output_dir", str(output),
               "--overwrite_output_dir", "true", "--num_proc", str(num_proc), *extra]
    log(f"{label}: prepare_data.py --num_proc {num_proc}")
    measured = run_command(command, WORK / "logs" / f"{output.name}.log", timeout_s=3600, sample_tree=True,
                           watch=output.parent).figures()
    stats = json.loads((output / "stats.json").read_text())
    measured.update(stats=stats, output_mb=folder_bytes(output) / 1e6, num_proc=num_proc, label=label)
    log(f"  {measured['wall_s']:.0f} s, peak RSS {measured['peak_tree_mb']:,.0f} MB (tree), "
        f"PSS {measured['peak_pss_mb']:,.0f} MB, main {measured['peak_main_mb']:,.0f} MB, "
        f"{stats['documents']:,} documents kept")
    return measured


def worker_seconds(run: dict) -> float:
    """Step seconds of a prepare_data.py run spent in the worker processes (summed over them)."""
    return sum(row["seconds"] for step, row in run["stats"]["steps"].items() if step not in MAIN_PROCESS_STEPS)


def step_rows(run: dict) -> list[list[str]]:
    rows = []
    for step, row in run["stats"]["steps"].items():
        if not row["docs_in"] or step == "read":
            continue
        seconds = max(row["seconds"], 1e-9)
        rows.append([run["label"], run["num_proc"], step, f"{row['docs_in']:,}", f"{row['docs_out']:,}",
                     f"{row['seconds']:,.1f}", f"{row['docs_in'] / seconds:,.0f}",
                     f"{row['chars_in'] / seconds / 1e6:,.2f}"])
    return rows


TOKENIZE = """
import json, logging, os, sys
os.environ["HF_DATASETS_CACHE"] = sys.argv[3] + "/hf-datasets"  # the map's Arrow cache, counted as disk
logging.basicConfig(level=logging.INFO)
from pathlib import Path
from transformers import AutoTokenizer
from bench.harness import timed
from utils.examples.pretrain_data import TokenStream
tokenizer = AutoTokenizer.from_pretrained(sys.argv[2])
with timed() as building:
    stream = TokenStream.build([sys.argv[1]], "train", tokenizer, Path(sys.argv[3]), int(sys.argv[4]))
print(json.dumps({"seconds": building.wall_s, **stream.meta}))
"""


def tokenisation(corpus: Path, label: str, workers: int) -> list[dict]:
    """Train a small tokenizer on the corpus once, then tokenise it into pre_train.py's token cache twice
    (the second run is a restart that must reuse the cache)."""
    tokenizer = WORK / "corpus" / "tokenizer-8k"
    if not (tokenizer / "tokenizer.json").exists():
        run_command([PYTHON, "train_tokenizer.py", "--config", "none", "--input", str(corpus), "--vocab_size",
                     "8000", "--output_dir", str(tokenizer), "--max_train_chars", "20000000"],
                    WORK / "logs" / "tokenizer-8k.log")
    cache = WORK / "corpus" / f"token-cache-{label.replace(' ', '')}-w{workers}"
    shutil.rmtree(cache, ignore_errors=True)
    runs = []
    for attempt in ("first run", "restart"):
        log_path = WORK / "logs" / f"tokenize-{label.replace(' ', '')}-w{workers}-{attempt.replace(' ', '_')}.log"
        measured = run_command([PYTHON, "-c", TOKENIZE, str(corpus), str(tokenizer), str(cache), str(workers)],
                               log_path, timeout_s=3600, sample_tree=True).figures()
        result = json.loads(log_path.read_text().strip().splitlines()[-1])
        measured.update(result, attempt=attempt, workers=workers, label=label, corpus_mb=folder_bytes(corpus) / 1e6,
                        token_file_mb=sum(f.stat().st_size for f in cache.glob("*.bin")) / 1e6,
                        datasets_cache_mb=folder_bytes(cache / "hf-datasets") / 1e6,
                        reused="reusing tokenised" in log_path.read_text())
        log(f"tokenise {label} ({attempt}, {workers} workers): {measured['wall_s']:.1f} s, "
            f"{result['tokens']:,} tokens, peak {measured['peak_tree_mb']:,.0f} MB")
        runs.append(measured)
    return runs


def decontamination_cost(sizes_mb: list[float], num_proc: int, repeats: int = 3) -> dict:
    """prepare_data.py without and with `--decontaminate` (C-Eval, CMMLU) on the second-smallest dump,
    interleaved `repeats` times, so that the machine's drift falls on both alike."""
    size = sorted(sizes_mb)[min(1, len(sizes_mb) - 1)]
    info = build_dump(size)
    flags = ["--decontaminate", str(shared_path("ceval")), str(shared_path("cmmlu"))]
    runs: dict[str, list] = {"without": [], "with": []}
    for _ in range(repeats):
        for name, extra in (("without", []), ("with", flags)):
            run = prepare([info["path"]], WORK / "corpus" / "out" / f"dump{size:g}-decontam", num_proc, extra,
                          f"dump {size:g} MB, {name} --decontaminate")
            run.update(input_mb=info["xml_bytes"] / 1e6, pages=info["pages"])
            runs[name].append(run)
    return {"size_mb": size, "num_proc": num_proc, **runs}


# ----------------------------------------------------------------------------------------------- main

def poetry_inputs() -> list[str]:
    dist = poetry_package() / "dist"
    files = sorted((dist / "quantangshi").glob("poet.*.json"))
    files += sorted((dist / "yudingquantangshi" / "json").glob("*.json"))
    return [str(p) for p in files]


def save(results: dict) -> None:
    (WORK / "corpus" / "results.json").write_text(json.dumps(results, indent=1))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes_mb", type=float, nargs="+", default=[30, 100, 300, 1000],
                        help="Uncompressed XML sizes of the recombined dumps (MB).")
    parser.add_argument("--num_proc", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--num_proc_1_max_mb", type=float, default=1000,
                        help="Run --num_proc 1 only on dumps up to this size (time).")
    parser.add_argument("--decontaminate", action="store_true", default=True,
                        help="Also measure --decontaminate C-Eval CMMLU's cost on the second size.")
    parser.add_argument("--only_decontaminate", action="store_true",
                        help="Only (re)measure the decontamination cost, into the existing results.json.")
    parser.add_argument("--no_poetry", action="store_true")
    parser.add_argument("--quick", action="store_true", help="One 5 MB dump, 2 processes, no docs update.")
    parser.add_argument("--render", action="store_true", help="Only rewrite the docs section from results.json.")
    args = parser.parse_args(argv)
    if args.render:
        results = json.loads((WORK / "corpus" / "results.json").read_text())
        write_section("bench_corpus.py", TITLE, PACKAGES, render(results), argv=results.get("argv"),
                      date=results.get("date"))
        return
    if args.quick:
        args.sizes_mb, args.num_proc, args.no_poetry = [5], [2], True
    if args.only_decontaminate:
        results = json.loads((WORK / "corpus" / "results.json").read_text())
        results["decontaminate"] = decontamination_cost(args.sizes_mb, max(args.num_proc))
        save(results)
        write_section("bench_corpus.py", TITLE, PACKAGES, render(results), argv=results.get("argv"),
                      date=results.get("date"))
        return
    results: dict = {"dumps": [], "runs": [], "tokenize": [], **recorded_run(argv)}
    for size in args.sizes_mb:
        info = build_dump(size)
        results["dumps"].append(info)
        for num_proc in args.num_proc:
            if num_proc == 1 and size > args.num_proc_1_max_mb:
                continue
            out = WORK / "corpus" / "out" / f"dump{size:g}-p{num_proc}"
            run = prepare([info["path"]], out, num_proc, [], f"dump {size:g} MB")
            run.update(input_mb=info["xml_bytes"] / 1e6, pages=info["pages"])
            results["runs"].append(run)
            save(results)
    middle = args.sizes_mb[len(args.sizes_mb) // 2]
    if args.decontaminate:
        results["decontaminate"] = decontamination_cost(args.sizes_mb, max(args.num_proc))
    if not args.no_poetry:
        files = poetry_inputs()
        mb = sum(os.path.getsize(f) for f in files) / 1e6
        for num_proc in [max(args.num_proc)]:
            out = WORK / "corpus" / "out" / f"poetry-p{num_proc}"
            run = prepare(files, out, num_proc, ["--text_column", "title,paragraphs"], "chinese-poetry")
            run.update(input_mb=mb, pages=None)
            results["runs"].append(run)
    workers = max(args.num_proc)
    for size in dict.fromkeys([middle, args.sizes_mb[-1]]):  # the growth, at two sizes
        corpus = WORK / "corpus" / "out" / f"dump{size:g}-p{workers}"
        results["tokenize"] += tokenisation(corpus, f"dump {size:g} MB", workers)
        if size == middle and workers > 1:
            results["tokenize"] += tokenisation(corpus, f"dump {size:g} MB", 1)
        save(results)
    save(results)
    print(json.dumps({k: len(v) for k, v in results.items()}))
    if not args.quick:
        write_section("bench_corpus.py", TITLE, PACKAGES, render(results), argv=results["argv"], date=results["date"])


def render(results: dict) -> str:
    """The docs/BENCHMARKS.md section from results.json: runs, per-step rates, tokenisation, extrapolation."""
    runs, dumps = results["runs"], results["dumps"]
    run_rows = []
    for run in runs:
        mb, wall, cpu = run["input_mb"], run["wall_s"], run["cpu_s"]
        pages = f"{run['pages'] / wall:,.1f}" if run.get("pages") else "-"
        run_rows.append([run["label"], run["num_proc"], f"{mb:,.0f}", f"{run['pages'] or 0:,}" if run.get("pages")
                         else "-", f"{run['stats']['documents']:,}", f"{wall:,.0f}", f"{cpu:,.0f}", pages,
                         f"{mb / wall:.2f}", f"{mb / cpu:.2f}", f"{run['peak_tree_mb']:,.0f}",
                         f"{run['peak_pss_mb']:,.0f}", f"{run['peak_pss_anon_mb']:,.0f}", f"{run['peak_main_mb']:,.0f}",
                         f"{run['peak_disk_mb']:,.0f}",
                         f"{run['output_mb']:,.0f}"])
    table = markdown_table(["input", "processes", "input MB", "pages", "documents kept", "wall s", "CPU s", "pages/s",
                            "input MB/s", "input MB per CPU-s", "peak RSS, tree (MB)", "peak PSS, tree (MB)",
                            "peak PSS anon, tree (MB)", "peak RSS, main (MB)", "peak disk (MB)", "output MB"], run_rows)
    steps = markdown_table(["input", "processes", "step", "docs in", "docs out", "seconds (all processes)",
                            "docs/s per process", "Mchars/s per process"],
                           [row for run in runs for row in step_rows(run)])
    token_rows = [[t["label"], t["attempt"], t["workers"], f"{t['corpus_mb']:,.0f}", f"{t['wall_s']:,.1f}",
                   f"{t['seconds']:,.1f}", f"{t['tokens']:,}",
                   f"{t['tokens'] / max(t['seconds'], 1e-9) / t['workers']:,.0f}", f"{t['peak_tree_mb']:,.0f}",
                   f"{t['peak_pss_mb']:,.0f}", f"{t['peak_pss_anon_mb']:,.0f}", f"{t['token_file_mb']:,.1f}",
                   f"{t['datasets_cache_mb']:,.0f}",
                   "yes" if t["reused"] else "no"] for t in results["tokenize"]]
    tokens = markdown_table(["corpus", "run", "workers", "corpus MB (parquet)", "wall s (with imports)",
                             "TokenStream.build s", "tokens", "tokens/s per worker", "peak RSS, tree (MB)",
                             "peak PSS, tree (MB)", "peak PSS anon, tree (MB)", "token file MB", "datasets cache MB",
                             "cache reused"], token_rows)
    dump_runs = sorted((r for r in runs if r["label"].startswith("dump") and "decontaminate" not in r["label"]),
                       key=lambda r: (r["num_proc"], r["input_mb"]))
    one = [r for r in dump_runs if r["num_proc"] == 1]
    two = [r for r in dump_runs if r["num_proc"] == 2]
    most = two or one
    largest, smallest, second = most[-1], most[0], most[-2] if len(most) > 1 else most[0]

    def slope(a: dict, b: dict) -> float:  # KB of peak PSS per kept page
        return (b["peak_pss_mb"] - a["peak_pss_mb"]) / max(b["stats"]["documents"] - a["stats"]["documents"], 1) * 1e3

    memory = ", ".join(f"{r['input_mb']:,.0f} MB: {r['peak_pss_mb']:,.0f} (main {r['peak_main_mb']:,.0f})"
                       for r in most)
    per_cpu = sum(r["input_mb"] for r in one) / sum(r["cpu_s"] for r in one) if one else 0.0
    per_wall = sum(r["input_mb"] for r in one) / sum(r["wall_s"] for r in one) if one else 0.0
    scaling = ", ".join(f"{a['input_mb']:,.0f} MB: {a['wall_s'] / b['wall_s']:.2f}x" for a in one for b in two
                        if a["input_mb"] == b["input_mb"])
    single = (one or most)[-1]
    gigabytes = single["input_mb"] / 1e3
    per_gb = {step: single["stats"]["steps"][step]["seconds"] / gigabytes for step in MAIN_PROCESS_STEPS}
    per_gb["workers"] = worker_seconds(single) / gigabytes
    shares = sorted(((row["seconds"], step) for step, row in largest["stats"]["steps"].items()
                     if step not in ("read", "write")), reverse=True)
    total_steps = sum(sec for sec, _ in shares)
    decontam_note = ""
    cost = results.get("decontaminate")
    if cost:
        def median(name: str, key) -> float:
            return statistics.median(key(run) for run in cost[name])

        share = median("with", lambda r: r["stats"]["steps"]["decontam"]["seconds"] / worker_seconds(r))
        wall = [median(name, lambda r: r["wall_s"]) for name in ("without", "with")]
        cpu = [median(name, lambda r: r["cpu_s"]) for name in ("without", "with")]
        removed = cost["with"][0]["stats"].get("decontaminated", {}) or "nothing"
        per_run = {name: ", ".join(f"{run['cpu_s']:,.1f}" for run in cost[name]) for name in ("without", "with")}
        decontam_note = (
            f"Decontamination (C-Eval dev+val and CMMLU dev of ../shared/data), the {cost['size_mb']:g} MB dump with "
            f"{cost['num_proc']} processes, without and with `--decontaminate` interleaved {len(cost['with'])} times "
            f"(medians): its own step (which also extracts the code points that MinHash then reuses) takes {share:.1%} "
            f"of the workers' step seconds; wall {wall[0]:,.1f} -> "
            f"{wall[1]:,.1f} s ({wall[1] / wall[0] - 1:+.1%}), CPU {cpu[0]:,.1f} -> {cpu[1]:,.1f} s "
            f"({cpu[1] / cpu[0] - 1:+.1%}; this includes reading and hashing the evaluation sets once, "
            f"~1 s). Per run, CPU without: {per_run['without']}; with: {per_run['with']}. It removed {removed} (the pages' "
            "characters are permuted, so no question can match: these runs measure the cost; the tests check what it "
            "removes).")
    dump = dumps[-1]
    ratio = dump["xml_bytes"] / dump["bz2_bytes"]
    page_kb = sum(d["xml_bytes"] for d in dumps) / sum(d["pages"] for d in dumps) / 1e3
    full_xml_mb, full_docs = 12e3, 1.3e6
    full_pss = largest["peak_pss_mb"] + slope(second, largest) * (full_docs - largest["stats"]["documents"]) / 1e3
    full_pss_high = (largest["peak_pss_mb"]
                     + slope(smallest, largest) * (full_docs - largest["stats"]["documents"]) / 1e3)
    disk = max(r["peak_disk_mb"] / max(r["output_mb"], 1e-9) for r in dump_runs)
    first = [t for t in results["tokenize"] if t["attempt"] == "first run"]
    token_note = "; ".join(f"{t['label']}, {t['workers']} worker{'s' * (t['workers'] > 1)}: "
                           f"{t['tokens'] / t['seconds'] / t['workers']:,.0f} tokens/s per worker, peak PSS "
                           f"{t['peak_pss_mb']:,.0f} MB of which {t['peak_pss_anon_mb']:,.0f} MB anonymous"
                           for t in first)
    workers_max = max((t["workers"] for t in first), default=1)
    anon_growth = " -> ".join(f"{t['peak_pss_anon_mb']:,.0f} MB ({t['label']})" for t in first
                              if t["workers"] == workers_max)
    return f"""
What it measures: `prepare_data.py` with default settings on MediaWiki dumps of {", ".join(
        f"{d['xml_bytes'] / 1e6:,.0f}" for d in dumps)} MB of XML (bz2: {", ".join(f"{d['bz2_bytes'] / 1e6:,.0f}"
        for d in dumps)} MB; {page_kb:,.1f} KB of XML per page) built from the real pages of `../shared/data`
(see the script's docstring: sections of real pages recombined, Han characters permuted per page, so markup,
lengths and character frequencies are real and near-duplicate removal keeps every page), and on chinese-poetry
(全唐诗 `quantangshi/poet.*.json` + 御定全唐诗 `yudingquantangshi/json/*.json`, `--text_column title,paragraphs`:
JSON arrays read element by element). Memory is sampled every 0.2 s over the
whole process tree: RSS summed over processes counts the pages the forked workers share with the main process
(torch, transformers, OpenCC are imported before the fork) once per process; PSS (proportional set size,
every 1 s) counts them once and is the honest total. Disk = the growth of the output's parent folder at its
peak (staging parquet, shuffle buckets, shards). CPU s = user + system seconds of the whole process tree;
input MB per CPU-s is the rate per core whatever else the machine runs.

{table}

Per step (from stats.json; a step's seconds are summed over the worker processes, so docs/s and chars/s are
per process; "extract" is wikiextractor; "minhash" the workers' signatures; "dedup" the index in the main
process):

{steps}

Tokenisation into pre_train.py's memory-mapped token cache (`TokenStream.build`, the code pre_train.py runs;
an 8,000-token BPE trained on the corpus once), run twice in fresh processes: the second run is a restart. The
`datasets` cache (the corpus as Arrow and the map's token lists) is put in the token cache folder for these runs,
so the first run starts cold and its disk is counted.

{tokens}

Reading:
- Memory: peak PSS of the tree (and RSS of the main process) in MB with {largest['num_proc']} processes: {memory}.
  Between the two largest dumps that is {slope(second, largest):,.2f} KB per kept page ({slope(smallest, largest):,.2f}
  from the smallest, start-up included; the issue measured ~85 KB per page before): the near-duplicate index
  (~0.5-0.7 KB per kept document) is what still grows, by design; everything else is bounded (staging buffer:
  4,096 documents / 4 M characters; shuffle: the staging file read one row group at a time, ~16 MB buckets).
  For the full zhwiki dump (~{full_docs / 1e6:.1f} M kept articles) that extrapolates to ~{full_pss:,.0f} MB peak
  PSS ({"within" if full_pss <= 2000 else "above"} the 2 GB goal; ~{full_pss_high:,.0f} MB from the smallest dump's
  slope, which includes start-up growth). The index alone at 1.3 M documents is measured in the near-duplicate
  section (bench_dedup.py). `--dedup false` is flat.
- Throughput: {per_cpu:.2f} MB of dump XML per CPU second with one process ({per_wall:.2f} MB per wall second);
  speed-up with 2 processes on this 2-core machine: {scaling or "no 1-process run"}.
  Per GB of XML (the largest 1-process run): the workers' steps {per_gb["workers"]:,.0f} s, the main process's
  reading (bz2, XML lines) {per_gb["read"]:,.0f} s, its dedup index {per_gb["dedup"]:,.0f} s, the shuffle and write
  {per_gb["write"]:,.0f} s. The main process reads for all workers, so the rate follows `--num_proc` until the
  reader saturates its core: prepare_data.py decompresses with one bz2 thread per 2 workers (indexed_bzip2),
  which by these rates keeps the reader ahead up to ~8 processes (an estimate: only 1 and 2 processes were
  measured here). For the full dump (~2.7 GB bz2; ours compresses {ratio:.1f}x because permuted characters
  compress worse than real text, the real dump ~4-5x, so ~12 GB of XML) that is about
  {full_xml_mb / per_cpu / 3600 if per_cpu else 0:,.1f} CPU hours: ~{full_xml_mb / per_cpu / 3600 / 2 * 60 if per_cpu else 0:,.0f} min
  with 2 processes at full speed-up. What dominates (largest run, share of the step seconds):
  {", ".join(f"{step} {sec / total_steps:.0%}" for sec, step in shares[:4])}.
- {decontam_note}
- Disk: at most {disk:.1f}x the output at the peak (the staged corpus, its shuffle buckets and the shards exist
  together until the buckets are turned into shards).
- Tokenisation: {token_note}. Anonymous PSS (the processes' own memory) with {workers_max} workers:
  {anon_growth}; what grows more is the file pages of the memory-mapped `datasets` Arrow files counted in PSS, which the kernel drops
  under memory pressure. The restart found the token file and skipped the work (TokenStream.build seconds
  above). The `datasets` cache holds the corpus once more as Arrow plus the token lists (about 2.5x the parquet
  corpus); it can be deleted once the token file exists.
"""


if __name__ == "__main__":
    sys.exit(main())
