"""One sequence's place in its structured-output grammar, owned by its virtual engine.

The VE advances it with each token that comes back from the last stage and asks it for the
next token's mask when it schedules the sequence's next sample; a sequence is never
scheduled while a sample of it is in flight, so the state is always current, and no stage
keeps grammar state. Preemption keeps the generated tokens (they are recomputed, not
regenerated), so the state stays valid through it. `rollback` undoes accepted tokens.

A speculative proposal is checked and masked tentatively (`valid_prefix`, `fill_masks`): the
matcher walks through it and rolls back, so the state moves only with the tokens that come
back, once.

Under a reasoning parser the grammar waits while the model thinks: tokens are only watched
for the end-of-reasoning marker, and the mask applies from the token after it."""
from __future__ import annotations

import numpy as np
import xgrammar as xgr


class GrammarState:
    __slots__ = ("_matcher", "_reasoning_end", "_tail", "reasoning", "num_accepted")

    def __init__(self, grammar: xgr.CompiledGrammar, reasoning_end: tuple[int, ...] = (), reasoning: bool = False):
        """`reasoning`: the model is thinking when the sequence starts (its prompt leaves
        reasoning open); `reasoning_end`: the marker's token ids that end it."""
        self._matcher = xgr.GrammarMatcher(grammar)
        self._reasoning_end = reasoning_end
        self._tail: list[int] = []  # the last tokens while reasoning, to spot the marker
        self.reasoning = reasoning and bool(reasoning_end)
        self.num_accepted = 0  # tokens the grammar accepted

    @property
    def constrains(self) -> bool:
        """The next token must pass this grammar's mask."""
        return not self.reasoning and not self._matcher.is_terminated()

    @property
    def terminated(self) -> bool:
        """The grammar is complete and has accepted a stop token: the output is done."""
        return self._matcher.is_terminated()

    def advance(self, tokens: list[int]) -> bool:
        """Accept the sequence's next tokens, in order; False at the first one the grammar
        forbids (the tokens before it stay accepted)."""
        for token in tokens:
            if self.reasoning:
                self._watch(token)
            elif self._matcher.is_terminated() or not self._matcher.accept_token(token):
                return False
            else:
                self.num_accepted += 1
        return True

    def rollback(self, num_tokens: int) -> None:
        """Undo the last `num_tokens` tokens the grammar accepted."""
        if not 0 <= num_tokens <= self.num_accepted:
            raise ValueError(f"cannot roll back {num_tokens} tokens: the grammar accepted {self.num_accepted}")
        if num_tokens:
            self._matcher.rollback(num_tokens)
            self.num_accepted -= num_tokens

    def fill_mask(self, bitmask: np.ndarray, row: int) -> None:
        """Write the next token's mask into `bitmask[row]` (int32 words, xgrammar's layout)."""
        self._matcher.fill_next_token_bitmask(bitmask, row)

    def valid_prefix(self, proposal: list[int]) -> int:
        """How many of `proposal`, from the first, a speculative draft may keep; the state is
        left as it was. Every verified row stays in the phase the grammar is in now: while
        reasoning, the tokens before the one that ends it (the grammar applies after it);
        otherwise those the grammar accepts, short of a stop token that completes it (the
        output ends there, so no row after it may be sampled). The row that would take the
        cut-off token still samples it, so the cut costs no step."""
        return self._before_reasoning_ends(proposal) if self.reasoning else self._accepted_short_of_the_end(proposal)

    def fill_masks(self, bitmask: np.ndarray, row: int, proposal: list[int]) -> None:
        """The masks of a verified draft's rows, `bitmask[row + i]` after `proposal[:i]` (i = 0 ..
        len(proposal)); the proposal passed `valid_prefix` in this state, which is left as it was."""
        self.fill_mask(bitmask, row)
        accepted = 0
        try:
            for i, token in enumerate(proposal, 1):
                if not self._matcher.accept_token(token):
                    raise RuntimeError(f"proposed token {token} breaks the grammar it was checked against")
                accepted += 1
                self.fill_mask(bitmask, row + i)
        finally:
            self._matcher.rollback(accepted)

    def _before_reasoning_ends(self, proposal: list[int]) -> int:
        tail = list(self._tail)
        for i, token in enumerate(proposal):
            if self._ends_reasoning(tail, token):
                return i
        return len(proposal)

    def _accepted_short_of_the_end(self, proposal: list[int]) -> int:
        accepted = 0
        try:
            for token in proposal:
                if self._matcher.is_terminated() or not self._matcher.accept_token(token):
                    break
                accepted += 1
            return accepted - 1 if accepted and self._matcher.is_terminated() else accepted
        finally:
            self._matcher.rollback(accepted)

    def _watch(self, token: int) -> None:
        if self._ends_reasoning(self._tail, token):
            self.reasoning = False
            self._tail.clear()

    def _ends_reasoning(self, tail: list[int], token: int) -> bool:
        """Add `token` to `tail` (the last tokens while reasoning); True when it completes the marker."""
        end = self._reasoning_end
        tail.append(token)
        del tail[:-len(end)]
        return tuple(tail) == end
