"""Batched tensor operations behind the sampler: masking, penalties, filtering, noise.

Every function works on a whole batch of rows at once; per-row parameters arrive as
tensors (or lists turned into tensors here), never as a Python loop over the vocabulary.
"""
from __future__ import annotations

import numpy as np
import torch

_MASK64 = (1 << 64) - 1


def mask_token_ids_(logits: torch.Tensor, token_ids: list[list[int]]) -> torch.Tensor:
    """Set logits[i, token_ids[i]] to -inf for every row i, in place."""
    rows = [row for row, ids in enumerate(token_ids) for _ in ids]
    if rows:
        cols = [t for ids in token_ids for t in ids]
        index = torch.tensor([rows, cols], dtype=torch.long).to(logits.device, non_blocking=True)
        logits[index[0], index[1]] = float("-inf")
    return logits


def unpack_token_bitmask(bitmask: np.ndarray, vocab_size: int, device: torch.device) -> torch.Tensor:
    """bool [rows, vocab_size]: which tokens each row of an xgrammar bitmask allows (bit t of
    the int32 words, least significant first). On a GPU the packed words cross and unpack
    there (32x less to copy); on the CPU numpy unpacks them in one pass."""
    if device.type == "cpu":
        bits = np.unpackbits(np.ascontiguousarray(bitmask).view(np.uint8), axis=1, count=vocab_size,
                             bitorder="little")
        return torch.from_numpy(bits).view(torch.bool)
    words = torch.from_numpy(np.ascontiguousarray(bitmask)).to(device, non_blocking=True)
    shifts = torch.arange(32, dtype=torch.int32, device=device)
    return ((words.unsqueeze(-1) >> shifts) & 1).view(words.shape[0], -1)[:, :vocab_size].bool()


def masked_by_bitmask(logits: torch.Tensor, bitmask: np.ndarray, mask_rows: list[int]) -> torch.Tensor:
    """A new float32 tensor: `logits` with -inf wherever row mask_rows[i] of `bitmask` forbids a
    token of row i (one pass: the copy the sampler makes anyway)."""
    allowed = unpack_token_bitmask(bitmask[mask_rows], logits.shape[1], logits.device)
    return torch.where(allowed, logits.float(), torch.tensor(float("-inf"), device=logits.device))


def apply_token_bitmask_(logits: torch.Tensor, rows: list[int], bitmask: np.ndarray,
                         mask_rows: list[int]) -> torch.Tensor:
    """Set logits[rows[i], t] to -inf, in place, wherever row mask_rows[i] of `bitmask` forbids t."""
    index = torch.tensor(rows, device=logits.device)
    logits[index] = masked_by_bitmask(logits[index], bitmask, mask_rows)
    return logits


def token_counts(token_ids: list[list[int]], vocab_size: int, device: torch.device) -> torch.Tensor:
    """[len(token_ids), vocab_size] float32: how often each token occurs in each row's list."""
    width = max(map(len, token_ids), default=0)
    counts = torch.zeros(len(token_ids), vocab_size + 1, device=device)
    if width:
        # Pad with an extra column (vocab_size) that is dropped afterwards.
        padded = [ids + [vocab_size] * (width - len(ids)) for ids in token_ids]
        index = torch.tensor(padded, dtype=torch.long).to(device, non_blocking=True)
        counts.scatter_add_(1, index, torch.ones(index.shape, device=device))
    return counts[:, :vocab_size]


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor,
                             penalty: torch.Tensor) -> torch.Tensor:
    """Where `seen` [R, V] is set: divide positive logits by penalty [R], multiply negative ones."""
    penalty = penalty.unsqueeze(1)
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


def apply_frequency_presence_penalties(logits: torch.Tensor, output_counts: torch.Tensor,
                                       frequency: torch.Tensor, presence: torch.Tensor) -> torch.Tensor:
    """logits - frequency * count - presence * (count > 0), per row."""
    present = (output_counts > 0).to(logits.dtype)
    return logits - frequency.unsqueeze(1) * output_counts - presence.unsqueeze(1) * present


