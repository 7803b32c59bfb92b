"""The batched sampler against straightforward per-row references."""
from __future__ import annotations

from collections import Counter

import pytest
import torch

from asyncpp.core.microbatch import SampleSpec
from asyncpp.core.sampling_params import SamplingParams
from asyncpp.worker.sampler import Sampler, apply_penalties, filtered_probs


def spec(seed: int | None = None, step: int = 0, blocked: list[int] | None = None,
         prompt: list[int] | None = None, output: list[int] | None = None, **params) -> SampleSpec:
    return SampleSpec(SamplingParams(**params), seed, step, list(blocked or []), prompt, output)


def random_logits(rows: int, vocab: int, seed: int, scale: float = 2.0) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * scale


# -- greedy ---------------------------------------------------------------------------------

def test_greedy_rows_take_the_argmax():
    logits = random_logits(8, 50, seed=0)
    out = Sampler(50)(logits, [spec(temperature=0) for _ in range(8)])
    assert out.token_ids == logits.argmax(-1).tolist()
    assert out.logprobs is None and out.top_logprobs is None


def test_greedy_rows_in_a_mixed_batch_still_take_the_argmax():
    logits = random_logits(6, 50, seed=1)
    specs = [spec(temperature=0), spec(temperature=1.0), spec(temperature=0, top_k=3),
             spec(seed=4, temperature=0.7), spec(temperature=0), spec(temperature=1e-6)]
    out = Sampler(50)(logits, specs)
    argmax = logits.argmax(-1).tolist()
    assert [out.token_ids[i] for i in (0, 2, 4, 5)] == [argmax[i] for i in (0, 2, 4, 5)]


def test_padded_vocab_columns_are_never_chosen():
    logits = random_logits(4, 64, seed=2)
    logits[:, 40:] += 100.0  # the padding of a tensor-parallel LM head
    greedy = Sampler(40)(logits, [spec(temperature=0)] * 4)
    sampled = Sampler(40)(logits, [spec(temperature=1.0)] * 4)
    assert greedy.token_ids == logits[:, :40].argmax(-1).tolist()
    assert all(t < 40 for t in sampled.token_ids)


# -- seeded randomness ----------------------------------------------------------------------

VOCAB_WIDE = 500


def _near_uniform(rows: int, seed: int) -> torch.Tensor:
    return random_logits(rows, VOCAB_WIDE, seed=seed, scale=0.1)


def test_seeded_rows_do_not_depend_on_batch_composition():
    target_logits = _near_uniform(1, seed=3)[0]
    targets = [spec(seed=1000 + i, step=i % 4, temperature=0.8, top_k=200) for i in range(8)]

    alone = [Sampler(VOCAB_WIDE)(target_logits[None], [t]).token_ids[0] for t in targets]

    together = [spec(seed=5, temperature=1.0), spec(temperature=0.5, top_p=0.9),
                spec(temperature=0), spec(temperature=1.0, min_p=0.1)]
    batch = together[:2] + targets[::-1] + together[2:]
    logits = _near_uniform(len(batch), seed=4)
    logits[2:2 + len(targets)] = target_logits
    sampler = Sampler(VOCAB_WIDE, base_seed=99)
    sampler(logits, batch)  # advance the unseeded generator first
    mixed = sampler(logits, batch).token_ids[2:2 + len(targets)][::-1]

    assert mixed == alone
    assert len(set(alone)) > 4  # the seeds really differ


def test_different_seeds_and_steps_give_different_tokens():
    logits = _near_uniform(1, seed=5)
    sampler = Sampler(VOCAB_WIDE)
    by_seed = [sampler(logits, [spec(seed=s, step=0)]).token_ids[0] for s in range(40)]
    by_step = [sampler(logits, [spec(seed=7, step=t)]).token_ids[0] for t in range(40)]
    # 40 draws from ~500 equally likely tokens: ~38.5 distinct expected, all equal would be 1.
    assert len(set(by_seed)) > 30
    assert len(set(by_step)) > 30


def test_unseeded_rows_are_deterministic_given_base_seed():
    logits = _near_uniform(16, seed=6)
    specs = [spec(temperature=1.0) for _ in range(16)]
    first = Sampler(VOCAB_WIDE, base_seed=1)(logits, specs).token_ids
    again = Sampler(VOCAB_WIDE, base_seed=1)(logits, specs).token_ids
    other = Sampler(VOCAB_WIDE, base_seed=2)(logits, specs).token_ids
    assert first == again
    assert first != other


# -- filters --------------------------------------------------------------------------------

