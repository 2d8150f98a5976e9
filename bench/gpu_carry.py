"""What bench/gpu_check.py carries to the GPU machine, which has no ../shared, no package registry and no project
virtualenv: a mixed corpus of the real text in ../shared/data (training and held-out parquet files), the toolkit's
32k tokenizer trained on it with config/tokenizer.yaml, copies of an SFT and a DPO data file, and the wheels the
GPU image lacks. `gpu_check.py prepare` writes it; one device call carries it with the repository (64 MiB in all).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from bench.harness import PYTHON, REPO, WORK, folder_bytes, log, run_command

ROOT = WORK / "gpu_check"
INPUT, INPUT_QUICK = ROOT / "input", ROOT / "input_quick"
SFT_DATA = "sft/llamafactory_alpaca_zh_demo.json"
DPO_DATA = "dpo/medicalgpt_dpo_zh_500.jsonl"
CARRY_LIMIT_MIB = 64  # what one device call carries: the carried folder and the repository together
# What the GPU image lacks or holds at a version the project was not tested with, as wheels of the versions installed
# in this .venv (CPython 3.12, manylinux); torch, tokenizers, safetensors, huggingface_hub, pyarrow, numpy and the
# rest come from the image. bitsandbytes (GPU only, never in this .venv) comes at requirements-gpu.txt's pin.
WHEELS = ("transformers", "datasets", "dill", "multiprocess", "fsspec", "regex", "trl", "peft", "accelerate")
GPU_PACKAGES = ("bitsandbytes",)
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64")


def prepare(args) -> None:
    """`prepare`: the carried folder (default `INPUT`, `INPUT_QUICK` with --quick)."""
    from bench.corpora import MixSpec, build_mixed_corpus, load_real_texts, shared_path  # pyarrow: here only

    out = Path(args.dir or (INPUT_QUICK if args.quick else INPUT))
    out.mkdir(parents=True, exist_ok=True)
    texts = [t.text for t in load_real_texts()]
    train_mb, validation_mb = (0.3, 0.01) if args.quick else (args.corpus_mb, 0.5)
    corpus = build_mixed_corpus(train_mb, texts, name="gpu_check_train")
    # Another seed: with the same one the held-out file would be a prefix of the training file.
    held_out = build_mixed_corpus(validation_mb, texts, MixSpec(seed=4321), name="gpu_check_validation")
    shutil.copyfile(corpus.path, out / "train.parquet")
    shutil.copyfile(held_out.path, out / "validation.parquet")
    vocab = ["--vocab_size", "2048"] if args.quick else []
    run_command([PYTHON, "train_tokenizer.py", "--config", "config/tokenizer.yaml", "--input", str(out / "train.parquet"),
                 "--eval_files", str(out / "validation.parquet"), "--output_dir", str(out / "tokenizer"),
                 "--overwrite_output_dir", *vocab], ROOT / "logs" / f"tokenizer{'_quick' if args.quick else ''}.log")

    rows = 200 if args.quick else None  # the quick copies keep tokenisation in the smoke run short
    (out / "sft").mkdir(exist_ok=True)
    (out / "dpo").mkdir(exist_ok=True)
    sft = json.loads(shared_path(SFT_DATA).read_text(encoding="utf-8"))[:rows]
    (out / "sft" / Path(SFT_DATA).name).write_text(json.dumps(sft, ensure_ascii=False, indent=1), encoding="utf-8")
    pairs = shared_path(DPO_DATA).read_text(encoding="utf-8").splitlines(keepends=True)[:rows]
    (out / "dpo" / Path(DPO_DATA).name).write_text("".join(pairs), encoding="utf-8")

    wheels = [] if args.quick or args.no_wheels else download_wheels(out / "wheels", WHEELS, gpu_extras(*GPU_PACKAGES))
    info = {"quick": args.quick, "corpus_mb": corpus.mb, "validation_mb": held_out.mb, "sft_rows": len(sft),
            "dpo_pairs": len(pairs), "wheels": wheels}
    (out / "prepared.json").write_text(json.dumps(info, indent=2) + "\n")
    carried = folder_bytes(out) / 2**20
    repository = sum((REPO / name).stat().st_size for name in tracked_files()) / 2**20
    log(f"prepared {out}: {carried:.1f} MiB, with the repository's {repository:.1f} MiB "
        f"{carried + repository:.1f} of the {CARRY_LIMIT_MIB} MiB a device call carries")
    if carried + repository > CARRY_LIMIT_MIB:
        sys.exit(f"error: {out} does not fit a device call; make the corpus smaller (--corpus_mb)")


def tracked_files() -> list[str]:
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, check=True, capture_output=True, text=True).stdout
    return [name for name in listed.split("\0") if name and (REPO / name).is_file()]


def gpu_extras(*names: str) -> list[str]:
    """The pins of requirements-gpu.txt (the GPU-only extras, which this CPU .venv never holds) of the packages
    named."""
    lines = (REPO / "requirements-gpu.txt").read_text(encoding="utf-8").splitlines()
    pins = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    return [pin for pin in pins if re.split(r"[<>=!~;\[ ]", pin, maxsplit=1)[0] in names]


def download_wheels(folder: Path, names: tuple[str, ...], pinned: list[str]) -> list[str]:
    """Wheels (CPython 3.12, manylinux) of this .venv's versions of `names` and of the `pinned` requirements into
    `folder`; bitsandbytes' is slimmed (`keep_in_bitsandbytes`)."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    pins = [f"{name}=={importlib.metadata.version(name)}" for name in names] + pinned
    platforms = [flag for p in PLATFORMS for flag in ("--platform", p)]
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                    "--python-version", "3.12", "--implementation", "cp", *platforms, "-d", str(folder), *pins],
                   check=True)
    for wheel in folder.glob("bitsandbytes-*.whl"):
        slim_wheel(wheel, keep_in_bitsandbytes)
    return sorted(p.name for p in folder.glob("*.whl"))


def keep_in_bitsandbytes(name: str) -> bool:
    """Whether the GPU machine needs this file of bitsandbytes' wheel. The wheel (43 MB) holds a native library for
    every CUDA from 11.8 to 13.2, ROCm and Intel XPU; with this project's other wheels and data it would not fit a
    device call. Kept: the CPU library and those of CUDA 12.8 and later (14 MB). bitsandbytes loads the library of
    torch's CUDA version, or else the nearest of the same major (bitsandbytes/cextension.py), so a torch built for
    CUDA 12.x or 13.x finds one; the GPU lent so far runs a cu130 torch."""
    library = re.fullmatch(r"bitsandbytes/libbitsandbytes_([a-z]+)(\d*)\.(so|dll|dylib)", name)
    if not library:
        return True
    kind, version = library.group(1), library.group(2)
    return kind == "cpu" or (kind == "cuda" and int(version) >= 128)


def slim_wheel(path: Path, keep) -> None:
    """Rewrite the wheel at `path` without the files `keep(name)` rejects, and without their lines in its RECORD."""
    slimmed = path.with_suffix(".slim")
    with zipfile.ZipFile(path) as source, zipfile.ZipFile(slimmed, "w", zipfile.ZIP_DEFLATED) as target:
        for info in source.infolist():
            if not keep(info.filename):
                continue
            data = source.read(info)
            if info.filename.endswith(".dist-info/RECORD"):
                lines = data.decode("utf-8").splitlines(keepends=True)
                data = "".join(line for line in lines if keep(line.split(",", 1)[0])).encode("utf-8")
            target.writestr(info, data)
    os.replace(slimmed, path)
