"""Verification of speculative proposals on the last stage: the rows it samples, the prefix it
keeps, and that sampled output keeps the target distribution (chi-square, fixed seeds)."""
from __future__ import annotations

import torch

from asyncpp.core.microbatch import SampleSpec, SeqWork
from asyncpp.core.sampling_params import SamplingParams
from asyncpp.worker.sampler import Sampler
from asyncpp.worker.verification import accept, accepted_prefix, row_specs, sampling_rows

VOCAB = 6
SAMPLES = 20_000
# The 0.999 quantile of chi-square with VOCAB - 1 = 5 and 4 degrees of freedom.
CHI2_999 = {5: 20.52, 4: 18.47}


def test_the_accepted_prefix_ends_at_the_first_disagreement():
    assert accepted_prefix([4, 5, 6], [4, 5]) == 2
    assert accepted_prefix([4, 9, 6], [4, 5]) == 1
    assert accepted_prefix([3, 5, 6], [4, 5]) == 0
    assert accepted_prefix([8], []) == 0


def test_rows_and_specs_cover_each_proposal_as_if_those_before_it_were_accepted():
    params = SamplingParams(temperature=0.5, min_tokens=2, repetition_penalty=1.2)
    spec = SampleSpec(params, seed=7, step=1, blocked_token_ids=[2], prompt_token_ids=[9], output_token_ids=[5],
                      grammar_row=3)
    seqs = [SeqWork(0, [1, 2, 3], 0, [0], None),  # a prompt chunk: nothing sampled
            SeqWork(1, [5, 6, 7], 10, [1], spec, num_proposed=2),
            SeqWork(2, [8], 4, [2], SampleSpec(params, None, 0))]
    assert sampling_rows(seqs) == [3, 4, 5, 6]
    rows = row_specs(seqs)
    assert [r.step for r in rows] == [1, 2, 3, 0]
    assert [r.blocked_token_ids for r in rows[:3]] == [[2], [], []]  # min_tokens reached at step 2
    assert [r.output_token_ids for r in rows[:3]] == [[5], [5, 6], [5, 6, 7]]
    assert all(r.seed == 7 for r in rows[:3])
    assert [r.grammar_row for r in rows] == [3, 4, 5, None]  # each row its own mask: after proposal[:i]


def _verify(logits: list[torch.Tensor], proposal: list[int], temperature: float = 0.9) -> list[list[int]]:
    """SAMPLES identical sequences verifying `proposal` (row i's logits: logits[i]); each one's
    emitted tokens."""
    spec = SampleSpec(SamplingParams(temperature=temperature), seed=None, step=0)
    seqs = [SeqWork(i, [0] + proposal, 50, [0], spec, num_proposed=len(proposal)) for i in range(SAMPLES)]
    batch = torch.stack(logits).repeat(SAMPLES, 1)
    out = accept(Sampler(VOCAB, base_seed=3)(batch, row_specs(seqs)), seqs)
    emitted, i = [], 0
    for accepted in out.num_accepted:
        emitted.append(out.token_ids[i:i + accepted + 1])
        i += accepted + 1
    return emitted


def _chi2(tokens: list[int], probs: torch.Tensor, support: list[int]) -> float:
    """Pearson's statistic of the observed tokens against `probs` over `support`."""
    counts = torch.bincount(torch.tensor(tokens, dtype=torch.long), minlength=VOCAB).double()
    expected = probs.double() / probs[support].sum() * len(tokens)
    return float(sum((counts[t] - expected[t]) ** 2 / expected[t] for t in support))


def test_sampled_output_keeps_the_target_distribution():
    g = torch.Generator().manual_seed(0)
    logits = [torch.randn(VOCAB, generator=g) * 1.5 for _ in range(3)]
    probs = [torch.softmax(row / 0.9, dim=-1) for row in logits]
    proposal = [int(probs[0].argsort()[-2]), int(probs[1].argmax())]  # the first is a plausible miss
    emitted = _verify(logits, proposal)
    assert all(e[:-1] == proposal[:len(e) - 1] for e in emitted)  # accepted tokens are the proposal's
    everything = list(range(VOCAB))
    first = [e[0] for e in emitted]
    assert _chi2(first, probs[0], everything) < CHI2_999[5]  # accepted w.p. p(x), else p without x
    rejected = [e[0] for e in emitted if e[0] != proposal[0]]
    assert _chi2(rejected, probs[0], [t for t in everything if t != proposal[0]]) < CHI2_999[4]
    second = [e[1] for e in emitted if len(e) > 1]
    assert _chi2(second, probs[1], everything) < CHI2_999[5]  # the next token, given the first held
    bonus = [e[2] for e in emitted if len(e) == 3]
    assert len(bonus) > 1000 and _chi2(bonus, probs[2], everything) < CHI2_999[5]
    accepted = sum(1 for e in emitted if len(e) > 1) / SAMPLES
    assert abs(accepted - float(probs[0][proposal[0]])) < 4 * (0.25 / SAMPLES) ** 0.5


def test_greedy_keeps_the_prefix_the_argmax_agrees_with():
    logits = [torch.eye(VOCAB)[t] * 5 for t in (3, 1, 4)]
    spec = SampleSpec(SamplingParams(temperature=0), None, 0)
    seqs = [SeqWork(0, [0, 3, 1], 9, [0], spec, num_proposed=2), SeqWork(1, [0, 3, 5], 9, [0], spec, num_proposed=2)]
    out = accept(Sampler(VOCAB)(torch.stack(logits * 2), row_specs(seqs)), seqs)
    assert (out.token_ids, out.num_accepted) == ([3, 1, 4, 3, 1], [2, 1])
