"""The start-up profile (worker/stage_profiler.py): which pieces are timed for each kind of
model, what they hold, and that the engine's torch threads are left as they were. Times are
only checked to exist: they belong to the machine."""
from __future__ import annotations

import torch

from asyncpp.core.stage_profile import EMBEDDING, HEAD, STAGE, TimingTable
from asyncpp.worker.stage_profiler import Steps, layer_kinds, measure, measure_isolated
from helpers.driver import engine_config
from helpers.models import VOCAB


def test_a_dense_model_is_timed_in_five_pieces(llama_dir):
    config = engine_config(llama_dir, 2, max_num_batched_tokens=96)
    before = torch.get_num_threads()
    table = measure(config, threads=1)
    assert torch.get_num_threads() == before
    assert table.attention == ("attention",) * 4 and table.mlp == ("mlp",) * 4
    assert set(table.pieces) == {STAGE, EMBEDDING, HEAD, "attention", "mlp"}
    assert (table.decode_seqs, table.decode_context, table.prefill_tokens, table.threads) == (32, 256, 96, 1)
    assert all(p.decode >= 0 and p.prefill >= 0 for p in table.pieces.values())
    assert table.pieces["attention"].decode > 0 and table.pieces[HEAD].decode > 0
    hidden = 64
    assert table.pieces[EMBEDDING].weight_bytes == VOCAB * hidden * 4
    assert table.pieces[HEAD].weight_bytes == (VOCAB + 1) * hidden * 4  # LM head and final norm
    assert table.pieces[STAGE].weight_bytes == 0
    assert TimingTable.from_json(table.to_json()) == table


def test_each_kind_of_half_layer_is_timed_once(qwen3_moe_dir, gemma3_dir):
    assert layer_kinds(engine_config(qwen3_moe_dir, 2))[1] == ("moe", "mlp", "moe", "moe")  # layer 1 dense
    moe = measure(engine_config(qwen3_moe_dir, 2), threads=1)
    assert {"moe", "mlp"} <= set(moe.pieces) and moe.pieces["moe"].weight_bytes > moe.pieces["mlp"].weight_bytes
    windowed = "attention (window 32)"
    assert layer_kinds(engine_config(gemma3_dir, 2))[0] == (windowed, windowed, "attention", windowed, windowed)
    assert {windowed, "attention"} <= set(measure(engine_config(gemma3_dir, 2), threads=1).pieces)


def test_the_timed_steps_fit_the_engine_limits(llama_dir):
    steps = Steps.of(engine_config(llama_dir, 2, max_model_len=64, max_num_seqs=8, max_num_batched_tokens=48))
    assert len(steps.decode.seqs) == 8 and {s.start_pos for s in steps.decode.seqs} == {63}
    assert steps.prefill.num_tokens == 48
    blocks = [b for s in steps.decode.seqs + steps.prefill.seqs for b in s.block_table]
    assert sorted(blocks) == list(range(steps.blocks))  # every block once


def test_a_process_of_its_own_answers_the_same_table(llama_dir):
    table = measure_isolated(engine_config(llama_dir, 2), threads=1, timeout_s=120)
    assert table.attention == ("attention",) * 4 and table.pieces["mlp"].decode > 0
