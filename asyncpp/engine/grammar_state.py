"""One sequence's place in its structured-output grammar, owned by its virtual engine.

The VE advances it with each token that comes back from the last stage and asks it for the
next token's mask when it schedules the sequence's next sample; a sequence is never
scheduled while a sample of it is in flight, so the state is always current, and no stage
keeps grammar state. Preemption keeps the generated tokens (they are recomputed, not
regenerated), so the state stays valid through it. `rollback` undoes accepted tokens (for a
speculative proposal the target rejects).

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

    def _watch(self, token: int) -> None:
        end = self._reasoning_end
        self._tail.append(token)
        del self._tail[:-len(end)]
        if tuple(self._tail) == end:
            self.reasoning = False
            self._tail.clear()
