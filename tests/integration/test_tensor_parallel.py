"""Tensor parallelism: greedy fp32 parity with transformers for T = 2 and P = 2 x T = 2
through the engine, and through ModelRunners driven by hand in a gloo world, each rank
holding only its slice; the CPU collectives. (Invalid layouts: unit/test_config.py.)"""
from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp

from helpers.driver import run_tensor_parallel, runners_for
from helpers.parity import engine_tokens, hf_greedy, mixed_prompts, tp_run

MAX_TOKENS = 8


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_tp2_matches_hf_and_loads_slices(arch, llama_dir, gpt2_dir):
    tp_run(llama_dir if arch == "llama" else gpt2_dir, pp=1, tp=2, seed=21)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_pp2_tp2_matches_hf_and_loads_slices(arch, llama_dir, gpt2_dir):
    tp_run(llama_dir if arch == "llama" else gpt2_dir, pp=2, tp=2, seed=22)


@pytest.mark.slow
def test_pp2_tp2_with_a_split_layer(llama_dir):
    """Layer 2's attention heads sharded on stage 0's two ranks, its MLP on stage 1's."""
    tp_run(llama_dir, pp=2, tp=2, seed=24, partition="1.5,2.5")


def test_tp2_over_gloo_matches_hf(llama_dir):
    """The fallback transport (other machines, other architectures) gives the same tokens."""
    prompts = mixed_prompts(4, hi=120, seed=23)
    tokens, _ = engine_tokens(llama_dir, prompts, MAX_TOKENS, tensor_parallel_size=2, tp_comm="gloo")
    assert tokens == hf_greedy(llama_dir, prompts, MAX_TOKENS)


# -- ModelRunners sharded over a real gloo world, driven by hand ---------------------------
MAX_NEW = 12


def make_odd_vocab_llama(path, vocab: int = 1001):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=1024,
                      tie_word_embeddings=False, initializer_range=0.2, bos_token_id=1, eos_token_id=2)
    LlamaForCausalLM(cfg).eval().save_pretrained(path, safe_serialization=True)
    return path


@pytest.mark.slow
@pytest.mark.parametrize("model,pp", [("llama", 2), ("qwen2", 1), ("gpt2", 2)])
def test_tensor_parallel_two_ranks(model, pp, llama_dir, qwen2_dir, gpt2_dir, tmp_path):
    model_dir = {"llama": llama_dir, "qwen2": qwen2_dir, "gpt2": gpt2_dir}[model]
    prompts = mixed_prompts(4, 1, 150, seed=1)
    expected = hf_greedy(model_dir, prompts, MAX_NEW)
    results = run_tensor_parallel(model_dir, tmp_path, prompts, MAX_NEW, tp=2, pp=pp)
    assert [r["tokens"] for r in results] == [expected, expected]
    whole = sum(r.param_bytes() for r in runners_for(model_dir, pp=pp))
    for r in results:  # sharded: only norms, row-parallel biases (and GPT-2 positions) are replicated
        assert sum(r["param_bytes"]) < 0.6 * whole


@pytest.mark.slow
def test_tensor_parallel_replicated_kv_heads_and_padded_vocab(tmp_path):
    """One KV head for two ranks (replicated), vocab 1001 (one padding row on rank 1)."""
    model_dir = make_odd_vocab_llama(tmp_path / "odd")
    prompts = mixed_prompts(3, 1, 120, seed=2)
    expected = hf_greedy(model_dir, prompts, MAX_NEW)
    results = run_tensor_parallel(model_dir, tmp_path, prompts, MAX_NEW, tp=2)
    assert [r["tokens"] for r in results] == [expected, expected]


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
    mp.spawn(_collectives_rank, args=(world, f"file://{tmp_path}/rdzv", 4096, str(tmp_path)), nprocs=world)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    for r in ranks:
        assert all(all(checks) for checks in r["checks"]), r["checks"]
        assert r["calls"] == 16 and r["comm_s"] > 0
    assert all(torch.equal(r["sum"], ranks[0]["sum"]) for r in ranks)
