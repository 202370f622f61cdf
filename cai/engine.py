"""The engine seam: what stages ask of a model, without seeing token ids or a server.

Two questions: `generate(conversations, sampling)` (texts, token counts, finished flags)
and `choice_mass(conversations, prefixes, choices)`: with each conversation's assistant
turn started with its prefix ("The better response is ("), the probability that the
next token spells each choice letter, summed over every token that spells it.
`groups` (optional) tells which rows share a long passage, so an engine may compute it
once. A third verb, `score(conversations)`, is a reward model's scalar for each whole
conversation (`RewardEngine`, the round's reward role). `LocalEngine` answers in this
process (batched generation, KV-prefix reuse);
`cai.server.ServerEngine` asks an OpenAI-compatible server. A scripted engine (tests)
can stand in for either.

Knows generation; knows nothing about rounds, files or queues.
"""

from __future__ import annotations

from typing import Protocol

from cai.generation import Generation, Sampling


class Engine(Protocol):
    name: str  # what produced the text, for provenance

    def generate(self, conversations: list[list[dict]], sampling: Sampling, *,
                 prefixes: list[str] | None = None) -> list[Generation]: ...

    def choice_mass(self, conversations: list[list[dict]], prefixes: list[str], choices: tuple[str, ...] = ("A", "B"), *,
                    groups: list | None = None, batch_size: int = 16) -> list[list[float]]: ...


class LocalEngine:
    """In-process transformers: batched generation over a loaded model."""

    def __init__(self, model, tok, name: str = "in-process") -> None:
        self.model, self.tok, self.name = model, tok, name

    def generate(self, conversations: list[list[dict]], sampling: Sampling, *,
                 prefixes: list[str] | None = None) -> list[Generation]:
        from cai.generation import generate

        return generate(self.model, self.tok, conversations, sampling, prefixes=prefixes)

    def choice_mass(self, conversations: list[list[dict]], prefixes: list[str], choices: tuple[str, ...] = ("A", "B"), *,
                    groups: list | None = None, batch_size: int = 16) -> list[list[float]]:
        from cai.generation import choice_token_ids, next_token_mass, next_token_mass_grouped, render

        candidates = choice_token_ids(self.tok, choices)
        texts = [render(self.tok, c) + p for c, p in zip(conversations, prefixes)]
        if groups is None:
            return next_token_mass(self.model, self.tok, texts, candidates, batch_size=batch_size)
        # rows of a group share a passage: split each at the last line break of the group's common prefix
        members: dict = {}
        for n, g in enumerate(groups):
            members.setdefault(g, []).append(n)
        keys = list(members)
        heads = []
        for g in keys:
            rows = [texts[n] for n in members[g]]
            common = rows[0][: _common_len(rows)]
            heads.append(common[: common.rfind("\n") + 1])
        scored = next_token_mass_grouped(self.model, self.tok,
                                         [(h, [texts[n][len(h):] for n in members[g]]) for g, h in zip(keys, heads)],
                                         candidates, batch_size)
        out: list[list[float]] = [[] for _ in texts]
        for g, masses in zip(keys, scored):
            for n, m in zip(members[g], masses):
                out[n] = m
        return out


class RewardEngine:
    """In-process reward model: the policy's base as a sequence classifier with the round's
    reward adapter (cai.train.reward); `score` is its scalar per conversation."""

    def __init__(self, base_spec: str, adapter: str, name: str = "reward") -> None:
        from peft import PeftModel
        from transformers import AutoModelForSequenceClassification

        from cai import models

        base = models.base_path(models.resolve(base_spec))
        self.tok = models.load_tokenizer(base, padding_side=None)
        model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1, **models.placement())
        model.config.pad_token_id = self.tok.pad_token_id
        self.model = PeftModel.from_pretrained(model, adapter).eval()
        self.name = name

    def score(self, conversations: list[list[dict]], batch_size: int = 8) -> list[float]:
        import torch

        texts = [self.tok.apply_chat_template(c, tokenize=False) for c in conversations]
        out: list[float] = []
        device = next(self.model.parameters()).device
        for i in range(0, len(texts), batch_size):
            enc = self.tok(texts[i : i + batch_size], return_tensors="pt", padding=True, padding_side="right",
                           add_special_tokens=False)
            with torch.inference_mode():
                out += self.model(**{k: v.to(device) for k, v in enc.items()}).logits.squeeze(-1).float().tolist()
        return out


def _common_len(texts: list[str]) -> int:
    import os

    return len(os.path.commonprefix(texts))
