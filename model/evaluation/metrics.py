"""Metrics of a model's text: bits per character, character-level BLEU-4 and ROUGE-L of its replies, and
(subject, relation, object) triple scores.

Bits per character: the text is converted with OpenCC as prepare_data.py converts its corpus
(`opencc_config`, t2s by default, so a model is scored on the kind of text it was trained on), tokenised
exactly as for pretraining (`TokenStream`: each document followed by EOS), and the model's negative
log-likelihood of every token of that stream (documents and their EOS) is summed, in bits, and divided by
the number of characters of the (converted) documents:
- decoder: the stream, preceded by one EOS (the context a document has in pretraining), is scored in
  sliding windows of `block_size` tokens that advance by `stride`; every token is scored exactly once,
  with at least `block_size - stride` tokens of context when there are that many before it;
- T5: the stream is cut into chunks of `block_size` tokens and each chunk is the decoder target for an
  encoder input of one EOS token, i.e. the decoder's unconditional language model. The figure compares
  T5 checkpoints with each other, not with a decoder's.

Generation and triples: greedy (or beam) replies to single-turn prompts (`reply_to_prompts`), scored
against references.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from model.evaluation.benchmarks import max_prompt_length
from model.inference.generation import generate_replies
from utils.data.text import CJK_CHAR, distinct_n, repeated_ngram_share, to_simplified
from utils.errors import UserError
from utils.examples.pretrain_data import TokenStream, load_text_files

logger = logging.getLogger(__name__)

# Share of Chinese characters that OpenCC t2s changes: ~0% in simplified text, 30-40% in traditional text.
TRADITIONAL_SHARE_WARNING = 0.05


def convert_text_files(files: Sequence[str], split: str, opencc_config: str, target: Path) -> dict:
    """Write the `text` column of `files` (one row per document, as the token stream reads them) to the
    JSON-lines file `target`, converted with the OpenCC profile `opencc_config` as prepare_data.py does
    ('none' = as it is). Returns the conversion, the characters it changed, and the share of the Chinese
    characters that t2s changes (measured also when nothing is converted: how traditional the text is)."""
    try:
        to_simplified("", "t2s" if opencc_config == "none" else opencc_config)
    except RuntimeError as err:
        raise UserError(f"not an OpenCC profile ({err})", field="opencc_config",
                        fix="pass one of OpenCC's profiles (t2s, tw2sp, hk2s, ...) as prepare_data.py takes, "
                            "or none") from None
    data, _ = load_text_files(list(files), split, ["text"], "bpc_files")
    changed = traditional = chinese = 0
    with open(target, "w", encoding="utf-8") as handle:
        for batch in data.iter(batch_size=1024):
            for text in batch["text"]:
                simplified = to_simplified(text, "t2s")
                converted = text if opencc_config == "none" else simplified if opencc_config == "t2s" else \
                    to_simplified(text, opencc_config)
                traditional += _characters_changed(text, simplified)
                changed += _characters_changed(text, converted)
                chinese += len(CJK_CHAR.findall(text))
                handle.write(json.dumps({"text": converted}, ensure_ascii=False) + "\n")
    result = {"opencc_config": opencc_config, "characters_changed": changed,
              "traditional_share": traditional / chinese if chinese else 0.0}
    if traditional_warning(result):
        logger.warning("bpc text: %s", traditional_warning(result))
    elif opencc_config != "none":
        logger.info("bpc text: OpenCC %s changed %s of %s Chinese characters", opencc_config, f"{changed:,}",
                    f"{chinese:,}")
    return result


def traditional_warning(result: dict) -> str | None:
    """What is wrong with a bpc figure taken on largely traditional text left unconverted, or None."""
    if result.get("opencc_config", "none") != "none" or result.get("traditional_share", 0) < TRADITIONAL_SHARE_WARNING:
        return None
    return (f"{100 * result['traditional_share']:.0f}% of the Chinese characters are traditional and were scored as "
            "they are (--opencc_config none); prepare_data.py converts its corpus to simplified by default, so a "
            "model trained on it scores this text worse: pass --opencc_config t2s")


def _characters_changed(before: str, after: str) -> int:
    """Characters OpenCC replaced (it converts character for character; a length change counts in full)."""
    return sum(a != b for a, b in zip(before, after)) + abs(len(before) - len(after))


def _windows(length: int, block_size: int, stride: int) -> list[tuple[int, int, int]]:
    """(input start, first scored position, end) of the sliding windows over a sequence of `length`
    tokens whose positions 1..length-1 are predicted."""
    windows, first = [], 1
    while first < length:
        end = min(first + stride, length)
        windows.append((max(0, end - block_size), first, end))
        first = end
    return windows


@torch.inference_mode()
def bits_per_character(model, tokenizer, files: Sequence[str], split: str = "validation", block_size: int = -1,
                       stride: int = -1, batch_size: int = 8, opencc_config: str = "t2s",
                       progress: bool = True) -> dict:
    """Bits per character of the `text` column of `files` after OpenCC `opencc_config` ('none' = as it is;
    see the module docstring for the definition)."""
    seq2seq = bool(model.config.is_encoder_decoder)
    if block_size <= 0:
        block_size = max_prompt_length(model, tokenizer, -1)
    if stride <= 0:
        stride = max(block_size // 2, 1)
    if not seq2seq and not 0 < stride < block_size:
        raise UserError(f"the stride ({stride}) must be between 1 and the block size ({block_size}) - 1",
                        field="bpc_stride", fix="pass a smaller --bpc_stride (default: half the block)")
    with tempfile.TemporaryDirectory(prefix="bpc-") as cache:
        text = Path(cache) / "text.jsonl"
        conversion = convert_text_files(files, split, opencc_config, text)
        stream = TokenStream.build([str(text)], split, tokenizer, Path(cache), 1)
        tokens = torch.from_numpy(stream.tokens.astype("int64"))
        characters, documents = stream.meta["chars"], stream.meta["documents"]
    if characters == 0:
        raise UserError("the files hold no text", path=", ".join(map(str, files)), field="bpc_files",
                        fix="pass non-empty text files")
    eos = tokenizer.eos_token_id
    device = model.device
    nats = 0.0
    if seq2seq:
        chunks = list(torch.split(tokens, block_size))
        encoder = torch.tensor([[eos]], device=device)
        for start in tqdm(range(0, len(chunks), batch_size), desc="bpc", unit="batch", disable=not progress):
            batch = chunks[start:start + batch_size]
            labels = torch.nn.utils.rnn.pad_sequence(batch, batch_first=True, padding_value=-100).to(device)
            logits = model(input_ids=encoder.expand(len(batch), 1), labels=labels).logits
            nats += F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), reduction="sum").item()
    else:
        ids = torch.cat([torch.tensor([eos]), tokens])
        windows = _windows(len(ids), block_size, stride)
        for start in tqdm(range(0, len(windows), batch_size), desc="bpc", unit="batch", disable=not progress):
            batch = windows[start:start + batch_size]
            inputs = [ids[a:e] for a, _, e in batch]
            labels = [torch.cat([torch.full((f - a,), -100), ids[f:e]]) for a, f, e in batch]
            width = max(len(x) for x in inputs)
            mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in inputs], device=device)
            inputs = torch.nn.utils.rnn.pad_sequence(inputs, batch_first=True, padding_value=eos).to(device)
            labels = torch.nn.utils.rnn.pad_sequence(labels, batch_first=True, padding_value=-100).to(device)
            # [-width:]: a prompt-tuning adapter's virtual tokens come first and have logits of their own
            logits = model(input_ids=inputs, attention_mask=mask).logits[:, -inputs.shape[1]:-1]
            nats += F.cross_entropy(logits.float().flatten(0, 1), labels[:, 1:].flatten(), reduction="sum").item()
    bits = nats / math.log(2)
    return {"bpc": bits / characters, "bits": bits, "characters": characters, "tokens": len(tokens),
            "documents": documents, "block_size": block_size, "stride": None if seq2seq else stride,
            "method": "t5_decoder_given_eos" if seq2seq else "sliding_window",
            "files": [str(f) for f in files], **conversion}


def reply_to_prompts(model, tokenizer, prompts: Sequence[str], max_new_tokens: int = 256, num_beams: int = 1,
                     batch_size: int = 8, progress: bool = True) -> list[str]:
    """Greedy (or beam) replies to single-turn prompts with the model's stop tokens and repetition penalty."""
    config = copy.deepcopy(model.generation_config)
    config.update(max_new_tokens=max_new_tokens, num_beams=num_beams, do_sample=False, temperature=None,
                  top_p=None, top_k=None)
    conversations = [[{"role": "user", "content": prompt}] for prompt in prompts]
    return generate_replies(model, tokenizer, conversations, config, batch_size=batch_size, progress=progress)