def reference_support(row: torch.Tensor, temperature: float, top_k: int, top_p: float,
                      min_p: float) -> set[int]:
    """Tokens with nonzero probability, one filter after another, in float64."""
    probs = torch.softmax(row.double() / temperature, dim=-1).tolist()
    kept = sorted(range(len(probs)), key=lambda t: -probs[t])
    if top_k:
        kept = kept[:top_k]
    if top_p < 1:
        total, prefix = sum(probs[t] for t in kept), []
        for t in kept:
            prefix.append(t)
            if sum(probs[u] for u in prefix) / total >= top_p:
                break
        kept = prefix
    if min_p:
        best = max(probs[t] for t in kept)
        kept = [t for t in kept if probs[t] >= min_p * best]
    return set(kept)


FILTER_CASES = [  # temperature, top_k, top_p, min_p
    (1.0, 0, 1.0, 0.0), (1.0, 5, 1.0, 0.0), (0.7, 1, 1.0, 0.0), (1.3, 0, 0.8, 0.0),
    (1.0, 0, 0.3, 0.0), (1.0, 0, 1.0, 0.2), (0.5, 20, 0.9, 0.0), (2.0, 10, 0.7, 0.05),
    (1.0, 0, 0.95, 0.3), (0.9, 3, 1.0, 0.5), (1.0, 64, 1.0, 0.0), (1.0, 100, 1.0, 0.0),
]


@pytest.mark.parametrize("cases", [FILTER_CASES, [c for c in FILTER_CASES if c[2] == 1.0]],
                         ids=["sort", "top_k_without_top_p"])
def test_top_k_top_p_min_p_match_the_reference(cases):
    logits = random_logits(len(cases), 64, seed=7)
    specs = [spec(temperature=t, top_k=k, top_p=p, min_p=m) for t, k, p, m in cases]
    probs = filtered_probs(logits.clone(), specs)
    for i, (t, k, p, m) in enumerate(cases):
        got = set(probs[i].nonzero().flatten().tolist())
        assert got == reference_support(logits[i], t, k, p, m), cases[i]


@pytest.mark.parametrize("params, support", [
    (dict(top_k=3), {0, 1, 2}),
    (dict(top_p=0.5), {0, 1}),  # 0.30 + 0.25 reaches 0.5
    (dict(top_p=0.56), {0, 1, 2}),
    (dict(min_p=0.5), {0, 1, 2}),  # >= 0.15
    (dict(top_k=4, min_p=0.5), {0, 1, 2}),
])
def test_sampled_tokens_cover_exactly_the_support(params, support):
    probs = torch.tensor([0.30, 0.25, 0.20, 0.10, 0.08, 0.04, 0.03])
    logits = probs.log().expand(1500, -1)
    specs = [spec(temperature=1.0, **params) for _ in range(1500)]
    assert set(Sampler(7)(logits, specs).token_ids) == support


# -- penalties ------------------------------------------------------------------------------

def reference_penalties(row: torch.Tensor, s: SampleSpec) -> torch.Tensor:
    row = row.clone()
    p = s.params
    output = s.output_token_ids or []
    for token in set((s.prompt_token_ids or []) + output):
        value = row[token].item()
        row[token] = value / p.repetition_penalty if value > 0 else value * p.repetition_penalty
    for token, count in Counter(output).items():
        row[token] -= p.frequency_penalty * count + p.presence_penalty
    return row


def penalty_specs(**common) -> list[SampleSpec]:
    return [
        spec(repetition_penalty=1.5, prompt=[1, 2, 3, 3], output=[4, 1], **common),
        spec(repetition_penalty=0.8, prompt=[5, 6], output=[], **common),
        spec(frequency_penalty=0.7, prompt=[1, 2], output=[2, 2, 9, 9, 9, 0], **common),
        spec(presence_penalty=-0.5, prompt=[7], output=[3, 3, 8], **common),
        spec(repetition_penalty=1.2, frequency_penalty=-0.4, presence_penalty=1.1,
             prompt=list(range(10)), output=[0, 0, 11, 12, 12, 29], **common),
        spec(repetition_penalty=2.0, prompt=[], output=[], **common),
    ]


def test_penalties_match_the_reference():
    specs = penalty_specs()
    logits = random_logits(len(specs), 30, seed=8)
    got = apply_penalties(logits.clone(), specs)
    for i, s in enumerate(specs):
        torch.testing.assert_close(got[i], reference_penalties(logits[i], s))


def test_penalised_logits_reach_greedy_tokens_and_logprobs():
    plain = [spec(temperature=0, logprobs=1), spec(temperature=1.0)]
    specs = [plain[0], *penalty_specs(temperature=0), plain[1]]
    logits = random_logits(len(specs), 30, seed=9)
    # Make the penalties matter: the most frequent output token is each row's favourite.
    for i, s in enumerate(specs[1:-1], start=1):
        logits[i, (s.output_token_ids or s.prompt_token_ids or [0])[0]] = 4.0
    out = Sampler(30)(logits, specs)

    expected = logits.clone()
    for i, s in enumerate(specs[1:-1], start=1):
        expected[i] = reference_penalties(logits[i], s)
    assert out.token_ids[:-1] == expected.argmax(-1).tolist()[:-1]
    torch.testing.assert_close(torch.tensor(out.logprobs[:-1]),
                               expected.log_softmax(-1)[:-1].gather(
                                   1, torch.tensor(out.token_ids[:-1])[:, None]).flatten())
    assert out.token_ids[:-1] != logits.argmax(-1).tolist()[:-1]  # the penalties did change something


