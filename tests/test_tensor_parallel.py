"""Tensor parallelism through the engine: greedy fp32 parity with transformers for T = 2 and
P = 2 x T = 2, each rank holding only its slice; the CPU collectives; invalid layouts."""
from __future__ import annotations

import logging

import pytest
import torch

from helpers.driver import engine_config
from helpers.parity import engine_tokens, greedy, hf_greedy, mixed_prompts

MAX_TOKENS = 8


def expected_rank_bytes(model_dir, pp: int, tp: int) -> list[int]:
    """Per global rank: what a T = 1 stage holds, with the TP-split tensors divided by T
    (norms, position embeddings and row-parallel biases stay whole on every rank)."""
    from asyncpp.model.embedding import VocabParallelEmbedding
    from asyncpp.model.linear import ColumnParallelLinear, RowParallelLinear
    from asyncpp.worker.model_runner import ModelRunner

    config = engine_config(model_dir, pipeline_parallel_size=pp)
    expected = []
    for stage in config.stages:
        model, seen = ModelRunner(config, stage).model, set()
        split = whole = 0
        for module in model.modules():
            for name, p in module.named_parameters(recurse=False):
                if id(p) in seen:
                    continue
                seen.add(id(p))
                nbytes = p.numel() * p.element_size()
                sharded = isinstance(module, (ColumnParallelLinear, VocabParallelEmbedding)) or (
                    isinstance(module, RowParallelLinear) and name == "weight")
                split, whole = (split + nbytes, whole) if sharded else (split, whole + nbytes)
        assert split % tp == 0
        expected += [whole + split // tp] * tp
    return expected


def tp_run(model_dir, pp: int, tp: int, seed: int):
    from asyncpp import LLM

    prompts = mixed_prompts(6, seed=seed)
    with LLM(str(model_dir), skip_tokenizer_init=True, pipeline_parallel_size=pp, tensor_parallel_size=tp,
             max_num_batched_tokens=96) as llm:
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], greedy(MAX_TOKENS))
        per_rank = llm.engine.param_bytes_per_rank()
    assert [o.outputs[0].token_ids for o in outs] == hf_greedy(model_dir, prompts, MAX_TOKENS)
    assert per_rank == expected_rank_bytes(model_dir, pp, tp)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_tp2_matches_hf_and_loads_slices(arch, llama_dir, gpt2_dir):
    tp_run(llama_dir if arch == "llama" else gpt2_dir, pp=1, tp=2, seed=21)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_pp2_tp2_matches_hf_and_loads_slices(arch, llama_dir, gpt2_dir):
    tp_run(llama_dir if arch == "llama" else gpt2_dir, pp=2, tp=2, seed=22)


def test_tp2_over_gloo_matches_hf(llama_dir):
    """The fallback transport (other machines, other architectures) gives the same tokens."""
    prompts = mixed_prompts(4, hi=120, seed=23)
    tokens, _ = engine_tokens(llama_dir, prompts, MAX_TOKENS, tensor_parallel_size=2, tp_comm="gloo")
    assert tokens == hf_greedy(llama_dir, prompts, MAX_TOKENS)


# -- invalid layouts -------------------------------------------------------------------
def test_t_not_dividing_heads_fails_at_start(llama_dir):
    from asyncpp import LLM

    with pytest.raises(ValueError, match=r"tensor_parallel_size \(3\) must divide num_attention_heads \(4\)"):
        LLM(str(llama_dir), skip_tokenizer_init=True, tensor_parallel_size=3)


def test_layout_constraints_name_the_field(llama_dir):
    from transformers import LlamaConfig

    from asyncpp.config import check_tensor_parallel
    from asyncpp.core.config import ModelShape

    with pytest.raises(ValueError, match=r"num_key_value_heads \(4\)"):
        check_tensor_parallel(ModelShape.of(LlamaConfig(num_attention_heads=6, num_key_value_heads=4, hidden_size=48)), 3)
    with pytest.raises(ValueError, match=r"intermediate size \(130\)"):
        check_tensor_parallel(ModelShape.of(LlamaConfig(num_attention_heads=4, num_key_value_heads=2,
                                                         intermediate_size=130)), 4)
    check_tensor_parallel(ModelShape.of(LlamaConfig(num_attention_heads=4, num_key_value_heads=2,
                                                     intermediate_size=128)), 4)
    with pytest.raises(ValueError, match=r"pipeline_parallel_size \(5\) is larger than the model's layer count \(4\)"):
        engine_config(llama_dir, pipeline_parallel_size=5)


def test_more_ranks_than_cores_warns_with_thread_count(llama_dir, monkeypatch, caplog):
    monkeypatch.setattr("asyncpp.config.available_cores", lambda: 2)
    with caplog.at_level(logging.WARNING, logger="asyncpp"):
        config = engine_config(llama_dir, pipeline_parallel_size=2, tensor_parallel_size=2)
    assert config.threads_per_rank == 1
    assert "4 ranks x 1 thread(s) on 2 cores" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="asyncpp"):
        assert engine_config(llama_dir, tensor_parallel_size=2).threads_per_rank == 1
    assert caplog.text == ""


# -- the CPU collectives -----------------------------------------------------------------
def _collectives_rank(rank: int, world: int, init: str, slot_bytes: int, out_dir: str) -> None:
    import os

    import torch.distributed as dist

    from asyncpp.worker.tp_comm import make_tp_communicator, open_shared_memory

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        tp = make_tp_communicator(1, world, rank, "auto")
        assert tp.transport == "shm"
        dist.barrier()  # rank 0 has unlinked by now
        assert not os.path.exists(tp.shm.region.path)  # unlinked once every rank mapped it
        tp.shm = open_shared_memory(tp, slot_bytes)  # small slots: big tensors go in pieces
        results = []
        for step, (shape, dtype) in enumerate([((1, 4096), torch.float32), ((33, 17), torch.float32),
                                               ((300, 64), torch.float32), ((5, 7), torch.bfloat16)]):
            torch.manual_seed(100 * step + rank)
            mine = torch.randn(shape).to(dtype)
            parts = [torch.empty_like(mine) for _ in range(world)]
            dist.all_gather(parts, mine)
            summed = mine.clone()
            tp.all_reduce(summed)
            in_order = parts[0].clone()
            for p in parts[1:]:
                in_order += p
            strided = mine.t().clone().t()  # non-contiguous input
            tp.all_reduce(strided)
            results.append([torch.equal(summed, in_order), torch.equal(strided, in_order),
                            torch.equal(tp.all_gather(mine, dim=-1), torch.cat(parts, -1)),
                            torch.equal(tp.all_gather(mine, dim=0), torch.cat(parts, 0))])
        torch.save({"checks": results, "sum": summed, "calls": tp.calls, "comm_s": tp.comm_s},
                   f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 3])
def test_shared_memory_collectives_exact_and_identical(world, tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_collectives_rank, args=(world, f"file://{tmp_path}/rdzv", 4096, str(tmp_path)), nprocs=world)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    for r in ranks:
        assert all(all(checks) for checks in r["checks"]), r["checks"]
        assert r["calls"] == 16 and r["comm_s"] > 0
    assert all(torch.equal(r["sum"], ranks[0]["sum"]) for r in ranks)
