"""Engine arguments, sampling parameters and parallel layouts are checked before anything
starts, and each refusal names the field; the layer partition over pipeline stages (even
without costs, balanced by estimated cost, or explicit; measured: test_auto_partition.py)."""
from __future__ import annotations

import argparse
import logging

import pytest
from transformers import LlamaConfig

from asyncpp import LLM, SamplingParams
from asyncpp.core.config import ModelShape
from asyncpp.core.stages import StageCosts, format_partition, layer_spans, partition_layers
from asyncpp.engine_args import EngineArgs, check_tensor_parallel, create_engine_config
from helpers.driver import engine_config
from helpers.models import make_llama


def test_sampling_params_name_the_field():
    for kwargs, field in [({"max_tokens": -1}, "max_tokens"), ({"top_p": 0}, "top_p"),
                          ({"top_p": 1.5}, "top_p"), ({"temperature": -1}, "temperature"),
                          ({"n": 0}, "n"), ({"min_p": 2}, "min_p"), ({"top_k": -3}, "top_k")]:
        with pytest.raises(ValueError, match=field):
            SamplingParams(**kwargs)


def test_bad_engine_args_raise(tmp_path):
    with pytest.raises(ValueError, match="dtype"):
        EngineArgs(dtype="float8")
    with pytest.raises(ValueError, match="not found|config.json"):
        create_engine_config(EngineArgs(model=str(tmp_path / "missing")))


def test_bad_transport_choice_is_refused():
    with pytest.raises(ValueError, match="pp_comm must be one of auto, shm, gloo"):
        EngineArgs(pp_comm="tcp")


def test_prefix_caching_is_on_by_default_and_the_flags_turn_it_off():
    parser = argparse.ArgumentParser()
    EngineArgs.add_cli_args(parser)
    assert EngineArgs.from_cli_args(parser.parse_args([])).enable_prefix_caching
    off = EngineArgs.from_cli_args(parser.parse_args(["--no-enable-prefix-caching", "--no-cache-aware-placement"]))
    assert not off.enable_prefix_caching and not off.cache_aware_placement


# -- parallel layouts ------------------------------------------------------------------
def test_t_not_dividing_heads_fails_at_start(llama_dir):
    with pytest.raises(ValueError, match=r"tensor_parallel_size \(3\) must divide num_attention_heads \(4\)"):
        LLM(str(llama_dir), skip_tokenizer_init=True, tensor_parallel_size=3)


def test_layout_constraints_name_the_field(llama_dir):
    with pytest.raises(ValueError, match=r"num_key_value_heads \(4\)"):
        check_tensor_parallel(ModelShape.of(LlamaConfig(num_attention_heads=6, num_key_value_heads=4,
                                                         hidden_size=48)), 3)
    with pytest.raises(ValueError, match=r"intermediate size \(130\)"):
        check_tensor_parallel(ModelShape.of(LlamaConfig(num_attention_heads=4, num_key_value_heads=2,
                                                         intermediate_size=130)), 4)
    check_tensor_parallel(ModelShape.of(LlamaConfig(num_attention_heads=4, num_key_value_heads=2,
                                                     intermediate_size=128)), 4)
    with pytest.raises(ValueError, match=r"pipeline_parallel_size \(5\) is larger than the model's layer count \(4\)"):
        engine_config(llama_dir, pipeline_parallel_size=5)


def test_more_ranks_than_cores_warns_with_thread_count(llama_dir, monkeypatch, caplog):
    monkeypatch.setattr("asyncpp.engine_args.available_cores", lambda: 2)
    with caplog.at_level(logging.WARNING, logger="asyncpp"):
        config = engine_config(llama_dir, pipeline_parallel_size=2, tensor_parallel_size=2, num_threads=None)
    assert config.threads_per_rank == 1
    assert "4 ranks x 1 thread(s) on 2 cores" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="asyncpp"):
        assert engine_config(llama_dir, tensor_parallel_size=2, num_threads=None).threads_per_rank == 1
    assert caplog.text == ""


def test_ranks_are_numbered_stage_major(llama_dir):
    config = engine_config(llama_dir, pp=2, tensor_parallel_size=2)
    assert [(s.pp_rank, s.tp_rank, s.rank) for s in config.stages] == [(0, 0, 0), (0, 1, 1), (1, 0, 2), (1, 1, 3)]
    ranges = [(s.start, s.end) for s in layer_spans(config.layer_partition)]
    assert [(s.layer_start, s.layer_end) for s in config.stages] == [ranges[0], ranges[0], ranges[1], ranges[1]]


