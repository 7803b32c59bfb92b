"""speculative_config: vLLM's keys, checked before any stage starts (each refusal names the
field), from the SDK's dict or the command line's JSON; and the speculator's limits."""
from __future__ import annotations

import argparse

import pytest
import xgrammar as xgr

from asyncpp import LLM
from asyncpp.core.outputs import RequestMetrics
from asyncpp.core.sampling_params import SamplingParams
from asyncpp.core.speculative import DEFAULT_DISABLE_BY_BATCH_SIZE, SpeculativeConfig, parse_speculative_config
from asyncpp.engine.block_manager import BlockManager
from asyncpp.engine.grammar_state import GrammarState
from asyncpp.engine.sequence import Request, Sequence
from asyncpp.engine.speculator import SpecDecodeStats, Speculator
from asyncpp.engine_args import EngineArgs, create_engine_config

NGRAM = {"method": "ngram", "num_speculative_tokens": 3}


@pytest.mark.parametrize("config,field", [
    ({"method": "eagle", "num_speculative_tokens": 3}, "speculative_config.method"),
    ({"num_speculative_tokens": 3}, "speculative_config.method"),
    ({"model": "/some/draft", "num_speculative_tokens": 3}, "speculative_config.model"),
    (NGRAM | {"model": "/some/draft"}, "speculative_config.model"),
    ({"method": "ngram"}, "speculative_config.num_speculative_tokens"),
    (NGRAM | {"num_speculative_tokens": 0}, "speculative_config.num_speculative_tokens"),
    (NGRAM | {"num_speculative_tokens": 2.5}, "speculative_config.num_speculative_tokens"),
    (NGRAM | {"prompt_lookup_min": 4, "prompt_lookup_max": 2}, "speculative_config.prompt_lookup_min"),
    (NGRAM | {"prompt_lookup_min": 0}, "speculative_config.prompt_lookup_min"),
    (NGRAM | {"prompt_lookup_max": -1}, "speculative_config.prompt_lookup_max"),
    (NGRAM | {"disable_by_batch_size": 0}, "speculative_config.disable_by_batch_size"),
    (NGRAM | {"num_lookahead": 3}, "num_lookahead"),
    ("{not json", "speculative_config"),
    ("[1, 2]", "speculative_config"),
])
def test_bad_configs_name_the_field_before_anything_starts(config, field):
    with pytest.raises(ValueError, match=field):
        EngineArgs(speculative_config=config)
    with pytest.raises(ValueError, match=field):
        LLM(model="/nowhere", speculative_config=config)  # refused before the model is even looked for


def test_defaults_follow_vllm():
    assert parse_speculative_config(None) is None
    assert parse_speculative_config(NGRAM) == SpeculativeConfig("ngram", 3, 5, 5, DEFAULT_DISABLE_BY_BATCH_SIZE["cpu"])
    one_bound = parse_speculative_config(NGRAM | {"prompt_lookup_max": 4}, "cuda")
    assert (one_bound.prompt_lookup_min, one_bound.prompt_lookup_max) == (4, 4)
    assert one_bound.disable_by_batch_size == DEFAULT_DISABLE_BY_BATCH_SIZE["cuda"]


def test_the_command_line_takes_json(llama_dir):
    parser = argparse.ArgumentParser()
    EngineArgs.add_cli_args(parser)
    ns = parser.parse_args([str(llama_dir), "--speculative-config",
                            '{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 2, '
                            '"prompt_lookup_max": 3, "disable_by_batch_size": 16}'])
    config = create_engine_config(EngineArgs.from_cli_args(ns))
    assert config.speculative == SpeculativeConfig("ngram", 4, 2, 3, 16)


def _sequence(prompt: list[int], max_tokens: int = 16) -> Sequence:
    request = Request("r", None, prompt, SamplingParams(max_tokens=max_tokens), max_tokens, RequestMetrics(0.0))
    request.seqs = [Sequence(request, 0, prompt)]
    return request.seqs[0]


def test_proposals_stop_at_the_batch_size_limit_and_respect_max_tokens_and_the_context():
    speculator = Speculator(SpeculativeConfig("ngram", 4, 1, 2, disable_by_batch_size=3), max_model_len=64)
    seq = _sequence([5, 6, 7, 8, 9, 5, 6])
    assert speculator.propose(seq, room=10) == [7, 8, 9, 5]
    assert speculator.propose(seq, room=2) == [7, 8]
    speculator.set_load(3)
    assert speculator.propose(seq, room=10) == []
    speculator.set_load(2)
    seq.output_token_ids = [7, 8, 9, 5, 6] * 2 + [7, 8, 9]  # 16 - 13 - 1 (the token after them): 2 to propose
    assert len(speculator.propose(seq, room=10)) == 2
    short = Speculator(SpeculativeConfig("ngram", 4, 1, 2, 8), max_model_len=len(seq.prompt_token_ids) + 14)
    assert short.propose(seq, room=10) == []  # the context is full but for the token after


@pytest.mark.parametrize("regex,proposal", [(r"(abc)+", [4]),  # "d" is forbidden after "abc"
                                             (r"abcda", [4, 5, 2]),  # "b" is past the end
                                             (r"abc", [4])])  # the stop token is left to the row after "c"
