"""Executors driven by hand-built microbatches: mp pipelines must match uni and transformers."""
from __future__ import annotations

import pytest

from asyncpp.core.errors import MicrobatchError
from asyncpp.core.microbatch import MicroBatch, SampleSpec, SeqWork
from asyncpp.executor.mp import MultiprocTransport
from asyncpp.executor.uni import ThreadTransport
from helpers.driver import GREEDY, engine_config, greedy_generate, running, watch_deaths
from helpers.models import VOCAB, checkpoint_share
from helpers.parity import hf_greedy, mixed_prompts

pytestmark = pytest.mark.anyio

NEW_TOKENS = 8
BLOCKS_PER_VE = 48


def prompts() -> list[list[int]]:
    return mixed_prompts(count=4, lo=1, hi=90, seed=3)


async def test_uni_matches_transformers(llama_dir):
    config = engine_config(llama_dir, num_virtual_engines=2)
    async with running(config, BLOCKS_PER_VE) as executor:
        assert isinstance(executor.transport, ThreadTransport)
        tokens, most = await greedy_generate(executor, prompts(), NEW_TOKENS, 2,
                                             BLOCKS_PER_VE, config.block_size)
        stats = executor.stats()
        total = executor.param_bytes()
    assert tokens == hf_greedy(llama_dir, prompts(), NEW_TOKENS)
    assert total == [checkpoint_share(llama_dir, config.stage(0), tied=False)]
    assert stats.microbatches == 2 * NEW_TOKENS
    assert 0 < stats.busy_fractions[0] <= 1


@pytest.mark.parametrize("pp, tp", [(2, 1), (3, 1), pytest.param(2, 2, marks=pytest.mark.slow)])
async def test_mp_pipeline_matches_uni_and_transformers(llama_dir, pp, tp):
    config = engine_config(llama_dir, pp, tensor_parallel_size=tp, num_virtual_engines=2)
    if pp == 3:
        assert config.layer_partition == [1, 1.5, 1.5]  # by cost: the head outweighs half a layer
    async with running(config, BLOCKS_PER_VE) as executor:
        assert isinstance(executor.transport, MultiprocTransport)
        tokens, most_in_flight = await greedy_generate(
            executor, prompts(), NEW_TOKENS, 2, BLOCKS_PER_VE, config.block_size)
        stats, shares = executor.stats(), executor.param_bytes()
    assert tokens == hf_greedy(llama_dir, prompts(), NEW_TOKENS)
    assert most_in_flight == 2  # both VEs' microbatches were in the pipeline at once
    stage_shares = [checkpoint_share(llama_dir, s, tied=False) for s in config.stages]
    if tp == 1:
        assert shares == stage_shares
        assert sum(shares) == checkpoint_share(llama_dir, engine_config(llama_dir).stage(0), tied=False)
    else:  # a stage's weights split over its tp ranks, norms replicated on each
        assert all(full / tp <= mine < full for mine, full in zip(shares, stage_shares))
    assert stats.microbatches == 2 * NEW_TOKENS and len(stats.stage_busy_s) == pp
    assert all(0 < f <= 1 for f in stats.busy_fractions)


async def test_a_microbatch_on_every_core_runs_alone_and_keeps_parity(llama_dir):
    """Microbatches that ask for every stage's cores (MicroBatch.threads) from two VEs at once:
    each enters only an empty pipeline and nothing enters beside it; the tokens stay
    transformers'."""
    config = engine_config(llama_dir, 2, num_virtual_engines=2)
    async with running(config, BLOCKS_PER_VE) as executor:
        tokens, submitted_at_once = await greedy_generate(executor, prompts(), NEW_TOKENS, 2, BLOCKS_PER_VE,
                                                          config.block_size, threads=2)
        stats = executor.stats()
    assert tokens == hf_greedy(llama_dir, prompts(), NEW_TOKENS)
    assert submitted_at_once == 2 and stats.in_flight_max == 1
    assert stats.microbatches == 2 * NEW_TOKENS


async def test_mp_tied_head_gpt2(gpt2_dir):
    """GPT-2 ties its head to the embedding: the last stage loads it too."""
    config = engine_config(gpt2_dir, 2)
    async with running(config, BLOCKS_PER_VE) as executor:
        tokens, _ = await greedy_generate(executor, prompts(), NEW_TOKENS, 2, BLOCKS_PER_VE,
                                          config.block_size)
        shares = executor.param_bytes()
    assert tokens == hf_greedy(gpt2_dir, prompts(), NEW_TOKENS)
    assert shares == [checkpoint_share(gpt2_dir, s, tied=True) for s in config.stages]


async def test_uni_exception_fails_only_its_microbatch(llama_dir):
    config = engine_config(llama_dir)
    bad = MicroBatch(0, [SeqWork(0, [VOCAB + 7], 0, [0], SampleSpec(GREEDY, None, 0))])
    good = MicroBatch(0, [SeqWork(1, [5, 6], 0, [1], SampleSpec(GREEDY, None, 0))])
    async with running(config, BLOCKS_PER_VE) as executor:
        deaths = watch_deaths(executor)
        with pytest.raises(MicrobatchError, match="stage 0 .*IndexError") as info:
            await executor.submit(bad)
        assert "Traceback" in info.value.detail and deaths == []
        out = await executor.submit(good)
    assert out.token_ids == hf_greedy(llama_dir, [[5, 6]], 1)[0]


async def test_ray_pipeline_matches_transformers(llama_dir):
    pytest.importorskip("ray")
    config = engine_config(llama_dir, 2, distributed_executor_backend="ray")
    async with running(config, BLOCKS_PER_VE) as executor:
        tokens, most_in_flight = await greedy_generate(
            executor, prompts(), NEW_TOKENS, 2, BLOCKS_PER_VE, config.block_size)
        stats, shares = executor.stats(), executor.param_bytes()
    assert tokens == hf_greedy(llama_dir, prompts(), NEW_TOKENS)
    assert most_in_flight == 2
    assert shares == [checkpoint_share(llama_dir, s, tied=False) for s in config.stages]
    assert all(0 < f <= 1 for f in stats.busy_fractions)