# -- min_tokens -----------------------------------------------------------------------------

def test_blocked_ids_are_never_sampled():
    vocab, eos, stop = 20, 2, 7
    logits = random_logits(1, vocab, seed=10).expand(400, -1).clone()
    logits[:, eos] = 10.0
    logits[:, stop] = 9.0
    kinds = [dict(temperature=0), dict(temperature=1.0), dict(temperature=1.5, top_k=1),
             dict(temperature=1.0, top_p=0.5), dict(temperature=2.0, min_p=0.9)]
    specs = [spec(seed=i if i % 2 else None, step=i, blocked=[eos, stop], **kinds[i % len(kinds)])
             for i in range(399)]
    specs.append(spec(temperature=0))  # nothing blocked: the favourite does win
    tokens = Sampler(vocab)(logits, specs).token_ids
    assert eos not in tokens[:-1] and stop not in tokens[:-1]
    assert tokens[-1] == eos


# -- logprobs -------------------------------------------------------------------------------

def test_logprobs_are_the_log_softmax_with_top_entries_best_first():
    asked = [None, 0, 3, 5, None, 1]
    logits = random_logits(len(asked), 40, seed=11)
    specs = [spec(temperature=0 if i % 2 else 1.0, logprobs=k) for i, k in enumerate(asked)]
    out = Sampler(40)(logits, specs)
    reference = logits.log_softmax(-1)
    torch.testing.assert_close(torch.tensor(out.logprobs),
                               reference.gather(1, torch.tensor(out.token_ids)[:, None]).flatten())
    for i, k in enumerate(asked):
        top = out.top_logprobs[i]
        assert len(top) == (k or 0)
        values, ids = reference[i].topk(k) if k else (torch.empty(0), torch.empty(0))
        assert [t for t, _ in top] == ids.tolist()
        torch.testing.assert_close(torch.tensor([v for _, v in top]), values)


# -- the distribution -----------------------------------------------------------------------

PROBS = torch.tensor([0.35, 0.25, 0.15, 0.12, 0.08, 0.05])


def chi_square(tokens: list[int], expected_probs: torch.Tensor) -> float:
    counts = Counter(tokens)
    n = len(tokens)
    return sum((counts.get(t, 0) - n * p) ** 2 / (n * p) for t, p in enumerate(expected_probs.tolist()))


@pytest.mark.parametrize("temperature", [1.0, 0.5])
@pytest.mark.parametrize("seeded", [False, True])
def test_samples_follow_the_distribution(temperature, seeded):
    rows = 4000
    logits = (PROBS.log() + 3.0).expand(rows, -1)  # an offset must not matter
    specs = [spec(seed=i if seeded else None, step=3, temperature=temperature) for i in range(rows)]
    tokens = Sampler(len(PROBS), base_seed=123)(logits, specs).token_ids
    expected = PROBS ** (1 / temperature)
    expected = expected / expected.sum()
    # 5 degrees of freedom: P(chi2 > 25) < 1e-4; a wrong temperature scores in the hundreds.
    assert chi_square(tokens, expected) < 25
    assert chi_square(tokens, PROBS if temperature != 1.0 else PROBS.flip(0)) > 100


# -- CUDA -----------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_the_contract():
    logits = _near_uniform(6, seed=12).cuda()
    sampler = Sampler(VOCAB_WIDE)
    greedy = sampler(logits, [spec(temperature=0)] * 6).token_ids
    assert greedy == logits.argmax(-1).tolist()

    target = spec(seed=77, step=2, temperature=0.9, top_p=0.95, logprobs=2)
    alone = sampler(logits[:1], [target])
    batch = [spec(temperature=1.0), spec(temperature=0, blocked=[greedy[1]]), target,
             spec(seed=3, repetition_penalty=1.3, prompt=[1, 2], output=[3])]
    mixed = sampler(torch.stack([logits[3], logits[1], logits[0], logits[2]]), batch)
    assert mixed.token_ids[2] == alone.token_ids[0]
    assert mixed.token_ids[1] != greedy[1]
    assert mixed.logprobs[2] == pytest.approx(alone.logprobs[0], abs=1e-5)

    specs = [spec(temperature=1.0, blocked=[0, 1]) for _ in range(2000)]
    dist_logits = (PROBS.log()).expand(2000, -1).cuda()
    tokens = Sampler(len(PROBS))(dist_logits, specs).token_ids
    expected = torch.cat([torch.zeros(2), PROBS[2:] / PROBS[2:].sum()])
    assert chi_square(tokens, expected.clamp(min=1e-12)) < 25 and {0, 1}.isdisjoint(tokens)
