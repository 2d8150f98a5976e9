"""Log-probabilities of given tokens under a decoder-only model: what an evaluation harness asks for when it
scores answers (the prompt log-likelihoods of /v1/completions with `echo` and `logprobs`).

    scores = score_tokens(model, ids, top=1)   # one TokenScore per token after the first
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class TokenScore:
    """One token's log-probability given the tokens before it, and the most likely tokens at its place."""

    logprob: float
    top: list[tuple[int, float]]  # (token id, log-probability), most likely first


def score_tokens(model, ids: list[int], top: int = 0) -> list[TokenScore]:
    """The score of each of `ids[1:]` given the tokens before it (one forward pass); the first token has no
    context to be scored in. `top`: how many of the most likely tokens to give at each place (0 = none)."""
    if model.config.is_encoder_decoder:
        raise ValueError("token log-probabilities of a prompt need a decoder-only model")
    with torch.inference_mode():
        # [-len(ids):]: a prompt-tuning adapter's virtual tokens come first and have logits of their own
        logits = model(input_ids=torch.tensor([ids], device=model.device)).logits[0, -len(ids):-1].float()
        logprobs = torch.log_softmax(logits, dim=-1)
        chosen = logprobs.gather(1, torch.tensor(ids[1:], device=logprobs.device).unsqueeze(1)).squeeze(1)
        best = logprobs.topk(top, dim=-1) if top > 0 else None
    scores = []
    for place, logprob in enumerate(chosen.tolist()):
        pairs = list(zip(best.indices[place].tolist(), best.values[place].tolist())) if best is not None else []
        scores.append(TokenScore(logprob, pairs))
    return scores
