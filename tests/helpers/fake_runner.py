"""A Runner without a model, for engine tests: each sampling sequence's next token is its
last token + 1 (mod the vocabulary), so every output is known in advance (with speculative
decoding, a proposal holds where it counts up too).

It keeps a KV cache of labels, (digest, token) per slot, where a position's digest chains
the digest of the position before it with its own token, as real KV depends on every token
before it. It writes the labels of the tokens it is given and refuses to read a context
whose chain is broken or unwritten: a wrong block table, start position or stale block
(after a preemption, say) fails the engine loudly instead of passing unseen, while a block
shared by sequences with the same prefix (prefix caching) reads as it should. Pass `fake_runner_factory` as AsyncLLM's
`runner_factory`; it is a module-level function, so the mp backend can pickle it."""
from __future__ import annotations

import torch

from asyncpp.core.config import EngineConfig
from asyncpp.core.microbatch import IntermediateTensors, MicroBatch, SeqWork, StepOutput, TensorSpec
from asyncpp.core.stages import StageSpec
from asyncpp.model.parallel import TPGroup
from asyncpp.worker import verification

POISON = 500  # a prompt starting with it makes the runner raise (generated tokens never do)
Label = tuple[int, int]  # (digest of the tokens up to this position, this position's token)


def next_tokens(last: int, count: int, vocab: int) -> list[int]:
    """What the fake runner generates after `last`, `count` tokens of it."""
    return [(last + i) % vocab for i in range(1, count + 1)]


def fake_runner_factory(config: EngineConfig, stage: StageSpec, tp_group: TPGroup) -> FakeRunner:
    return FakeRunner(config, stage)


class FakeRunner:
    def __init__(self, config: EngineConfig, stage: StageSpec):
        self.config, self.stage = config, stage
        self.caches: list[list[Label | None]] = []  # [virtual engine][slot]

    def param_bytes(self) -> int:
        return 0

    def num_available_blocks(self) -> int:
        return self.config.kv_cache_bytes // self.config.kv_bytes_per_block()  # as ModelRunner on CPU

    def init_kv_cache(self, num_virtual_engines: int, blocks_per_ve: int) -> None:
        slots = blocks_per_ve * self.config.block_size
        self.caches = [[None] * slots for _ in range(num_virtual_engines)]

    def intermediate_spec(self, num_tokens: int) -> TensorSpec:
        return {"token_ids": ((num_tokens,), torch.int64)}

    def execute(self, mb: MicroBatch, intermediate: IntermediateTensors | None
                ) -> IntermediateTensors | StepOutput:
        """Later stages read the token ids from the previous stage, as they would hidden states."""
        if intermediate is None:
            ids = torch.tensor([t for work in mb.seqs for t in work.token_ids], dtype=torch.int64)
        else:
            ids = intermediate["token_ids"]
        sampled, offset = [], 0
        for work in mb.seqs:
            if work.start_pos == 0 and work.token_ids[0] == POISON:
                raise RuntimeError(f"fake runner: a prompt starting with {POISON} is poison")
            self._attend(self.caches[mb.ve_id], work)
            offset += work.num_tokens
            if work.sample is not None:  # the last position's, and its proposals' (speculative decoding)
                sampled += [(int(t) + 1) % self.config.shape.vocab_size
                            for t in ids[offset - 1 - work.num_proposed:offset]]
        if not self.stage.is_last:
            return {"token_ids": ids}
        if any(work.num_proposed for work in mb.seqs):
            return verification.accept(StepOutput(sampled), mb.seqs)
        return StepOutput(sampled)

    def _attend(self, cache: list[Label | None], work: SeqWork) -> None:
        """Write this step's labels, then read every position up to the last, as attention does."""
        end = work.start_pos + work.num_tokens
        for pos, token in zip(range(work.start_pos, end), work.token_ids):
            cache[self._slot(work, pos)] = (hash((self._digest(cache, work, pos - 1), token)), token)
        for pos in range(end):
            found = cache[self._slot(work, pos)]
            if found is None or found[0] != hash((self._digest(cache, work, pos - 1), found[1])):
                raise AssertionError(f"sequence {work.seq_id} position {pos} reads {found}, not the chain of "
                                     f"its context (start_pos {work.start_pos}, block table {work.block_table})")

    def _digest(self, cache: list[Label | None], work: SeqWork, pos: int) -> int:
        if pos < 0:
            return 0
        found = cache[self._slot(work, pos)]
        if found is None:
            raise AssertionError(f"sequence {work.seq_id} position {pos} was never written "
                                 f"(start_pos {work.start_pos}, block table {work.block_table})")
        return found[0]

    def _slot(self, work: SeqWork, pos: int) -> int:
        size = self.config.block_size
        return work.block_table[pos // size] * size + pos % size