class _CharacterTokenizer:
    """rouge-score tokenizer: one token per non-space character (its default drops non-ASCII text)."""

    def tokenize(self, text: str) -> list[str]:
        return [c for c in text if not c.isspace()]


def repetition_metrics(replies: Sequence[str]) -> dict:
    """How much replies repeat, over characters: the mean share of repeated 4-grams within a reply
    (`utils.data.text.repeated_ngram_share`, 0-1, lower is better) and distinct-1 / distinct-2 over all
    replies (0-1, higher is more varied)."""
    return {"repeated_4gram": sum(map(repeated_ngram_share, replies)) / max(len(replies), 1),
            "distinct_1": distinct_n(list(replies), 1), "distinct_2": distinct_n(list(replies), 2)}


def text_metrics(hypotheses: Sequence[str], references: Sequence[str]) -> dict:
    """Character-level corpus BLEU-4 (sacrebleu, tokenize='char') and mean ROUGE-L F1 (rouge-score over
    characters), both in 0-100, and the hypotheses' repetition (`repetition_metrics`)."""
    import sacrebleu
    from rouge_score import rouge_scorer

    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses for {len(references)} references")
    if not hypotheses:
        return {"bleu4": 0.0, "rougeL": 0.0, "examples": 0, **repetition_metrics([])}
    bleu = sacrebleu.metrics.BLEU(tokenize="char").corpus_score(list(hypotheses), [list(references)])
    scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=_CharacterTokenizer())
    rouge = [scorer.score(ref, hyp)["rougeL"].fmeasure for hyp, ref in zip(hypotheses, references)]
    return {"bleu4": float(bleu.score), "rougeL": 100.0 * sum(rouge) / len(rouge), "examples": len(hypotheses),
            **repetition_metrics(hypotheses)}


