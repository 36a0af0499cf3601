"""How each running reply's next token is chosen from one decode step's logits.

Greedy (argmax) unless its request asked for ``Sampling``. Then, as transformers' ``generate(do_sample=True)``
does it, with its own logits processors: the repetition penalty over every token the reply has seen (its
prompt and what it wrote so far), then temperature, then top-p, then a draw from what is left. Rows with
the same settings are processed together; each draws from its own random generator when it has a seed.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from transformers import (LogitsProcessorList, RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
                          TopPLogitsWarper)

from bot.engines import Sampling


def generator_for(sampling: Sampling | None, device) -> torch.Generator | None:
    """A seeded generator for a reply that asked for one (None: torch's global one)."""
    if sampling is None or sampling.seed is None:
        return None
    return torch.Generator(device=device).manual_seed(sampling.seed)


def pick_tokens(logits: torch.Tensor, samplings: list[Sampling | None], seen: list[list[int]],
                generators: list[torch.Generator | None]) -> list[int]:
    """Row i's next token, for logits [n, vocab]; seen[i] = its prompt + reply tokens so far."""
    chosen = logits.argmax(-1)
    groups: dict[Sampling, list[int]] = defaultdict(list)
    for i, sampling in enumerate(samplings):
        if sampling is not None:
            groups[Sampling(sampling.temperature, sampling.top_p, sampling.repetition_penalty)].append(i)
    for sampling, rows in groups.items():
        scores = _processors(sampling)(_padded([seen[i] for i in rows], logits.device), logits[rows])
        if sampling.temperature == 0:
            chosen[rows] = scores.argmax(-1)
            continue
        probs = scores.softmax(-1)
        for row, i in enumerate(rows):
            chosen[i] = torch.multinomial(probs[row], 1, generator=generators[i])[0]
    return chosen.tolist()


def _processors(sampling: Sampling) -> LogitsProcessorList:
    steps = LogitsProcessorList()
    if sampling.repetition_penalty != 1.0:
        steps.append(RepetitionPenaltyLogitsProcessor(float(sampling.repetition_penalty)))
    if sampling.temperature > 0:
        steps.append(TemperatureLogitsWarper(float(sampling.temperature)))
        if sampling.top_p < 1.0:
            steps.append(TopPLogitsWarper(float(sampling.top_p)))
    return steps


def _padded(rows: list[list[int]], device) -> torch.Tensor:
    """Token rows as one tensor, each padded with its own first token (a repeat changes no penalty)."""
    width = max(map(len, rows))
    return torch.tensor([row + row[:1] * (width - len(row)) for row in rows], device=device)
