"""Batched generation and next-token log-prob scoring over a loaded model.

Takes a (model, tokenizer) pair and lists of chat conversations. Generation sorts
conversations by length, batches them with left padding, samples with a seed per batch
and returns texts, token counts and whether each finished (EOS) inside max_new_tokens.
Scoring runs one forward pass per batch and returns the probability mass that the next
token puts on each set of candidate token ids.

Rows that share a long token prefix (the system prompt and few-shot examples) share its
KV cache: the prefix is computed once per call and each row only pays for its own
suffix. The layout is [prefix][left padding][suffix]; positions follow the attention
mask, so the result is the same as without the cache.

Knows nothing about principles or rounds.
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

    def derived(self, *parts: object) -> "Sampling":
        """A copy whose seed is derived from this one and what it is for (see derive_seed)."""
        return self.model_copy(update={"seed": derive_seed(self.seed, *parts)})


def derive_seed(seed: int, *parts: object) -> int:
    """The one way a seed is derived from the round seed and what it is for (stage, shard,
    pass, batch...): stable across processes and machines."""
    import hashlib

    text = ":".join(str(p) for p in (seed, *parts))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "big")


@dataclass
class Generation:
    text: str
    n_tokens: int
    finished: bool  # ended with EOS inside max_new_tokens


def choice_token_ids(tok, letters: tuple[str, ...] = ("A", "B")) -> list[list[int]]:
    """For each letter, every vocabulary id whose text is that letter, ignoring spaces ('A', ' A', ...)."""
    from cai.errors import InputError

    ids: dict[str, list[int]] = {x: [] for x in letters}
    for tid in sorted(tok.get_vocab().values()):
        s = tok.decode([tid]).strip()
        if s in ids:
            ids[s].append(tid)
    missing = [k for k in letters if not ids[k]]
    if missing:
        raise InputError(f"judge tokenizer has no token that spells {' or '.join(missing)}; choose another --judge model")
    return [ids[x] for x in letters]


def render(tok, conversation: list[dict], add_generation_prompt: bool = True) -> str:
    return tok.apply_chat_template(conversation, tokenize=False, add_generation_prompt=add_generation_prompt)


MIN_SHARED = 16  # shorter common prefixes are not worth a cache


def _common_prefix(seqs: list[list[int]]) -> int:
    """Length of the token prefix all rows share, leaving at least one token per row."""
    first, n = seqs[0], min(len(s) for s in seqs) - 1
    for j in range(n):
        t = first[j]
        if any(s[j] != t for s in seqs):
            return j
    return max(n, 0)


def _prefix_cache(model, prefix: list[int], device):
    import torch

    with torch.inference_mode():
        return model(input_ids=torch.tensor([prefix], device=device), use_cache=True).cache


def _batch_inputs(tok, rows: list[list[int]], prefix: list[int], cache, device):
    """input_ids/attention_mask laid out as [prefix][left pad][suffix], and a cache for them."""
    import copy

    import torch

    P = len(prefix)
    batch = tok.pad({"input_ids": [r[P:] for r in rows]}, return_tensors="pt", padding_side="left")
    ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    if not P:
        return ids, mask, None
    B = ids.shape[0]
    pre = torch.tensor([prefix], device=device).expand(B, -1)
    c = copy.deepcopy(cache)
    c.batch_repeat_interleave(B)
    return torch.cat([pre, ids], 1), torch.cat([torch.ones_like(pre), mask], 1), c


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
    P = _common_prefix(enc) if enc else 0
    prefix = enc[0][:P] if P >= MIN_SHARED else []
    cache = _prefix_cache(model, prefix, device) if prefix else None
    for b, idx in enumerate(_batches([len(e) for e in enc], sampling.batch_size)):
        ids, mask, c = _batch_inputs(tok, [enc[i] for i in idx], prefix, cache, device)
        batch = {"input_ids": ids, "attention_mask": mask}
        if c is not None:
            batch["cache"] = c
        torch.manual_seed(derive_seed(sampling.seed, "batch", b))
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
    P = _common_prefix(enc) if enc else 0
    prefix = enc[0][:P] if P >= MIN_SHARED else []
    cache = _prefix_cache(model, prefix, device) if prefix else None
    for idx in _batches([len(e) for e in enc], batch_size):
        ids, mask, c = _batch_inputs(tok, [enc[i] for i in idx], prefix, cache, device)
        pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
        with torch.inference_mode():
            logits = model(input_ids=ids[:, len(prefix):], attention_mask=mask, position_ids=pos[:, len(prefix):],
                           cache=c, logits_to_keep=1).logits[:, -1, :].float()
        probs = torch.softmax(logits, dim=-1)
        for row, i in enumerate(idx):
            out[i] = [float(probs[row, c].sum()) for c in cand]
    return out  # type: ignore[return-value]


def next_token_mass_grouped(model, tok, groups: list[tuple[str, list[str]]], candidates: list[list[int]],
                            batch_size: int = 16) -> list[list[list[float]]]:
    """Like next_token_mass for texts that come in groups sharing a head: `groups` is a list
    of (head, [tail, ...]) and each scored text is head + tail.

    Each head is computed once and its KV cache reused by all its tails (on top of the
    prefix every head shares), so k questions about one long passage cost about one
    passage. Layout: [shared prefix][pad][head][pad][tail]. Returns masses per tail.
    """
    import torch

    device = next(model.parameters()).device
    heads = [tok(h, add_special_tokens=False)["input_ids"] for h, _ in groups]
    tails = [[tok(t, add_special_tokens=False)["input_ids"] for t in ts] for _, ts in groups]
    cand = [torch.tensor(c, device=device) for c in candidates]
    P = _common_prefix(heads) if len(heads) > 1 else max(len(heads[0]) - 1, 0) if heads else 0
    prefix = heads[0][:P] if P >= MIN_SHARED else []
    cache = _prefix_cache(model, prefix, device) if prefix else None
    out: list[list[list[float]]] = [[[] for _ in ts] for ts in tails]
    order = sorted(range(len(groups)), key=lambda g: -len(heads[g]))
    packs, cur, rows = [], [], 0
    for g in order:  # pack whole groups into batches of about batch_size rows
        if cur and rows + len(tails[g]) > batch_size:
            packs.append(cur)
            cur, rows = [], 0
        cur.append(g)
        rows += len(tails[g])
    if cur:
        packs.append(cur)
    for gs in packs:
        ids, mask, c = _batch_inputs(tok, [heads[g] for g in gs], prefix, cache, device)
        pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
        with torch.inference_mode():
            head_cache = model(input_ids=ids[:, len(prefix):], attention_mask=mask, position_ids=pos[:, len(prefix):],
                               cache=c, use_cache=True, logits_to_keep=1).cache
        owner = torch.tensor([i for i, g in enumerate(gs) for _ in tails[g]], device=device)
        head_cache.batch_select_indices(owner)
        t = tok.pad({"input_ids": [x for g in gs for x in tails[g]]}, return_tensors="pt", padding_side="left")
        tail_ids, tail_mask = t["input_ids"].to(device), t["attention_mask"].to(device)
        full_mask = torch.cat([mask[owner], tail_mask], 1)
        tpos = (full_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -tail_ids.shape[1]:]
        with torch.inference_mode():
            logits = model(input_ids=tail_ids, attention_mask=full_mask, position_ids=tpos, cache=head_cache,
                           logits_to_keep=1).logits[:, -1, :].float()
        probs = torch.softmax(logits, dim=-1)
        row = 0
        for g in gs:
            for j in range(len(tails[g])):
                out[g][j] = [float(probs[row, cc].sum()) for cc in cand]
                row += 1
    return out
