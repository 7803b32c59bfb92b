"""The prompt share while streams decode: the online cost fit and the rule built on it."""
from __future__ import annotations

import random

import pytest

from asyncpp.engine.prompt_budget import PATIENCE, STRETCH, PromptBudget, StepCostFit

BASE, PER_DECODE, PER_PROMPT = 0.040, 0.002, 0.0015  # seconds: a made-up machine


def fed(fit: StepCostFit, steps: int = 60, seed: int = 0) -> StepCostFit:
    rng = random.Random(seed)
    for i in range(steps):
        decodes, prompt = rng.randint(1, 32), (rng.randint(1, 256) if i % 2 else 0)
        fit.observe(decodes, prompt, BASE + PER_DECODE * decodes + PER_PROMPT * prompt)
    return fit


def test_the_fit_recovers_the_costs_once_it_has_seen_both_kinds_of_step():
    fit = StepCostFit()
    for _ in range(20):
        fit.observe(16, 0, BASE + PER_DECODE * 16)  # decode-only steps say nothing of prompts
    assert fit.coefficients() is None
    base, per_decode, per_prompt = fed(fit).coefficients()
    assert base == pytest.approx(BASE, rel=1e-3)
    assert per_decode == pytest.approx(PER_DECODE, rel=1e-3)
    assert per_prompt == pytest.approx(PER_PROMPT, rel=1e-3)


def test_the_fit_follows_a_change_of_costs():
    fit = fed(StepCostFit())
    for i in range(300):  # the machine got twice as slow at prompts
        fit.observe(8, 128 if i % 2 else 0, BASE + PER_DECODE * 8 + 2 * PER_PROMPT * (128 if i % 2 else 0))
    assert fit.coefficients()[2] == pytest.approx(2 * PER_PROMPT, rel=0.05)


def test_the_fixed_cap_holds_until_the_costs_are_known_or_when_adaptation_is_off():
    assert PromptBudget(32, 512).while_decoding(16, 0.0) == 32
    assert PromptBudget(32, 512, adaptive=False, fit=fed(StepCostFit())).while_decoding(16, 100.0) == 32


def test_a_mixed_step_stretches_the_decode_step_by_the_set_factor():
    budget = PromptBudget(32, 4096, fit=fed(StepCostFit()))
    tokens = budget.while_decoding(16, 0.0)
    decode_step = BASE + PER_DECODE * 16
    assert (decode_step + PER_PROMPT * tokens) / decode_step == pytest.approx(STRETCH, rel=0.01)


def test_overdue_prompts_get_a_growing_share_within_the_token_budget():
    budget = PromptBudget(32, 512, fit=fed(StepCostFit()))
    decode_step = BASE + PER_DECODE * 16
    patient = budget.while_decoding(16, PATIENCE * decode_step)
    assert budget.while_decoding(16, 2 * PATIENCE * decode_step) == pytest.approx(2 * patient, abs=1)
    assert budget.while_decoding(16, 1e6) == 512 - 16