_TRIPLE = re.compile(r"[(（]([^()（）]*)[)）]")


def parse_triples(text: str) -> list[tuple[str, ...]]:
    """Triples of ChatLM-mini-Chinese's extraction format `[(s,r,o),(s,r,o)]` (ASCII or full-width
    parentheses, ASCII commas, spaces around items ignored). An item that does not split into exactly
    three non-empty parts is kept as it is, so it counts as a wrong prediction."""
    triples = []
    for inner in _TRIPLE.findall(text):
        parts = tuple(part.strip() for part in inner.split(","))
        triples.append(parts if len(parts) == 3 and all(parts) else (inner.strip(),))
    return triples


def triple_scores(predictions: Sequence[str], references: Sequence[str]) -> dict:
    """Micro precision / recall / F1 of predicted triples against reference triples (each text a list of
    triples; duplicates within one text count once) and the share of texts whose set is exactly right."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    true_positive = predicted = gold = exact = 0
    for prediction, reference in zip(predictions, references):
        pred_set, gold_set = set(parse_triples(prediction)), set(parse_triples(reference))
        true_positive += len(pred_set & gold_set)
        predicted += len(pred_set)
        gold += len(gold_set)
        exact += pred_set == gold_set
    precision = true_positive / predicted if predicted else 0.0
    recall = true_positive / gold if gold else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1,
            "exact_match": exact / len(predictions) if predictions else 0.0,
            "true_positives": true_positive, "predicted": predicted, "gold": gold, "examples": len(predictions)}
