"""`pp_layer_partition="auto"`, the default: the profile cache's key (another model, precision,
layout or thread count profiles again; the same one reuses the profile), what the engine does
with a table, the fallback to the estimate when profiling fails, and explicit splits overriding.
A fake measure stands in for the clock."""
from __future__ import annotations

import argparse
import json
import logging
import shutil
from pathlib import Path

import pytest

from asyncpp import auto_partition
from asyncpp.core.config import EngineConfig
from asyncpp.core.stage_profile import EMBEDDING, HEAD, STAGE, PieceTimes, TimingTable
from asyncpp.engine_args import EngineArgs, create_engine_config
from asyncpp.profile_cache import load_profile, profile_key, profile_path, store_profile
from helpers.driver import engine_config


def fake_table(layers: int) -> TimingTable:
    """Halves of 1 unit in decode and in prefill, a head of 4 in decode: at P=2 on 4 layers the
    stages balance at 10 / 10 by ending the first stage after layer 2's attention."""
    pieces = {STAGE: PieceTimes(0.5, 0.5), EMBEDDING: PieceTimes(0.0, 0.0), HEAD: PieceTimes(4.0, 0.0, 10),
              "attention": PieceTimes(1.0, 1.0, 1), "mlp": PieceTimes(1.0, 1.0, 2)}
    return TimingTable(pieces, ("attention",) * layers, ("mlp",) * layers, decode_seqs=1, decode_context=256,
                       prefill_tokens=1, threads=1)


class FakeMeasure:
    def __init__(self) -> None:
        self.calls: list[tuple[str, int, int]] = []

    def __call__(self, config: EngineConfig, threads: int) -> TimingTable:
        self.calls.append((Path(config.model_path).name, config.stages[0].pp_size, threads))
        return fake_table(config.shape.num_layers)


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("ASYNCPP_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache" / "stage-profiles"


@pytest.fixture
def measured(monkeypatch) -> FakeMeasure:
    fake = FakeMeasure()
    monkeypatch.setattr(auto_partition, "default_measure", fake)
    return fake


def auto_config(model_dir: Path, pp: int = 2, **overrides) -> EngineConfig:
    settings = {"skip_tokenizer_init": True, "device": "cpu", "dtype": "float32", "num_threads": 1} | overrides
    return create_engine_config(EngineArgs(model=str(model_dir), pipeline_parallel_size=pp, **settings))


def test_auto_is_the_default_on_the_command_line_and_in_the_sdk():
    parser = argparse.ArgumentParser()
    EngineArgs.add_cli_args(parser)
    assert EngineArgs.from_cli_args(parser.parse_args([])).pp_layer_partition == "auto"
    assert EngineArgs().pp_layer_partition == "auto"
    assert EngineArgs.from_cli_args(parser.parse_args(["--pp-layer-partition", "3,1"])).pp_layer_partition == "3,1"


def test_the_engine_splits_by_the_measured_table_and_logs_it(llama_dir, cache, measured, caplog):
    with caplog.at_level(logging.INFO, logger="asyncpp"):
        config = auto_config(llama_dir)
    assert config.layer_partition == [2.5, 1.5] and config.layer_partition_source == "auto"
    assert [(s.layer_start, s.layer_end, s.attention_only_last, s.mlp_only_first) for s in config.stages] == [
        (0, 3, True, False), (2, 4, False, True)]
    text = caplog.text
    assert "stage profile (measured in" in text and "4 x attention: decode 1000.00 ms" in text
    # each stage's 0.5 s and its halves (and the head's 4 s in decode): 11 s of decode and prefill each
    assert "layer partition 2.5,1.5 (auto" in text and "decode 5500.0/7500.0, prefill 5500.0/3500.0" in text


def test_a_second_start_reuses_the_profile_and_another_model_or_layout_profiles_again(
        llama_dir, qwen2_dir, tmp_path, cache, measured, caplog):
    auto_config(llama_dir)
    with caplog.at_level(logging.INFO, logger="asyncpp"):
        again = auto_config(llama_dir)
    assert again.layer_partition == [2.5, 1.5] and "stage profile (cached in" in caplog.text
    assert measured.calls == [(llama_dir.name, 2, 1)]
    auto_config(llama_dir, pp=3)
    auto_config(llama_dir, tensor_parallel_size=2)
    auto_config(qwen2_dir)
    auto_config(llama_dir, dtype="bfloat16")
    copy = shutil.copytree(llama_dir, tmp_path / "copy")  # the same weights in another folder
    auto_config(copy)
    assert [c[:2] for c in measured.calls[1:]] == [(llama_dir.name, 3), (llama_dir.name, 2), (qwen2_dir.name, 2),
                                                   (llama_dir.name, 2), ("copy", 2)]
    assert len(list(cache.glob("*.json"))) == 6


def test_the_key_names_the_model_config_layout_threads_and_host(llama_dir, tmp_path):
    base = engine_config(llama_dir, 2)
    key = profile_key(base, 1)
    assert profile_key(engine_config(llama_dir, 2), 1) == key
    edited = shutil.copytree(llama_dir, tmp_path / "edited")
    settings = json.loads((edited / "config.json").read_text())
    (edited / "config.json").write_text(json.dumps({**settings, "rms_norm_eps": 1e-5}))
    moved = profile_key(engine_config(edited, 2), 1)
    assert moved["config_sha256"] != key["config_sha256"]
    others = [profile_key(base, 2), profile_key(engine_config(llama_dir, 3), 1), moved,
              profile_key(engine_config(llama_dir, 2, tensor_parallel_size=2), 1),
              profile_key(engine_config(llama_dir, 2, max_num_batched_tokens=64), 1),
              profile_key(engine_config(llama_dir, 2, kv_cache_dtype="fp8"), 1)]
    assert len({profile_path(k) for k in [key, *others]}) == 1 + len(others)
    assert key["host"]["cpu"] and len(key["host"]["cpu_flags"]) == 16


def test_a_stored_profile_is_read_back_and_a_broken_or_foreign_one_is_not(llama_dir, cache):
    key = profile_key(engine_config(llama_dir, 2), 1)
    assert load_profile(key) is None
    path = store_profile(key, fake_table(4))
    assert path == profile_path(key) and load_profile(key) == fake_table(4)
    path.write_text("{not json")
    assert load_profile(key) is None
    path.write_text(json.dumps({"key": {**key, "pp": 9}, "table": fake_table(4).to_json()}))
    assert load_profile(key) is None


def test_a_failed_profile_falls_back_to_the_estimate_in_one_line(llama_dir, cache, monkeypatch, caplog):
    def broken(config: EngineConfig, threads: int) -> TimingTable:
        raise RuntimeError("no clock")

    monkeypatch.setattr(auto_partition, "default_measure", broken)
    with caplog.at_level(logging.INFO, logger="asyncpp"):
        config = auto_config(llama_dir, pp=3)
    assert config.layer_partition == auto_config(llama_dir, pp=3, pp_layer_partition="cost").layer_partition
    assert config.layer_partition_source == "cost"
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and r.module == "auto_partition"]
    assert warnings == ["layer partition: profiling the stages failed (RuntimeError: no clock); balancing by the "
                        "estimate from bytes instead"]
    assert not cache.exists()


