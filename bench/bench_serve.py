"""Serving throughput (issues 15 and the continuous-batching rework): aggregate generated tokens/s and time to
first token (p50 / p95) of 1, 16 and 32 concurrent streamed replies, generated in one continuous batch
(`--batching`, the default of serve.py) vs each alone in a thread of its own, for the demo-sized T5 and Llama;
then 32 streams that arrive one by one while the batch decodes (`--gap_ms` apart), and the ceiling the model
itself sets: one decoding step of 32 rows against one of 1 row, without streaming.

    nice -n 10 .venv/bin/python -m bench.bench_serve                  # CPU, a few minutes on 2 cores
    .venv/bin/python -m bench.bench_serve --threads 1 2               # both thread counts, side by side
    .venv/bin/python -m bench.bench_serve --device cuda --max_new_tokens 128 --streams 1 4 16 32 64
    .venv/bin/python -m bench.bench_serve --quick                     # seconds (smoke test; no docs)

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
from model.inference.decoding import ModelRows
from model.inference.reply import LiveReply
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


async def serve_streams(service: ChatService, messages: list[str], max_new_tokens: int, gap_s: float = 0.0) -> dict:
    """Stream replies to `messages`, the i-th sent i * `gap_s` after the first: aggregate tokens/s (every token
    over the time from the first send to the last token) and time to first piece (from each stream's send)."""
    config = service.generation_config(max_new_tokens=max_new_tokens)
    prepared = [service.prepare([{"role": "user", "content": m}], config) for m in messages]
    start = time.perf_counter()

    async def one(index, item):
        await asyncio.sleep(index * gap_s)
        sent, first = time.perf_counter(), None
        async with service.stream(item) as stream:
            async for _ in stream:
                first = first or time.perf_counter() - sent
        return first, stream.reply.completion_tokens

    results = await asyncio.gather(*(one(index, item) for index, item in enumerate(prepared)))
    wall = time.perf_counter() - start
    firsts = sorted(first for first, _ in results if first is not None)
    tokens = sum(count for _, count in results)
    p95 = firsts[min(len(firsts) - 1, round(0.95 * (len(firsts) - 1)))]
    return {"tokens_per_s": tokens / wall, "ttft_p50": statistics.median(firsts), "ttft_p95": p95,
            "tokens": tokens, "wall": wall}


def step_seconds(model, tokenizer, messages: list[str], steps: int = 24) -> tuple[float, float]:
    """Seconds of one decoding step (ModelRows.step: the forward pass and the token choice, no readers) of a
    batch of the first message alone and of one of all `messages`: the medians of `steps` steps, the two batches
    stepping in turn so that the machine's load weighs on both alike."""
    service = ChatService(model, tokenizer)
    config = service.generation_config(max_new_tokens=steps + 2)
    batches = []
    for chosen in (messages[:1], messages):
        rows = ModelRows(model, tokenizer)
        rows.join([LiveReply(tokenizer, service.prepare([{"role": "user", "content": m}], config).ids, config)
                   for m in chosen])
        batches.append((rows, []))
    for _ in range(steps):
        for rows, times in batches:
            began = time.perf_counter()
            rows.step()
            times.append(time.perf_counter() - began)
    return tuple(statistics.median(times) for _, times in batches)


def measure(model, tokenizer, name: str, threads: int, args, messages: list[str]) -> tuple[list, list, dict]:
    """The rows of the streams table and of the ceiling table for one model at `threads`, and the 32-stream
    figures: {mode: (tokens/s, over one stream alone, TTFT p50, p95)}."""
    torch.set_num_threads(threads)
    for batched in (False, True):  # one warm-up request per mode (first-call allocations, lazy imports)
        asyncio.run(serve_streams(ChatService(model, tokenizer, max_concurrent=1, batched=batched), messages[:1], 4))
    rows, single, at_most = [], {}, {}
    cases = [(streams, 0.0) for streams in args.streams] + [(max(args.streams), args.gap_ms / 1000)]
    for streams, gap in cases:
        for batched in (False, True):
            service = ChatService(model, tokenizer, DecodingOptions(), max_concurrent=streams, batched=batched)
            result = asyncio.run(serve_streams(service, messages[:streams], args.max_new_tokens, gap))
            mode = "batched" if batched else "threads"
            single.setdefault(mode, result["tokens_per_s"])  # the first case is one stream
            arrival = f"{args.gap_ms:g} ms apart" if gap else "at once"
            log(f"{name} {threads} threads {mode} {streams} streams {arrival}: {result['tokens_per_s']:.1f} tok/s, "
                f"ttft p50 {result['ttft_p50']:.2f}s p95 {result['ttft_p95']:.2f}s ({result['tokens']} tokens in "
                f"{result['wall']:.1f}s)")
            rows.append([name, threads, streams, arrival, mode, f"{result['tokens_per_s']:.1f}",
                         f"{result['tokens_per_s'] / single[mode]:.1f}×", f"{result['ttft_p50']:.2f}",
                         f"{result['ttft_p95']:.2f}"])
            if streams == max(args.streams) and not gap:
                at_most[mode] = (result["tokens_per_s"], result["tokens_per_s"] / single["threads"],
                                 result["ttft_p50"], result["ttft_p95"])
    one, many = step_seconds(model, tokenizer, messages)
    ceiling = [name, threads, f"{one * 1000:.2f}", f"{many * 1000:.2f}", f"{len(messages) * one / many:.1f}×"]
    return rows, [ceiling], at_most


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 16, 32], help="concurrent streams (the "
                        "first is the one-stream baseline, the last also arrives one by one)")
    parser.add_argument("--max_new_tokens", type=int, default=32, help="tokens per reply")
    parser.add_argument("--gap_ms", type=float, default=10, help="ms between arrivals in the one-by-one case")
    parser.add_argument("--models", nargs="+", default=["t5-demo", "llama-demo"])
    parser.add_argument("--threads", type=int, nargs="+", default=[1], help="torch intra-op threads, each measured "
                        "in turn (1: on a shared CPU, more threads mostly wait for each other)")
    parser.add_argument("--quick", action="store_true", help="tiny run, nothing written to docs")
    args = parser.parse_args(argv)
    if args.quick:
        args.streams, args.max_new_tokens = [1, 4], 8
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir(args.quick))
    messages = prompts(max(args.streams))
    rows, ceilings, goals = [], [], []
    for preset in args.models:
        model = demo_model(preset, tokenizer, args.device)
        name = f"{preset} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M)"
        for threads in args.threads:
            streams_rows, ceiling, at_most = measure(model, tokenizer, name, threads, args, messages)
            rows += streams_rows
            ceilings += ceiling
            tokens, ratio, p50, p95 = at_most["batched"]
            goals.append(f"{preset}, {threads} thread{'s' * (threads > 1)}: {tokens:.0f} tokens/s, {ratio:.1f}× one "
                         f"stream, TTFT p50 {p50:.2f} s / p95 {p95:.2f} s")
    table = markdown_table(["model", "torch threads", "streams", "arrival", "mode", "tokens/s (all streams)",
                            "vs 1 stream of this mode", "TTFT p50 (s)", "TTFT p95 (s)"], rows)
    ceiling_table = markdown_table(["model", "torch threads", "one step, 1 row (ms)",
                                    f"one step, {max(args.streams)} rows (ms)", "ceiling (tokens/s ratio)"], ceilings)
    print(table, ceiling_table, sep="\n\n")
    if args.quick:
        return
    load = os.getloadavg()
    most = max(args.streams)
    body = "\n".join([
        f"Device: {args.device}, {args.max_new_tokens} new tokens per reply, greedy, random-weight demo models, EOS off. "
        f"Load average at the end: {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (1 / 5 / 15 min; the machine is "
        "shared, so absolute figures are noisy — the modes run side by side, one after the other, for every case).",
        "", table, "",
        f"{most} concurrent streams in the continuous batch over one stream alone (goal: ≥ 10× on CPU; 7.4× at 16 "
        f"streams with the static batches before): {'; '.join(goals)}. Each ratio compares with one stream at the "
        "same thread count: where more threads slow one stream down (a step this small gains nothing from them, "
        "and they wait for each other), the ratio flatters; compare tokens/s across thread counts too.", "",
        "`threads` is each request generating alone in a thread of its own (`--batching false`); `batched` is "
        "`serve.py --batching true`: one continuous batch, where a request joins at the next step (its prompt read "
        "in one pass with the others that arrived, which gives its first token) and leaves as soon as its reply "
        "ends. Time to first token counts from each stream's send, so it includes waiting for the model (a step "
        f"of the batch, or a core). `{args.gap_ms:g} ms apart`: the streams are sent one by one while the earlier "
        "ones decode; each joins the running batch rather than waiting for it to finish.", "",
        "What the model itself allows: one decoding step (forward pass and token choice, no readers) of "
        f"{most} rows against one of 1 row. {most} × (1-row step) / ({most}-row step) bounds the tokens/s ratio "
        "above, before prompts are read and pieces streamed:", "",
        ceiling_table])
    write_section("bench_serve.py", "Serving: continuous batching vs one thread per request",
                  ["torch", "transformers"], body)
    log("wrote docs/BENCHMARKS.md")


if __name__ == "__main__":
    main()