def test_cpu_microbatch_defaults_depend_on_the_pipeline(llama_dir):
    one, two = engine_config(llama_dir, pp=1), engine_config(llama_dir, pp=2)
    assert (one.max_num_batched_tokens, one.max_prefill_tokens_while_decoding) == (512, 128)
    assert (two.max_num_batched_tokens, two.max_prefill_tokens_while_decoding) == (256, 32)
    given = engine_config(llama_dir, pp=2, max_prefill_tokens_while_decoding=64)
    assert given.max_prefill_tokens_while_decoding == 64


def test_the_prompt_share_adapts_unless_it_is_given_or_prompts_are_whole(llama_dir):
    assert engine_config(llama_dir).adaptive_prefill_budget
    assert not engine_config(llama_dir, max_prefill_tokens_while_decoding=64).adaptive_prefill_budget
    assert not engine_config(llama_dir, enable_chunked_prefill=False).adaptive_prefill_budget


# -- the layer partition ---------------------------------------------------------------
@pytest.mark.parametrize("layers, stages", [(4, 1), (4, 2), (4, 3), (4, 4), (30, 4), (5, 2)])
def test_without_costs_the_partition_is_even(layers, stages):
    parts = partition_layers(layers, stages)
    assert len(parts) == stages and sum(parts) == layers and max(parts) - min(parts) <= 1


def test_explicit_partition_and_layer_spans():
    assert partition_layers(4, 3, "2, 1,1") == [2, 1, 1]
    assert partition_layers(4, 2, [3, 1]) == [3, 1]
    assert [(s.start, s.end) for s in layer_spans([2, 1, 1])] == [(0, 2), (2, 3), (3, 4)]
    split = partition_layers(4, 3, "1.5,1,1.5")
    assert split == [1.5, 1, 1.5] and format_partition(split) == "1.5,1,1.5"
    assert [(s.start, s.end, s.mlp_only_first, s.attention_only_last) for s in layer_spans(split)] == [
        (0, 2, False, True), (1, 3, True, True), (2, 4, True, False)]


def test_split_layers_are_chosen_only_when_they_balance_clearly_better():
    """Attention halves cost 3, MLP halves 1, the last stage's head 4: whole layers give
    5,3 (costs 20, 16); splitting layer 5 after its attention gives 19, 17."""
    costs = StageCosts(attention=3.0, mlp=1.0, first=0.0, last=4.0)
    assert partition_layers(8, 2, costs=costs) == [4.5, 3.5]
    assert costs.of([4.5, 3.5]) == [19.0, 17.0] and costs.of([5, 3]) == [20.0, 16.0]
    even = StageCosts(attention=3.0, mlp=1.0, first=0.0, last=0.0)
    assert partition_layers(8, 2, costs=even) == [4, 4]  # whole layers already balance


@pytest.mark.parametrize("explicit, message", [
    ("2,2", "has 2 entries but pipeline_parallel_size is 3"),
    ("2,1,2", "sums to 5 but the model has 4 layers"),
    ("3,1,0", "every stage needs at least one layer"),
    ("2,x,1", "comma-separated layer counts"),
    ("1.7,1.3,1", "halfway through one"),
])
def test_bad_explicit_partition_is_named(explicit, message):
    with pytest.raises(ValueError, match=message):
        partition_layers(4, 3, explicit)


def test_cost_partition_weighs_a_large_vocabulary(tmp_path):
    """With a 32,000-row head on 64-wide layers the last stage's head outweighs layers."""
    big_vocab = make_llama(tmp_path / "big-vocab", vocab=32000)
    config = create_engine_config(EngineArgs(model=str(big_vocab), pipeline_parallel_size=2,
                                             skip_tokenizer_init=True, device="cpu", pp_layer_partition="cost"))
    assert config.layer_partition == [3, 1]
    costs = config.shape.stage_costs(4).of(config.layer_partition)
    assert max(costs) < max(config.shape.stage_costs(4).of([2, 2]))
    explicit = create_engine_config(EngineArgs(model=str(big_vocab), pipeline_parallel_size=2, device="cpu",
                                               skip_tokenizer_init=True, pp_layer_partition="2,2"))
    assert explicit.layer_partition == [2, 2]
