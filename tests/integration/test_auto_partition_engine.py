"""Engines started with pp_layer_partition="auto" (the default) at P=2 on the mp backend: the
split measured at start-up, and one read from the profile cache that ends a stage inside a
layer; greedy tokens identical to P=1's either way."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from asyncpp import LLM
from asyncpp.core.stage_profile import EMBEDDING, HEAD, STAGE, PieceTimes, TimingTable
from asyncpp.engine_args import EngineArgs, create_engine_config
from asyncpp.profile_cache import profile_key, store_profile
from helpers.parity import engine_tokens, greedy, mixed_prompts

MAX_TOKENS = 10
SETTINGS: dict[str, Any] = {"skip_tokenizer_init": True, "max_num_batched_tokens": 96}
PROMPTS = mixed_prompts(6, seed=27)


@pytest.fixture(scope="module")
def one_stage(llama_dir) -> list[list[int]]:
    return engine_tokens(llama_dir, PROMPTS, MAX_TOKENS, **SETTINGS)[0]


def run_auto(model_dir: Path) -> tuple[list[list[int]], Any]:
    with LLM(str(model_dir), pipeline_parallel_size=2, pp_layer_partition="auto", **SETTINGS) as llm:
        outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], greedy(MAX_TOKENS))
        assert llm.engine.stats().kv_blocks_used == 0
        return [o.outputs[0].token_ids for o in outs], llm.engine.config


def test_the_measured_split_matches_one_stage(llama_dir, one_stage, tmp_path, monkeypatch):
    monkeypatch.setenv("ASYNCPP_CACHE_DIR", str(tmp_path))
    tokens, config = run_auto(llama_dir)
    assert tokens == one_stage
    assert config.layer_partition_source == "auto" and sum(config.layer_partition) == 4
    assert len(list((tmp_path / "stage-profiles").glob("*.json"))) == 1


def test_a_cached_profile_that_splits_a_layer_matches_one_stage(llama_dir, one_stage, tmp_path, monkeypatch):
    """A profile planted under the engine's key, with a head as costly as four half layers in
    decode: the first stage ends after layer 2's attention."""
    monkeypatch.setenv("ASYNCPP_CACHE_DIR", str(tmp_path))
    estimate = create_engine_config(EngineArgs(model=str(llama_dir), pipeline_parallel_size=2,
                                               pp_layer_partition="cost", **SETTINGS))
    pieces = {STAGE: PieceTimes(0.0, 0.0), EMBEDDING: PieceTimes(0.0, 0.0), HEAD: PieceTimes(4.0, 0.0),
              "attention": PieceTimes(1.0, 1.0), "mlp": PieceTimes(1.0, 1.0)}
    store_profile(profile_key(estimate, estimate.threads_per_rank),
                  TimingTable(pieces, ("attention",) * 4, ("mlp",) * 4, 1, 256, 1, estimate.threads_per_rank))
    tokens, config = run_auto(llama_dir)
    assert config.layer_partition == [2.5, 1.5] and config.layer_partition_source == "auto"
    assert tokens == one_stage
