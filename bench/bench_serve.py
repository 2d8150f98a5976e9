"""Serving throughput (issue 15): aggregate generated tokens/s and time to first token (p50 / p95) of 1, 4, 16
and 32 concurrent streamed replies, generated in batches (`--batching`, the default of serve.py) vs each in a
thread of its own (the server before batching), for the demo-sized T5 and Llama.

    nice -n 10 .venv/bin/python bench/bench_serve.py                  # CPU, a few minutes on 2 cores
    .venv/bin/python bench/bench_serve.py --device cuda --max_new_tokens 128 --streams 1 4 16 32 64
    .venv/bin/python bench/bench_serve.py --quick                     # seconds (smoke test; no docs)

The streams go through `ChatService.stream`, the code path of serve.py's streamed route without HTTP framing,
so the figures are the generation core's, not uvicorn's. Models are built from config/models/{t5,llama}-demo.yaml
with random weights (speed does not depend on training) over a tokenizer trained here on real zhwiki text, and
EOS is switched off, so that every reply is exactly --max_new_tokens long and the modes do the same work
(special and byte tokens are suppressed, so that every token streams text).
Each stream has its own prompt (a different wiki sentence, so prompt lengths differ as they do in use).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time

import torch

import train_tokenizer
from bench.corpora import WIKI_JSONL, shared_path
from bench.harness import WORK, log, markdown_table, write_section
from model.build import build_model, model_config
from model.inference.service import ChatService, DecodingOptions
from utils.tokenization.chat_format import default_generation_config


def tokenizer_dir(quick: bool):
    out = WORK / ("serve_tokenizer_quick" if quick else "serve_tokenizer")
    if not (out / "tokenizer.json").exists():
        train_tokenizer.main(["--config", "none", "--input", str(shared_path(WIKI_JSONL)), "--vocab_size",
                              "1024" if quick else "4096", "--num_sentinels", "100", "--output_dir", str(out)])
    return out


def demo_model(preset: str, tokenizer, device: str):
    model = build_model(model_config(preset, tokenizer), seed=0).to(device).eval()
    model.generation_config = default_generation_config(tokenizer, model.config)
    model.generation_config.eos_token_id = None  # every reply runs to max_new_tokens
    # Random weights pick any id; keep to tokens that decode to whole text (no special, byte or padding ids),
    # so that each token streams a piece and time to first token is the first token's.
    pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    special = set(tokenizer.all_special_ids)
    model.generation_config.suppress_tokens = [i for i, piece in enumerate(pieces) if i in special or
                                               piece.startswith("<")] + list(range(len(tokenizer),
                                                                                   model.config.vocab_size))
    return model


def prompts(count: int) -> list[str]:
    texts = []
    with open(shared_path(WIKI_JSONL), encoding="utf-8") as handle:
        for line in handle:
            for sentence in json.loads(line)["text"].split("。"):
                if 8 <= len(sentence) <= 60:
                    texts.append(sentence)
                if len(texts) == count:
                    return texts
    return texts


async def serve_streams(service: ChatService, messages: list[str], max_new_tokens: int) -> dict:
    """Stream replies to all `messages` at once; aggregate tokens/s and time to first piece."""
    config = service.generation_config(max_new_tokens=max_new_tokens)
    prepared = [service.prepare([{"role": "user", "content": m}], config) for m in messages]
    start = time.perf_counter()

    async def one(item):
        first = None
        async with service.stream(item) as stream:
            async for _ in stream:
                first = first or time.perf_counter() - start
        return first, stream.reply.completion_tokens

    results = await asyncio.gather(*(one(item) for item in prepared))
    wall = time.perf_counter() - start
    firsts = sorted(first for first, _ in results if first is not None)
    tokens = sum(count for _, count in results)
    p95 = firsts[min(len(firsts) - 1, round(0.95 * (len(firsts) - 1)))]
    return {"tokens_per_s": tokens / wall, "ttft_p50": statistics.median(firsts), "ttft_p95": p95,
            "tokens": tokens, "wall": wall}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 4, 16, 32], help="concurrent streams")
    parser.add_argument("--max_new_tokens", type=int, default=32, help="tokens per reply")
    parser.add_argument("--models", nargs="+", default=["t5-demo", "llama-demo"])
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: on a shared CPU, more "
                        "threads mostly wait for each other)")
    parser.add_argument("--quick", action="store_true", help="tiny run, nothing written to docs")
    args = parser.parse_args(argv)
    if args.quick:
        args.streams, args.max_new_tokens = [1, 4], 8
    torch.set_num_threads(args.threads)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir(args.quick))
    messages = prompts(max(args.streams))
    rows, speedups = [], []
    for preset in args.models:
        model = demo_model(preset, tokenizer, args.device)
        params = sum(p.numel() for p in model.parameters()) / 1e6
        # One warm-up request per mode (first-call allocations, lazy imports).
        for batched in (False, True):
            asyncio.run(serve_streams(ChatService(model, tokenizer, max_concurrent=1, batched=batched),
                                      messages[:1], 4))
        single = {}
        for streams in args.streams:
            for batched in (False, True):
                service = ChatService(model, tokenizer, DecodingOptions(), max_concurrent=streams, batched=batched)
                result = asyncio.run(serve_streams(service, messages[:streams], args.max_new_tokens))
                mode = "batched" if batched else "threads"
                single.setdefault(mode, result["tokens_per_s"]) if streams == args.streams[0] else None
                log(f"{preset} {mode} {streams} streams: {result['tokens_per_s']:.1f} tok/s, ttft p50 "
                    f"{result['ttft_p50']:.2f}s p95 {result['ttft_p95']:.2f}s ({result['tokens']} tokens in "
                    f"{result['wall']:.1f}s)")
                rows.append([f"{preset} ({params:.1f}M)", streams, mode, f"{result['tokens_per_s']:.1f}",
                             f"{result['tokens_per_s'] / single[mode]:.1f}×", f"{result['ttft_p50']:.2f}",
                             f"{result['ttft_p95']:.2f}"])
                if streams == 16:
                    speedups.append((preset, mode, result["tokens_per_s"] / single["threads"]))
    table = markdown_table(["model", "streams", "mode", "tokens/s (all streams)", "vs 1 stream of this mode",
                            "TTFT p50 (s)", "TTFT p95 (s)"], rows)
    print(table)
    if args.quick:
        return
    load = os.getloadavg()
    goal = "; ".join(f"{preset} {mode}: {ratio:.1f}×" for preset, mode, ratio in speedups)
    body = "\n".join([
        f"Device: {args.device}, {args.threads} torch threads, {args.max_new_tokens} new tokens per reply, greedy, "
        f"random-weight demo models, EOS off. Load average at the end: {load[0]:.1f} / {load[1]:.1f} / "
        f"{load[2]:.1f} (1 / 5 / 15 min; the machine is shared, so absolute figures are noisy — the modes "
        "run side by side, one after the other, for every stream count).", "",
        table, "",
        f"Aggregate at 16 streams over one stream of today's threads (goal: ≥ 2× on CPU, ≥ 5× on a GPU): {goal}.",
        "`threads` is the server before batching (each request generates alone in its thread; threads share the "
        "cores); `batched` is `serve.py --batching true` (one `model.generate` over the waiting requests, each row "
        "stopping on its own). Time to first token counts from the moment all streams are sent, so it includes "
        "waiting for a batch (or a core) to be free."])
    write_section("bench_serve.py", "Serving: batched vs one thread per request", ["torch", "transformers"], body)
    log("wrote docs/BENCHMARKS.md")


if __name__ == "__main__":
    main()
