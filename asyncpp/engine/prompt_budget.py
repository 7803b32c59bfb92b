"""How many prompt tokens a microbatch may carry while streams decode, from measured costs.

A prompt chunk in a microbatch delays every decoding stream in it: a large share starves
the streams (inter-token latency), a small one starves the prompts (time to first token).
The VE measures each microbatch's latency and fits it online as
    latency = base + per_decode * decodes + per_prompt * prompt tokens
(exponentially weighted least squares). A microbatch then takes the prompt tokens that stretch
it to at most STRETCH times what its decodes alone would take; and when the oldest waiting
prompt has waited longer than PATIENCE such decode steps, proportionally more, so a burst of
prompts drains instead of queueing for minutes. Until the fit has seen enough steps, or when
the user set --max-prefill-tokens-while-decoding, the fixed cap applies.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# A mixed microbatch may take up to this many times its decodes' own time.
STRETCH = 2.5
# Prompts that have waited longer than this many decode steps get a growing share.
PATIENCE = 16
# Older observations weigh this much less per new one (about the last 50 microbatches count).
DECAY = 0.98
MIN_SAMPLES = 12  # microbatches seen, with and without prompt tokens, before the fit is used
_RIDGE = 1e-9  # keeps the normal equations solvable while a regressor has not varied yet


@dataclass(slots=True)
class StepCostFit:
    """latency ~ base + per_decode * decodes + per_prompt * prompt_tokens, online."""
    xtx: np.ndarray = field(default_factory=lambda: np.zeros((3, 3)))
    xty: np.ndarray = field(default_factory=lambda: np.zeros(3))
    with_prompts: int = 0
    without_prompts: int = 0

    def observe(self, decodes: int, prompt_tokens: int, seconds: float) -> None:
        x = np.array([1.0, decodes, prompt_tokens])
        self.xtx = DECAY * self.xtx + np.outer(x, x)
        self.xty = DECAY * self.xty + seconds * x
        if prompt_tokens:
            self.with_prompts += 1
        else:
            self.without_prompts += 1

    def coefficients(self) -> tuple[float, float, float] | None:
        """(base, per_decode, per_prompt) in seconds, or None while they are not known."""
        if min(self.with_prompts, self.without_prompts) < MIN_SAMPLES // 2:
            return None
        base, per_decode, per_prompt = np.linalg.solve(self.xtx + _RIDGE * np.eye(3), self.xty)
        if per_prompt <= 0 or base + per_decode <= 0:
            return None
        return float(base), float(per_decode), float(per_prompt)


@dataclass(slots=True)
class PromptBudget:
    fixed_cap: int  # the configured cap: used until the fit is known, and always when `adaptive` is off
    max_tokens: int  # the microbatch's whole token budget
    adaptive: bool = True
    fit: StepCostFit = field(default_factory=StepCostFit)

    def while_decoding(self, decodes: int, oldest_wait_s: float) -> int:
        """Prompt tokens for a microbatch carrying `decodes` decode tokens, when the oldest
        prompt not yet started has waited `oldest_wait_s`."""
        coefficients = self.fit.coefficients() if self.adaptive else None
        if coefficients is None:
            return self.fixed_cap
        base, per_decode, per_prompt = coefficients
        decode_step = max(base + per_decode * decodes, 1e-6)
        tokens = (STRETCH - 1.0) * decode_step / per_prompt
        overdue = oldest_wait_s / (PATIENCE * decode_step)
        if overdue > 1.0:
            tokens *= overdue
        return int(min(max(tokens, 1.0), self.max_tokens - decodes))
