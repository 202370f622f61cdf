"""Batched generation and next-token log-prob scoring over a loaded model.

Takes a (model, tokenizer) pair and lists of chat conversations. Generation sorts
conversations by length, batches them with left padding, samples with a seed per batch
and returns texts, token counts and whether each finished (EOS) inside max_new_tokens.
Scoring runs one forward pass per batch and returns the probability mass that the next
token puts on each set of candidate token ids. Knows nothing about principles or rounds.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field


class Sampling(BaseModel):
    """Sampling settings; recorded in every row's provenance."""

    model_config = ConfigDict(extra="forbid")

    max_new_tokens: int = Field(96, gt=0, le=4096)
    temperature: float = Field(0.7, ge=0)
    top_p: float = Field(0.9, gt=0, le=1)
    batch_size: int = Field(16, gt=0)
    seed: int = 0


@dataclass
class Generation:
    text: str
    n_tokens: int
    finished: bool  # ended with EOS inside max_new_tokens


def render(tok, conversation: list[dict], add_generation_prompt: bool = True) -> str:
    return tok.apply_chat_template(conversation, tokenize=False, add_generation_prompt=add_generation_prompt)


def _batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def generate(model, tok, conversations: list[list[dict]], sampling: Sampling, *, prefixes: list[str] | None = None) -> list[Generation]:
    """Answer every conversation, batched; `prefixes` (optional) start each answer."""
    import torch

    texts = [render(tok, c) + (prefixes[i] if prefixes else "") for i, c in enumerate(conversations)]
    enc = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    out: list[Generation | None] = [None] * len(texts)
    eos = {tok.eos_token_id} | ({model.generation_config.eos_token_id} if isinstance(model.generation_config.eos_token_id, int) else set(model.generation_config.eos_token_id or []))
    device = next(model.parameters()).device
    for b, idx in enumerate(_batches([len(e) for e in enc], sampling.batch_size)):
        batch = tok.pad({"input_ids": [enc[i] for i in idx]}, return_tensors="pt", padding_side="left")
        batch = {k: v.to(device) for k, v in batch.items()}
        torch.manual_seed(sampling.seed * 1_000_003 + b)
        kw = dict(max_new_tokens=sampling.max_new_tokens, pad_token_id=tok.pad_token_id)
        if sampling.temperature > 0:
            kw.update(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p)
        else:
            kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        with torch.inference_mode():
            gen = model.generate(**batch, **kw)
        new = gen[:, batch["input_ids"].shape[1] :].tolist()
        for row, i in enumerate(idx):
            ids = new[row]
            finished = False
            for j, t in enumerate(ids):
                if t in eos:
                    ids, finished = ids[:j], True
                    break
            ids = [t for t in ids if t != tok.pad_token_id]
            out[i] = Generation(tok.decode(ids, skip_special_tokens=True).strip(), len(ids), finished)
    return out  # type: ignore[return-value]


def next_token_mass(model, tok, texts: list[str], candidates: list[list[int]], batch_size: int = 16) -> list[list[float]]:
    """For each prefix text, the next-token probability summed over each candidate id set."""
    import torch

    enc = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    out: list[list[float] | None] = [None] * len(texts)
    device = next(model.parameters()).device
    cand = [torch.tensor(c, device=device) for c in candidates]
    for idx in _batches([len(e) for e in enc], batch_size):
        batch = tok.pad({"input_ids": [enc[i] for i in idx]}, return_tensors="pt", padding_side="left")
        batch = {k: v.to(device) for k, v in batch.items()}
        with torch.inference_mode():
            logits = model(**batch, logits_to_keep=1).logits[:, -1, :].float()
        probs = torch.softmax(logits, dim=-1)
        for row, i in enumerate(idx):
            out[i] = [float(probs[row, c].sum()) for c in cand]
    return out  # type: ignore[return-value]