def test_an_explicit_split_the_estimate_or_one_stage_measure_nothing(llama_dir, cache, measured):
    given = auto_config(llama_dir, pp_layer_partition="3,1")
    assert (given.layer_partition, given.layer_partition_source) == ([3, 1], "given")
    assert auto_config(llama_dir, pp_layer_partition="cost").layer_partition_source == "cost"
    one = auto_config(llama_dir, pp=1)
    assert (one.layer_partition, one.layer_partition_source) == ([4], "")
    assert measured.calls == []


def test_the_rebalancer_predicts_from_the_cached_table_only(llama_dir, cache, measured):
    given = auto_config(llama_dir, pp_layer_partition="3,1")
    assert auto_partition.cached_predictor(given) is None and measured.calls == []  # nothing measured for it
    auto_config(llama_dir)  # measures and caches the table of this model, layout and host
    predict = auto_partition.cached_predictor(given)
    assert predict is not None
    assert max(predict([2.5, 1.5])) < max(predict([3.0, 1.0]))


def test_pp_rebalance_flags_reach_the_config(llama_dir):
    parser = argparse.ArgumentParser()
    EngineArgs.add_cli_args(parser)
    args = EngineArgs.from_cli_args(parser.parse_args(["--pp-rebalance", "--pp-rebalance-window", "5",
                                                       "--pp-rebalance-threshold", "0.2"]))
    assert (args.pp_rebalance, args.pp_rebalance_window, args.pp_rebalance_threshold) == (True, 5.0, 0.2)
    assert EngineArgs().pp_rebalance is False
    settings = auto_config(llama_dir, pp_layer_partition="3,1", pp_rebalance=True,
                           pp_rebalance_window=5.0).rebalance
    assert (settings.enabled, settings.window_s, settings.threshold) == (True, 5.0, 0.10)
    assert auto_config(llama_dir, pp=1, pp_rebalance=True).rebalance.enabled is False  # one stage: nothing to move
    with pytest.raises(ValueError, match="pp_rebalance_window"):
        EngineArgs(pp_rebalance_window=0)


def test_the_traffic_mix_moves_the_split(llama_dir, cache, measured, caplog):
    """The fake table's head weighs 4 halves in decode and nothing in prefill: prompts alone
    balance at 2,2, generation alone at 3,1, the default chat mix at 2.5,1.5."""
    assert auto_config(llama_dir, pp_partition_mix="1:0").layer_partition == [2.0, 2.0]
    assert auto_config(llama_dir, pp_partition_mix="0:1").layer_partition == [3.0, 1.0]
    assert auto_config(llama_dir).partition_mix == (1.0, 1.0)
    prompts = auto_config(llama_dir, pp_layer_partition="3,1", pp_partition_mix="20:1")
    assert prompts.partition_mix == (20.0, 1.0)
    predict = auto_partition.cached_predictor(prompts)  # --pp-rebalance predicts for the same mix
    assert predict is not None and max(predict([2.0, 2.0])) < max(predict([2.5, 1.5]))
    assert len(measured.calls) == 1  # one table, whatever the mix
    for bad in ("1", "a:b", "0:0", "-1:2", "inf:1"):
        with pytest.raises(ValueError, match="pp_partition_mix"):
            EngineArgs(pp_partition_mix=bad)
