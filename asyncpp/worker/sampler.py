"""The batched sampler run on the last pipeline stage, with vLLM's semantics."""
from __future__ import annotations

import numpy as np
import torch

from asyncpp.core.microbatch import PromptLogprobs, SampleSpec, StepOutput
from asyncpp.core.sampling_params import GREEDY_EPS
from asyncpp.worker import sampling_ops as ops


def _all_plain_greedy(specs: list[SampleSpec]) -> bool:
    """True when argmax alone answers: the hot path, so one tight loop (~0.1 us a row)."""
    for spec in specs:
        p = spec.params
        if (p.temperature >= GREEDY_EPS or spec.blocked_token_ids or spec.grammar_row is not None
                or p.logprobs is not None
                or p.repetition_penalty != 1.0 or p.presence_penalty or p.frequency_penalty):
            return False
    return True


class Sampler:
    """Picks one token per logits row, in order:

    1. mask what the sequence's grammar forbids (structured output: its row of the
       microbatch's token bitmask), then `blocked_token_ids` (min_tokens not reached yet),
       unless that leaves a constrained row nothing (the grammar must end there: it wins);
    2. repetition penalty over prompt + output tokens, then frequency / presence
       penalties over output tokens;
    3. greedy rows (temperature < 1e-5) take the argmax;
    4. the others: divide by temperature, keep top-k, then top-p, then min-p (relative
       to the largest probability), and draw with the exponential race
       argmax(probs / q), q ~ Exp(1).

    Logprobs (when any row asks) are the log_softmax of the logits after steps 1-2 (so of
    the grammar's masked distribution, as vLLM reports them) and
    before temperature and filtering: they describe the model under the penalties the
    request chose, not the truncated distribution the token was drawn from (vLLM v0
    reported the latter; we keep the former because it does not depend on the
    temperature and stays finite for every unblocked token).

    Randomness: a row with a seed draws its noise from a generator seeded from
    (seed, step) alone, so a seeded request gets the same tokens whatever batch, row or
    pipeline step it lands in. Unseeded rows share one draw from a generator seeded once
    from `base_seed`.
    """

    def __init__(self, vocab_size: int, base_seed: int = 0) -> None:
        self.vocab_size = vocab_size
        self.base_seed = base_seed
        self._generators: dict[torch.device, torch.Generator] = {}

    def __call__(self, logits: torch.Tensor, specs: list[SampleSpec],
                 token_bitmask: np.ndarray | None = None) -> StepOutput:
        """`token_bitmask`: the microbatch's grammar masks (MicroBatch.token_bitmask)."""
        if logits.shape[1] != self.vocab_size:  # heads padded for tensor parallelism are wider
            logits = logits[:, : self.vocab_size]
        if _all_plain_greedy(specs):
            return StepOutput(logits.argmax(dim=-1).tolist())
        return self._sample(logits, specs, token_bitmask)

    def _sample(self, logits: torch.Tensor, specs: list[SampleSpec], token_bitmask: np.ndarray | None) -> StepOutput:
        logits = _masked_copy(logits, specs, token_bitmask)
        logits = self._apply_penalties(logits, specs)
        token_ids = logits.argmax(dim=-1)
        wants_logprobs = any(s.params.logprobs is not None for s in specs)
        random_rows = [i for i, s in enumerate(specs) if not s.params.greedy]
        if random_rows:
            if len(random_rows) == len(specs):
                token_ids = self._sample_random(logits.clone() if wants_logprobs else logits, specs)
            else:
                rows = torch.tensor(random_rows, device=logits.device)
                token_ids[rows] = self._sample_random(logits[rows], [specs[i] for i in random_rows])
        if not wants_logprobs:
            return StepOutput(token_ids.tolist())
        return _with_logprobs(logits, token_ids, specs)

    def _apply_penalties(self, logits: torch.Tensor, specs: list[SampleSpec]) -> torch.Tensor:
        rows = [i for i, s in enumerate(specs) if s.params.has_penalties]
        if not rows:
            return logits
        if len(rows) == len(specs):
            return apply_penalties(logits, specs)
        index = torch.tensor(rows, device=logits.device)
        logits[index] = apply_penalties(logits[index], [specs[i] for i in rows])
        return logits

    def _sample_random(self, logits: torch.Tensor, specs: list[SampleSpec]) -> torch.Tensor:
        """Sample every row of `logits` (a private copy, modified in place)."""
        probs = filtered_probs(logits, specs)
        return ops.exponential_race(probs, self._noise(probs, specs))

    def _noise(self, probs: torch.Tensor, specs: list[SampleSpec]) -> torch.Tensor:
        noise = torch.empty_like(probs)
        unseeded = [i for i, s in enumerate(specs) if s.seed is None]
        if len(unseeded) == len(specs):
            return ops.exponential_(noise, self._generator(probs.device))
        if unseeded:
            draw = torch.empty(len(unseeded), probs.shape[1], device=probs.device)
            ops.exponential_(draw, self._generator(probs.device))
            noise[torch.tensor(unseeded, device=probs.device)] = draw
        for i, spec in enumerate(specs):
            if spec.seed is not None:
                ops.seeded_exponential_(noise[i], spec.seed, spec.step)
        return noise

    def _generator(self, device: torch.device) -> torch.Generator:
        generator = self._generators.get(device)
        if generator is None:
            generator = torch.Generator(device=device)
            generator.manual_seed(self.base_seed)
            self._generators[device] = generator
        return generator