def test_a_grammar_cuts_the_proposal(regex, proposal):
    vocab = ["<s>", "</s>", "a", "b", "c", "d"]
    compiled = xgr.GrammarCompiler(xgr.TokenizerInfo(vocab, stop_token_ids=[1])).compile_regex(regex)
    seq = _sequence([2, 3, 4, 1, 5] if regex == "abc" else [2, 3, 4, 5])  # "abc</s>d", "abcd"
    seq.output_token_ids, seq.grammar = [2, 3], GrammarState(compiled)  # "ab": the n-grams propose what followed it
    assert seq.grammar.advance([2, 3])
    assert Speculator(SpeculativeConfig("ngram", 4, 1, 2, 8), max_model_len=64).propose(seq, room=10) == proposal
    assert seq.grammar.num_accepted == 2


def test_counts_follow_each_verified_draft():
    speculator = Speculator(SpeculativeConfig("ngram", 3, 1, 2, 8), max_model_len=64)
    seq = _sequence([1, 2, 1])
    speculator.propose(seq, room=3)
    speculator.verified(seq, 3, 2)
    speculator.verified(seq, 2, 0)
    stats = speculator.stats
    assert (stats.num_drafts, stats.num_draft_tokens, stats.num_accepted_tokens) == (2, 5, 2)
    assert stats.accepted_per_position == [1, 1, 0]
    assert stats.acceptance_rate == 0.4 and stats.mean_acceptance_length == 2.0
    total = SpecDecodeStats(accepted_per_position=[0, 0, 0])
    total.add(stats)
    total.add(stats)
    assert total.accepted_per_position == [2, 2, 0] and total.num_drafts == 4


def test_rolling_back_frees_only_the_blocks_past_the_kept_tokens():
    blocks = BlockManager(8, 4, enable_caching=True)
    seq = _sequence(list(range(6)))
    assert blocks.allocate(seq, 13)  # 6 tokens and 7 proposals: 4 blocks
    blocks.cache_full_blocks(seq, 6)
    blocks.truncate(seq, 8)
    assert len(seq.block_table) == 2 and blocks.num_used == 2
    blocks.truncate(seq, 8)  # nothing left to roll back
    blocks.free(seq)
    assert blocks.num_used == 0


def test_a_draft_model_is_configured_as_vllm_does(llama_dir):
    config = parse_speculative_config({"model": str(llama_dir), "num_speculative_tokens": 3})
    assert (config.method, config.model, config.num_speculative_tokens) == ("draft_model", str(llama_dir), 3)
    assert parse_speculative_config({"method": "draft_model", "model": str(llama_dir),
                                     "num_speculative_tokens": 3}) == config
    engine = create_engine_config(EngineArgs(model=str(llama_dir), speculative_config=config_json(llama_dir)))
    assert engine.speculative == config


def config_json(model_dir) -> str:
    return f'{{"model": "{model_dir}", "num_speculative_tokens": 3}}'


@pytest.fixture
def bad_drafts(tmp_path, llama_dir):
    """Draft folders each wrong in one way, by name."""
    garbled = tmp_path / "garbled"
    garbled.mkdir()
    (garbled / "config.json").write_text("{not json")
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text('{"model_type": "bert", "architectures": ["BertModel"], "vocab_size": 12}')
    return {"garbled": garbled, "bert": bert, "larger_vocab": llama_dir}


@pytest.mark.parametrize("which,message", [("garbled", "does not load"), ("bert", "BertModel"),
                                           ("larger_vocab", "vocab_size")])
def test_a_draft_the_target_cannot_use_is_refused_before_anything_starts(llama_v12_dir, bad_drafts, which, message):
    config = {"model": str(bad_drafts[which]), "num_speculative_tokens": 3}
    with pytest.raises(ValueError, match=f"speculative_config.model.*{message}"):
        LLM(model=str(llama_v12_dir), skip_tokenizer_init=True, speculative_config=config)


@pytest.mark.parametrize("config,field", [
    ({"method": "draft_model", "num_speculative_tokens": 3}, "speculative_config.model"),
    ({"method": "draft_model", "model": "/no/such/draft", "num_speculative_tokens": 3}, "speculative_config.model"),
    ({"method": "draft_model", "model": "DRAFT", "num_speculative_tokens": 3, "prompt_lookup_max": 2},
     "speculative_config.prompt_lookup_max"),
    ({"model": "DRAFT"}, "speculative_config.num_speculative_tokens"),
])
def test_bad_draft_model_configs_name_the_field(llama_dir, config, field):
    config = {key: str(llama_dir) if value == "DRAFT" else value for key, value in config.items()}
    with pytest.raises(ValueError, match=field):
        EngineArgs(speculative_config=config)


@pytest.mark.parametrize("pp,draft_config,threads", [(1, None, 8), (1, True, 8), (2, None, 4), (2, True, 2)])
def test_a_draft_beside_the_stages_takes_a_ranks_share_of_the_cores(llama_dir, monkeypatch, pp, draft_config,
                                                                    threads):
    """At P = 1, V = 1 draft and model take turns on the same threads; else the draft is one more rank."""
    monkeypatch.setattr("asyncpp.engine_args.available_cores", lambda: 8)
    spec = config_json(llama_dir) if draft_config else None
    config = create_engine_config(EngineArgs(model=str(llama_dir), pipeline_parallel_size=pp,
                                             pp_layer_partition="cost", speculative_config=spec))
    assert config.threads_per_rank == threads
