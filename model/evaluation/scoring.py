"""Model-side evaluation: multiple-choice scoring by letter logits, bits per character, replies to a set.

Multiple choice (C-Eval, CMMLU): each question is a chat - a system line naming the subject, k solved
dev examples as user/assistant turns (the assistant answers with the letter), then the question as the
last user turn - rendered with the tokenizer's chat template plus the generation prompt. The model's
answer is the letter among A/B/C/D whose token has the highest logit at the first reply position:
for a decoder the last prompt position, for T5 the first decoder step given the prompt as encoder input.

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
"""

from __future__ import annotations

import copy
import logging
import math
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from model.evaluation.metrics import LETTERS, Question, Subject, convert_text_files
from model.inference.generation import context_length, generate_replies
from utils.errors import UserError
from utils.examples.pretrain_data import TokenStream
from utils.tokenization.chat_format import render_prompt

logger = logging.getLogger(__name__)

SYSTEM_PROMPT = "以下是中国关于{title}考试的单项选择题，请选出其中的正确答案。"


def choice_token_ids(tokenizer) -> list[int]:
    """The token that starts a reply "A", "B", "C" or "D"; refused if two letters share it."""
    ids = [tokenizer.encode(letter, add_special_tokens=False)[0] for letter in LETTERS]
    if len(set(ids)) != len(ids):
        raise UserError("the tokenizer does not give A, B, C and D distinct first tokens",
                        field="model_name_or_path", fix="use a tokenizer trained by train_tokenizer.py")
    return ids


def question_text(question: Question) -> str:
    options = "\n".join(f"{letter}. {option}" for letter, option in zip(LETTERS, question.options))
    return f"{question.question}\n{options}\n答案："


def question_messages(question: Question, shots: Sequence[Question], title: str) -> list[dict]:
    messages = [{"role": "system", "content": SYSTEM_PROMPT.format(title=title)}]
    for shot in shots:
        messages += [{"role": "user", "content": question_text(shot)}, {"role": "assistant", "content": shot.answer}]
    return messages + [{"role": "user", "content": question_text(question)}]


def question_prompt(tokenizer, question: Question, shots: Sequence[Question], title: str,
                    max_tokens: int) -> tuple[list[int], int]:
    """Prompt ids with as many of `shots` as fit in `max_tokens`, and how many that is (the question
    itself is truncated from the left only if it does not fit alone)."""
    for count in range(len(shots), -1, -1):
        messages = question_messages(question, shots[:count], title)
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        if len(ids) <= max_tokens:
            return list(ids), count
    return render_prompt(tokenizer, messages, max_tokens), 0


def shots_for(question: Question, subject: Subject, num_shots: int) -> list[Question]:
    """The first `num_shots` dev examples of the subject, never the question itself (when the evaluated
    split is the dev split, leave-one-out)."""
    return [shot for shot in subject.shots if shot != question][:num_shots]


def max_prompt_length(model, tokenizer, max_length: int) -> int:
    if max_length > 0:
        return max_length
    limit = context_length(model, tokenizer)
    return limit if limit <= 1_000_000 else 1024  # tokenizers without a recorded length


@torch.inference_mode()
def letter_logits(model, prompts: Sequence[Sequence[int]], choice_ids: Sequence[int], pad_token_id: int,
                  batch_size: int = 8, progress: bool = True) -> torch.Tensor:
    """Logits of the `choice_ids` tokens at the first reply position of each prompt, shape (N, 4), float32.

    Prompts are batched by length. Decoders are left-padded with position ids counted over the real
    tokens, so padding does not change the result; T5 encoder inputs are right-padded and masked.
    """
    seq2seq = bool(model.config.is_encoder_decoder)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out = torch.empty(len(prompts), len(choice_ids), dtype=torch.float32)
    device, choices = model.device, torch.tensor(list(choice_ids), device=model.device)
    for start in tqdm(range(0, len(order), batch_size), desc="score", unit="batch", disable=not progress):
        index = order[start:start + batch_size]
        batch = [list(prompts[i]) for i in index]
        width = max(map(len, batch))
        pads = [width - len(p) for p in batch]
        if seq2seq:
            ids = torch.tensor([p + [pad_token_id] * n for p, n in zip(batch, pads)], device=device)
            mask = torch.tensor([[1] * len(p) + [0] * n for p, n in zip(batch, pads)], device=device)
            start_id = model.config.decoder_start_token_id
            decoder = torch.full((len(batch), 1), pad_token_id if start_id is None else start_id, device=device)
            logits = model(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder).logits[:, 0]
        else:
            ids = torch.tensor([[pad_token_id] * n + p for p, n in zip(batch, pads)], device=device)
            mask = torch.tensor([[0] * n + [1] * len(p) for p, n in zip(batch, pads)], device=device)
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=1).logits[:, -1]
        out[index] = logits.index_select(-1, choices).float().cpu()
    return out


def answer_questions(model, tokenizer, subjects: Sequence[Subject], num_shots: int = 0, batch_size: int = 8,
                     max_length: int = -1, progress: bool = True) -> tuple[dict[str, list[str]], dict[str, list[int]]]:
    """The predicted letter of every question of every subject, {subject name: [letter, ...]}, and the
    number of solved examples its prompt really held, {subject name: [shots, ...]}: fewer than `num_shots`
    when the dev split has fewer (one fewer when it is the evaluated split) or the prompt would be too long."""
    choice_ids = choice_token_ids(tokenizer)
    limit = max_prompt_length(model, tokenizer, max_length)
    prompts, owners = [], []
    shots: dict[str, list[int]] = {s.name: [] for s in subjects}
    for subject in subjects:
        for question in subject.questions:
            ids, count = question_prompt(tokenizer, question, shots_for(question, subject, num_shots),
                                         subject.title, limit)
            prompts.append(ids)
            owners.append(subject.name)
            shots[subject.name].append(count)
    logits = letter_logits(model, prompts, choice_ids, tokenizer.pad_token_id, batch_size, progress)
    predictions: dict[str, list[str]] = {s.name: [] for s in subjects}
    for owner, best in zip(owners, logits.argmax(-1).tolist()):
        predictions[owner].append(LETTERS[best])
    return predictions, shots


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
            logits = model(input_ids=inputs, attention_mask=mask).logits[:, :-1]
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