def _masked_copy(logits: torch.Tensor, specs: list[SampleSpec], token_bitmask: np.ndarray | None) -> torch.Tensor:
    """Step 1: a float32 copy of `logits` with the grammar masks, then the blocked ids where they
    leave a constrained row some token."""
    constrained = [i for i, s in enumerate(specs) if s.grammar_row is not None]
    if constrained and token_bitmask is None:
        raise ValueError("a sequence samples under a grammar but the microbatch carries no token bitmask")
    mask_rows = [specs[i].grammar_row for i in constrained]
    if constrained and len(constrained) == len(specs):
        logits = ops.masked_by_bitmask(logits, token_bitmask, mask_rows)
    else:
        logits = logits.to(torch.float32, copy=True, memory_format=torch.contiguous_format)
        if constrained:
            ops.apply_token_bitmask_(logits, constrained, token_bitmask, mask_rows)
    both = [i for i in constrained if specs[i].blocked_token_ids]
    saved = logits[both] if both else None  # a copy
    ops.mask_token_ids_(logits, [s.blocked_token_ids for s in specs])
    if saved is not None:
        index = torch.tensor(both, device=logits.device)
        emptied = logits[index].amax(dim=-1) == float("-inf")
        if bool(emptied.any()):
            logits[index[emptied]] = saved[emptied]
    return logits


def apply_penalties(logits: torch.Tensor, specs: list[SampleSpec]) -> torch.Tensor:
    """Repetition, then frequency and presence penalties, for every row of `logits`."""
    device, vocab = logits.device, logits.shape[1]
    params = [s.params for s in specs]
    outputs = [s.output_token_ids or [] for s in specs]
    repetition = [p.repetition_penalty for p in params]
    if any(r != 1.0 for r in repetition):
        seen = ops.token_counts([(s.prompt_token_ids or []) + out for s, out in zip(specs, outputs)],
                                vocab, device) > 0
        logits = ops.apply_repetition_penalty(logits, seen, _tensor(repetition, device))
    if any(p.frequency_penalty or p.presence_penalty for p in params):
        logits = ops.apply_frequency_presence_penalties(
            logits, ops.token_counts(outputs, vocab, device),
            _tensor([p.frequency_penalty for p in params], device),
            _tensor([p.presence_penalty for p in params], device))
    return logits


def filtered_probs(logits: torch.Tensor, specs: list[SampleSpec]) -> torch.Tensor:
    """Unnormalized probabilities after temperature, top-k, top-p and min-p (modifies `logits`)."""
    device, vocab = logits.device, logits.shape[1]
    params = [s.params for s in specs]
    logits.div_(_tensor([p.temperature for p in params], device).unsqueeze(1))
    top_k = [p.top_k for p in params]
    top_p = [p.top_p for p in params]
    use_top_k = any(0 < k < vocab for k in top_k)
    top_k_tensor = torch.tensor(top_k, dtype=torch.long).to(device) if use_top_k else None
    if any(p < 1.0 for p in top_p):
        ops.apply_top_k_top_p_(logits, top_k_tensor, _tensor(top_p, device))
    elif use_top_k:
        ops.apply_top_k_(logits, top_k_tensor, max(top_k))
    probs = logits.softmax(dim=-1)
    min_p = [p.min_p for p in params]
    if any(min_p):
        ops.apply_min_p_(probs, _tensor(min_p, device))
    return probs


def _with_logprobs(logits: torch.Tensor, token_ids: torch.Tensor,
                   specs: list[SampleSpec]) -> StepOutput:
    logprobs = logits.log_softmax(dim=-1)
    chosen = logprobs.gather(1, token_ids.unsqueeze(1)).squeeze(1)
    counts = [s.params.logprobs or 0 for s in specs]
    width = max(counts)
    if width:
        top_values, top_ids = logprobs.topk(min(width, logprobs.shape[1]), dim=-1)
        pairs = zip(top_ids.tolist(), top_values.tolist())
        top = [list(zip(ids[:k], values[:k])) for (ids, values), k in zip(pairs, counts)]
    else:
        top = [[] for _ in specs]
    return StepOutput(token_ids.tolist(), chosen.tolist(), top)


def prompt_logprobs(logits: torch.Tensor, targets: list[int], num: int, vocab_size: int) -> PromptLogprobs:
    """Row i's log_softmax at targets[i], its rank (1: the most likely) and the `num` most
    likely tokens: the model's own distribution (as vLLM's, no penalty or temperature)."""
    logprobs = logits[:, :vocab_size].log_softmax(dim=-1)
    chosen = logprobs.gather(1, torch.tensor(targets, device=logits.device).unsqueeze(1))
    ranks = (logprobs > chosen).sum(dim=1) + 1
    top: list[list[tuple[int, float]]] = [[] for _ in targets]
    if num:
        values, ids = logprobs.topk(min(num, vocab_size), dim=-1)
        top = [list(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]
    return PromptLogprobs(chosen.squeeze(1).tolist(), ranks.tolist(), top)


def _tensor(values: list[float], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32).to(device, non_blocking=True)
