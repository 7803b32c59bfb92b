"""Speculative decoding on the last stage: verify each sequence's proposals in one pass.

A sequence with proposals x_0..x_{k-1} has logits at k + 1 positions: row i follows the
context and x_0..x_{i-1}. Every row is sampled as the sampler samples any token (the same
temperature, filters, penalties over the output as it would stand, min_tokens, and the
same noise: a seeded row draws with (seed, step + i)), giving t_0..t_k. The sequence keeps
t_0..t_a, where a is the first i with t_i != x_i (a = k when all agree).

This is the standard rule for a deterministic draft, realised by coupling: x_i is accepted
with probability p_i(x_i); on a rejection, t_i is a draw from p_i conditioned on differing
from x_i, i.e. p_i with x_i removed and renormalised; after k acceptances t_k is the bonus
token. So the output keeps the target distribution exactly, greedy reduces to "the longest
prefix the argmax agrees with", and a seeded request yields the very tokens it would without
speculation.
"""
from __future__ import annotations

from dataclasses import replace

from asyncpp.core.microbatch import SampleSpec, SeqWork, StepOutput


def sampling_rows(seqs: list[SeqWork]) -> list[int]:
    """Rows of the token batch whose logits are sampled: the last one of each sampling
    sequence, and the positions of its proposals before it."""
    rows, end = [], 0
    for seq in seqs:
        end += seq.num_tokens
        if seq.sample is not None:
            rows.extend(range(end - 1 - seq.num_proposed, end))
    return rows


def row_specs(seqs: list[SeqWork]) -> list[SampleSpec]:
    """One SampleSpec per sampled row (sampling_rows' order)."""
    specs: list[SampleSpec] = []
    for seq in seqs:
        if seq.sample is not None:
            specs.append(seq.sample)
            specs.extend(_proposal_spec(seq.sample, seq.proposal, i) for i in range(1, seq.num_proposed + 1))
    return specs


def _proposal_spec(spec: SampleSpec, proposal: list[int], i: int) -> SampleSpec:
    """Row i's spec: the token after proposal[:i], as if those were already accepted (its grammar
    mask, if any, is the row after the previous one's)."""
    step = spec.step + i
    return replace(spec, step=step, grammar_row=None if spec.grammar_row is None else spec.grammar_row + i,
                   blocked_token_ids=spec.blocked_token_ids if step < spec.params.min_tokens else [],
                   output_token_ids=None if spec.output_token_ids is None else spec.output_token_ids + proposal[:i])


def accepted_prefix(sampled: list[int], proposal: list[int]) -> int:
    """How many proposals the sampled rows agree with, from the first."""
    for i, token in enumerate(proposal):
        if sampled[i] != token:
            return i
    return len(proposal)


def accept(out: StepOutput, seqs: list[SeqWork]) -> StepOutput:
    """The sampler's output over every row (row_specs' order) -> each sampling sequence's
    accepted proposals and the token after them, with their logprobs."""
    keep: list[int] = []
    num_accepted: list[int] = []
    row = 0
    for seq in seqs:
        if seq.sample is None:
            continue
        accepted = accepted_prefix(out.token_ids[row:row + seq.num_proposed + 1], seq.proposal)
        keep.extend(range(row, row + accepted + 1))
        num_accepted.append(accepted)
        row += seq.num_proposed + 1
    return StepOutput([out.token_ids[r] for r in keep], _pick(out.logprobs, keep), _pick(out.top_logprobs, keep),
                      out.prompt_logprobs, num_accepted)


def _pick(values: list | None, rows: list[int]) -> list | None:
    return None if values is None else [values[r] for r in rows]
