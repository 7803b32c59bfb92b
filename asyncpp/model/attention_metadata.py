"""Per-step index tensors for paged attention, built once per microbatch and shared by all layers.

Speculative decoding's verified positions (SeqWork.num_proposed) are decodes too, one per
position, each attending to the context up to itself (the step writes every position's K/V
before any layer reads): one batched decode call instead of a prefill gather and attention per
sequence, measured 1.2x faster on the bundled model (4 sequences, 5 positions each, context
250 and 1000, CPU) although each position reads the context again.

Decode sequences (one new token) are handled together: by the compiled kernel (kernels.py), which
needs only their block tables and lengths, or else by two `embedding_bag` passes that read the
paged cache directly (see attention.py), whose index arrays are built here with numpy, much
cheaper than many small torch ops.

Sliding-window layers (sliding_window.py) get their own prefill masks and decode batch, built
once per distinct window: a decode reads only the blocks from the one holding its first
position in the window (earlier positions of that block are masked; the kernel takes that
first position per sequence), a prefill chunk gathers the cache from there. A sequence whose
context fits its window shares the full view.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np
import torch

from asyncpp.core.microbatch import SeqWork
from asyncpp.model.kv_quant import Fp8Format
from asyncpp.model.sliding_window import first_positions


@dataclass(slots=True)
class PrefillSeq:
    """One sequence computing several tokens: a whole prompt or a chunk of one."""
    token_start: int  # its rows in the flattened token batch
    token_end: int
    context_len: int  # tokens it attends to: cached ones + its own
    context_blocks: torch.Tensor | None  # blocks holding the context (None: no cached tokens)
    mask: torch.Tensor | None  # [tokens, keys] bool, True = attend (None: plain causal)
    kv_start: int = 0  # position of the first key read (a window's: at a block start)


@dataclass(slots=True)
class KernelDecode:
    """All one-token sequences of the step, for the compiled kernel."""
    token_index: torch.Tensor | None  # their rows in the token batch (None: every row, in order)
    num_seqs: int
    block_tables: torch.Tensor  # [seqs, max blocks] int32, zero-padded
    context_lens: torch.Tensor  # [seqs] int32: positions each attends to, itself included
    first_pos: torch.Tensor | None = None  # [seqs] int32: a sliding window's first position attended


@dataclass(slots=True)
class LatentDecode:
    """All one-token sequences of the step, for multi-head latent attention (mla.py): the
    blocks each reads, gathered whole, and the positions past its context."""
    token_index: torch.Tensor | None  # their rows in the token batch (None: every row, in order)
    num_seqs: int
    block_tables: torch.Tensor  # [seqs, blocks of the longest] int64, zero-padded
    pad_mask: torch.Tensor  # [seqs, 1, blocks * block_size] True past the sequence's context
    pad_rows: torch.Tensor  # the same positions as rows of the gathered [seqs * blocks * block_size, entry]


@dataclass(slots=True)
class DecodeBatch:
    """All one-token sequences of the step, for the two embedding_bag passes."""
    token_index: torch.Tensor | None  # their rows in the token batch (None: every row, in order)
    num_seqs: int
    padded_len: int  # the most blocks a sequence reads, in positions
    score_index: torch.Tensor  # K pass: rows of the K cache viewed [blocks*kv_heads*head_dim, block_size]
    score_offsets: torch.Tensor  # one bag per (seq, head, block); empty bags pad short sequences
    query_rows: torch.Tensor  # for each non-empty bag, its (seq, head) query row
    pad_mask: torch.Tensor  # [seqs, 1, padded_len] True where the position is not attended
    value_index: torch.Tensor  # V pass: rows of the V cache viewed [slots*kv_heads, head_dim]
    value_offsets: torch.Tensor  # one bag per (seq, head)
    prob_index: torch.Tensor  # for each V row, its probability in the flattened [seqs*heads, padded_len]
    blocks: torch.Tensor | None = None  # 8-bit cache: the blocks the indices count in, widened per step


@dataclass(slots=True)
class AttentionMetadata:
    num_tokens: int
    positions: torch.Tensor  # [tokens]
    slot_mapping: torch.Tensor  # [tokens] where each new K/V goes: block * block_size + offset
    slot_blocks: torch.Tensor  # [tokens] the block of each slot
    slot_offsets: torch.Tensor  # [tokens] the offset inside it
    prefills: list[PrefillSeq]
    decode: KernelDecode | DecodeBatch | LatentDecode | None
    kv_format: Fp8Format | None = None  # None: the cache holds the model's dtype
    windows: dict[int, tuple[list[PrefillSeq], KernelDecode | DecodeBatch | None]] = field(default_factory=dict)

    def view(self, window: int | None) -> tuple[list[PrefillSeq], KernelDecode | DecodeBatch | None]:
        """What a layer with this sliding window (None: full attention) reads."""
        return (self.prefills, self.decode) if window is None else self.windows[window]


@dataclass(frozen=True, slots=True)
class HeadLayout:
    num_heads: int  # query heads on this rank
    num_kv_heads: int  # KV heads on this rank
    head_dim: int
    block_size: int
    kv_format: Fp8Format | None = None
    decode_kernel: bool = False  # decodes run through the compiled kernel (kernels.py)
    latent: bool = False  # a multi-head latent attention cache (mla.py): decodes as LatentDecode
    windows: tuple[int, ...] = ()  # the distinct sliding windows of this rank's layers


def build_metadata(seqs: list[SeqWork], layout: HeadLayout, device: torch.device | str) -> AttentionMetadata:
    bs = layout.block_size
    lengths = np.fromiter((len(s.token_ids) for s in seqs), dtype=np.int64, count=len(seqs))
    starts = np.fromiter((s.start_pos for s in seqs), dtype=np.int64, count=len(seqs))
    token_starts = np.concatenate([[0], np.cumsum(lengths)])
    num_tokens = int(token_starts[-1])
    seq_of_token = np.repeat(np.arange(len(seqs)), lengths)
    positions = np.arange(num_tokens) - token_starts[:-1][seq_of_token] + starts[seq_of_token]
    tables, table_starts = _flat_tables(seqs)
    slot_blocks = tables[table_starts[seq_of_token] + positions // bs]
    slot_offsets = positions % bs

    to = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(device)  # noqa: E731
    prefills, prefill_seqs, decode_rows, decode_seqs = [], [], [], []
    for i, s in enumerate(seqs):
        a, b = int(token_starts[i]), int(token_starts[i + 1])
        if b - a == 1 or s.num_proposed:  # a verification's positions: one decode each (see below)
            decode_rows.extend(range(a, b))
            decode_seqs.extend([s] * (b - a))
            continue
        prefills.append(_prefill(s, a, b, bs, device))
        prefill_seqs.append(s)
    decode = index = None
    rows = np.asarray(decode_rows, dtype=np.int64)
    ctx = positions[rows] + 1  # positions each decode attends to, itself included
    if decode_rows:
        index = None if len(rows) == num_tokens else to(rows)
        if layout.latent:
            decode = _latent_decode(decode_seqs, ctx, index, bs, to)
        elif layout.decode_kernel:
            decode = _kernel_decode(decode_seqs, ctx, index, to)
        else:
            decode = _decode_batch(decode_seqs, ctx, index, layout, to)
    windows = {}
    for w in layout.windows:  # a sequence whose context fits in the window keeps the full view
        window_decode = decode
        if decode is not None and int(ctx.max()) > w:
            window_decode = (_kernel_window(decode, ctx, w, to) if isinstance(decode, KernelDecode)
                             else _decode_batch(decode_seqs, ctx, index, layout, to, w))
        windows[w] = ([p if s.start_pos + len(s.token_ids) <= w else _prefill(s, p.token_start, p.token_end, bs,
                                                                             device, w)
                       for s, p in zip(prefill_seqs, prefills)], window_decode)
    return AttentionMetadata(num_tokens, to(positions), to(slot_blocks * bs + slot_offsets),
                             to(slot_blocks), to(slot_offsets), prefills, decode, layout.kv_format, windows)


def _flat_tables(seqs: list[SeqWork]) -> tuple[np.ndarray, np.ndarray]:
    sizes = np.fromiter((len(s.block_table) for s in seqs), dtype=np.int64, count=len(seqs))
    flat = np.fromiter((b for s in seqs for b in s.block_table), dtype=np.int64, count=int(sizes.sum()))
    return flat, np.concatenate([[0], np.cumsum(sizes)])[:-1]


def _prefill(s: SeqWork, a: int, b: int, bs: int, device, window: int | None = None) -> PrefillSeq:
    context = s.start_pos + b - a
    if s.start_pos == 0:
        mask = None if window is None or context <= window else prefill_mask(0, context, 0, window, device)
        return PrefillSeq(a, b, context, None, mask)
    first = 0 if window is None else int(first_positions(s.start_pos, window))  # of the chunk's first query
    kv_start = first // bs * bs  # whole blocks: the cache is gathered block by block
    blocks = torch.tensor(s.block_table[kv_start // bs: -(-context // bs)], dtype=torch.long, device=device)
    return PrefillSeq(a, b, context, blocks, prefill_mask(s.start_pos, context, kv_start, window, device), kv_start)


def prefill_mask(query_start: int, context: int, kv_start: int, window: int | None, device) -> torch.Tensor:
    """[queries, keys] True where query position q (query_start..context-1) attends key
    position k (kv_start..context-1): k <= q, and inside the window."""
    q = torch.arange(query_start, context, device=device)[:, None]
    k = torch.arange(kv_start, context, device=device)[None, :]
    mask = k <= q
    return mask if window is None else mask & (k > q - window)


def _kernel_decode(seqs: list[SeqWork], ctx: np.ndarray, token_index, to) -> KernelDecode:
    widest = max(len(s.block_table) for s in seqs)
    tables = np.zeros((len(seqs), widest), dtype=np.int32)
    for i, s in enumerate(seqs):
        tables[i, : len(s.block_table)] = s.block_table
    return KernelDecode(token_index, len(seqs), to(tables), to(ctx.astype(np.int32)))


def _latent_decode(seqs: list[SeqWork], ctx: np.ndarray, token_index, bs: int, to) -> LatentDecode:
    nblocks = -(-ctx // bs)
    tables = np.zeros((len(seqs), int(nblocks.max())), dtype=np.int64)
    for i, s in enumerate(seqs):
        tables[i, : nblocks[i]] = s.block_table[: nblocks[i]]
    pad = np.arange(tables.shape[1] * bs)[None, None, :] >= ctx[:, None, None]
    return LatentDecode(token_index, len(seqs), to(tables), to(pad), to(np.flatnonzero(pad)))


def _kernel_window(full: KernelDecode, ctx: np.ndarray, window: int, to) -> KernelDecode:
    """The same tables and lengths, with the first position each sequence attends to."""
    return dataclasses.replace(full, first_pos=to(first_positions(ctx - 1, window).astype(np.int32)))


def _decode_batch(seqs: list[SeqWork], ctx: np.ndarray, token_index, layout: HeadLayout, to,
                  window: int | None = None) -> DecodeBatch:
    """Each sequence reads positions first..ctx-1 (first = 0 without a window) from the
    blocks that hold them; the positions before `first` in its first block are masked."""
    H, hd, bs = layout.num_heads, layout.head_dim, layout.block_size
    group = H // layout.num_kv_heads
    D = len(seqs)
    first = np.zeros(D, dtype=np.int64) if window is None else first_positions(ctx - 1, window)
    skip = first // bs  # blocks wholly before the window: not read
    nblocks = -(-ctx // bs) - skip
    lo, hi = first - skip * bs, ctx - skip * bs  # the attended positions, counted from the first block read
    maxb = int(nblocks.max())
    padded = maxb * bs
    table = np.zeros((D, maxb), dtype=np.int64)
    for i, s in enumerate(seqs):
        table[i, : nblocks[i]] = s.block_table[skip[i]: skip[i] + nblocks[i]]
    blocks = None
    if layout.kv_format is not None:  # index the step's blocks, widened into a dense copy, in table order
        used = np.arange(maxb)[None, :] < nblocks[:, None]
        blocks = to(table[used])
        table[used] = np.arange(int(nblocks.sum()))
    kv_head = (np.arange(H) // group)[None, :, None]  # [1, H, 1]

    # K pass: bag (seq, head, block) = the head_dim rows of K[block, kv_head] ([head_dim, block_size]).
    block_ok = np.broadcast_to((np.arange(maxb)[None, :] < nblocks[:, None])[:, None, :], (D, H, maxb))
    row0 = ((table[:, None, :] * layout.num_kv_heads + kv_head) * hd)[block_ok]
    score_index = (row0[:, None] + np.arange(hd)[None, :]).reshape(-1)
    bags_before = np.concatenate([[0], np.cumsum(nblocks)[:-1]])[:, None, None] * H \
        + np.arange(H)[None, :, None] * nblocks[:, None, None] \
        + np.minimum(np.arange(maxb)[None, None, :], nblocks[:, None, None])
    query_rows = np.broadcast_to((np.arange(D)[:, None] * H + np.arange(H)[None, :])[:, :, None], (D, H, maxb))

    # V pass: bag (seq, head) = V rows of every attended position, weighted by its probability.
    pos = np.arange(padded)
    attended = (pos[None, :] >= lo[:, None]) & (pos[None, :] < hi[:, None])  # [D, padded]
    pos_ok = np.broadcast_to(attended[:, None, :], (D, H, padded))
    slot = table[:, pos // bs] * bs + pos % bs  # [D, padded]
    value_index = (slot[:, None, :] * layout.num_kv_heads + kv_head)[pos_ok]
    prob_index = ((np.arange(D)[:, None, None] * H + np.arange(H)[None, :, None]) * padded + pos)[pos_ok]
    count = hi - lo
    value_offsets = (np.concatenate([[0], np.cumsum(count)[:-1]])[:, None] * H
                     + np.arange(H)[None, :] * count[:, None]).reshape(-1)
    pad_mask = ~attended[:, None, :]
    score_offsets = (bags_before * hd).reshape(-1)
    # int32 bag indices when they fit: ~10% faster embedding_bag (less index traffic).
    small = max(score_index.max(), value_index.max(), len(score_index)) < 2**31
    narrow = (lambda a: a.astype(np.int32)) if small else (lambda a: a)  # noqa: E731
    return DecodeBatch(token_index, D, padded, to(narrow(score_index)), to(narrow(score_offsets)),
                       to(query_rows[block_ok]), to(pad_mask), to(narrow(value_index)),
                       to(narrow(value_offsets)), to(prob_index), blocks)