def apply_top_k_(logits: torch.Tensor, top_k: torch.Tensor, max_top_k: int) -> torch.Tensor:
    """Mask (-inf, in place) tokens below each row's k-th best; top_k [R] long, 0 = off.

    For batches that need no top-p: a top-k of the largest k is far cheaper than a sort.
    Ties with the k-th value are kept (as vLLM does).
    """
    vocab = logits.shape[-1]
    k = top_k.clamp(min=1, max=vocab)
    kth_value = logits.topk(min(max_top_k, vocab), dim=-1).values.gather(1, (k - 1).unsqueeze(1))
    kth_value.masked_fill_((top_k <= 0).unsqueeze(1), float("-inf"))
    return logits.masked_fill_(logits < kth_value, float("-inf"))


def apply_top_k_top_p_(logits: torch.Tensor, top_k: torch.Tensor | None,
                       top_p: torch.Tensor) -> torch.Tensor:
    """Mask (-inf, in place) tokens outside each row's top-k, then top-p, set; one sort.

    top_k [R] long, 0 = off. top_p [R] float, values >= 1 = off: keeps the smallest
    prefix (best first) whose probability mass reaches p, at least the best token.
    Both sets are prefixes of the sorted row, so each comes down to a cutoff logit and
    the mask is applied in vocabulary order (no scatter back); ties with the cutoff stay.
    """
    sorted_logits = logits.sort(dim=-1, descending=True).values
    vocab = logits.shape[-1]
    if top_k is not None:
        k = torch.where(top_k > 0, top_k.clamp(max=vocab), vocab)
        kth_value = sorted_logits.gather(1, (k - 1).unsqueeze(1))
        sorted_logits.masked_fill_(sorted_logits < kth_value, float("-inf"))
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1).sub_(probs)
    # Rows with p >= 1 must keep everything even when the cumsum rounds past 1.
    threshold = torch.where(top_p >= 1, 2.0, top_p).unsqueeze(1)
    kept = (mass_before < threshold) & (probs > 0)
    cutoff = sorted_logits.gather(1, (kept.sum(dim=-1, keepdim=True) - 1).clamp(min=0))
    return logits.masked_fill_(logits < cutoff, float("-inf"))


def apply_min_p_(probs: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Zero (in place) probabilities below min_p [R] times the row's largest probability.

    The rows are left unnormalized: the exponential race only compares within a row.
    """
    threshold = probs.amax(dim=-1, keepdim=True) * min_p.unsqueeze(1)
    return probs.masked_fill_(probs < threshold, 0.0)


def mix_seed(seed: int, step: int) -> int:
    """A 63-bit generator seed from (sequence seed, step): splitmix64 of the pair."""
    x = (seed * 0x9E3779B97F4A7C15 + step + 1) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (x ^ (x >> 31)) >> 1


def seeded_exponential_(row: torch.Tensor, seed: int, step: int) -> torch.Tensor:
    """Fill `row` (in place) with Exp(1) noise that depends only on (seed, step, row size)."""
    generator = torch.Generator(device=row.device)
    generator.manual_seed(mix_seed(seed, step))
    return exponential_(row, generator)


def exponential_(noise: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Fill `noise` with Exp(1) draws, in place, as -log(U), U ~ Uniform[0, 1).

    On CPU this is ~5x faster than Tensor.exponential_. The clamp keeps q > 0, which
    keeps a zero probability at 0 / q = 0 rather than nan.
    """
    noise.uniform_(generator=generator).log_().neg_()
    return noise.clamp_(min=torch.finfo(noise.dtype).tiny)


def exponential_race(probs: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """argmax(probs / q) with q ~ Exp(1): a draw from each row of `probs` (need not sum to 1)."""
    return probs.div_(noise).argmax(dim=-1)
