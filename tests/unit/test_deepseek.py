"""DeepSeek-V3 / V2 beyond the shared family tests (test_family_runners, test_family_engines):
the latent cache's size and cost, the routers against transformers', the variants (a plain
q_proj, non-interleaved rotary, V2's softmax group-limited routing) and an 8-bit latent cache."""
from __future__ import annotations

import pytest
import torch
from transformers import DeepseekV2Config, DeepseekV3Config

from asyncpp.core.config import COST_CONTEXT, COST_SEQS, ModelShape
from asyncpp.model.deepseek import DeepseekMoeBlock
from asyncpp.model.parallel import SingleRankGroup
from asyncpp.testing.tiny_model import make_deepseek_v2, make_deepseek_v3
from helpers.driver import engine_config, generate, runners_for
from helpers.parity import hf_greedy, mixed_prompts
from helpers.quality import forced_logits, hf_forced_logits, top1_agreement

MAX_NEW = 12


def test_the_published_v3_shape_caches_one_latent_entry_per_token_and_costs_it():
    shape = ModelShape.of(DeepseekV3Config())  # 61 layers, 128 heads, latent 512 + rotary 64, 256 experts
    assert shape.latent is not None and shape.kv_elements_per_token == 512 + 64  # not 2 x 128 heads x 192
    assert shape.moe_layers == tuple(range(3, 61)) and shape.shared_expert_intermediate_size == 2048
    h, heads = 7168, 128
    attention = (h * 1536 + 1536 * heads * 192) + h * 576 + 512 * heads * (128 + 128) + heads * 128 * h
    costs = shape.stage_costs(elem_bytes=2)
    assert costs.attention == (attention + COST_SEQS * COST_CONTEXT * 576) * 2
    touched = 256 * (1 - (1 - 8 / 256) ** COST_SEQS)
    assert costs.layer_mlp[0] == 3 * h * 18432 * 2  # the dense first layers
    assert costs.layer_mlp[3] == pytest.approx((256 * h + 3 * h * (touched + 1) * 2048) * 2)


def test_the_tiny_latent_cache_block_and_its_tensors(deepseek_v3_dir):
    """4 layers x 16 slots x (32 + 16) fp32 per block, whatever share of the heads a rank holds."""
    config = engine_config(deepseek_v3_dir)
    assert config.kv_bytes_per_block() == 4 * 16 * 48 * 4
    assert config.kv_bytes_per_block(2, num_kv_heads=1) == 2 * 16 * 48 * 4
    runner = runners_for(deepseek_v3_dir, num_blocks=7)[0]
    assert [tuple(t.shape) for c in runner.kv_caches[0] for t in c] == [(7, 16, 48)] * 4


@pytest.mark.parametrize("v3", [True, False])
def test_routing_matches_transformers(v3):
    """The chosen experts and their weights, as transformers' routers give them, on tokens
    whose scores make every group and expert choice count."""
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2TopkRouter
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

    torch.manual_seed(0)
    common = dict(hidden_size=32, n_routed_experts=16, num_experts_per_tok=3, n_group=4, topk_group=2,
                  routed_scaling_factor=2.5, moe_intermediate_size=8, n_shared_experts=1, num_hidden_layers=2,
                  first_k_dense_replace=0)
    cfg = (DeepseekV3Config(**common, norm_topk_prob=True) if v3
           else DeepseekV2Config(**common, topk_method="group_limited_greedy"))
    theirs = DeepseekV3TopkRouter(cfg) if v3 else DeepseekV2TopkRouter(cfg)
    ours = DeepseekMoeBlock(cfg, ModelShape.of(cfg), SingleRankGroup(), v3)
    with torch.no_grad():
        theirs.weight.normal_(0, 0.5)
        ours.gate.weight.copy_(theirs.weight)
        if v3:
            theirs.e_score_correction_bias.uniform_(-0.3, 0.3)
            ours.gate.e_score_correction_bias.copy_(theirs.e_score_correction_bias)
    x = torch.randn(64, 32)
    _, their_weights, their_ids = theirs(x)
    weights, ids = ours.route(x)
    order, their_order = ids.argsort(dim=-1), their_ids.argsort(dim=-1)
    assert torch.equal(ids.gather(1, order), their_ids.gather(1, their_order))
    torch.testing.assert_close(weights.gather(1, order), their_weights.gather(1, their_order), rtol=0, atol=0)


@pytest.mark.parametrize("variant", ["v3_plain_q_proj_rotate_half", "v2_group_limited"])
def test_variants_match_transformers(tmp_path, variant):
    torch.set_num_threads(1)
    model_dir = (make_deepseek_v3(tmp_path, q_lora=False, interleave=False) if variant.startswith("v3")
                 else make_deepseek_v2(tmp_path))
    prompts = mixed_prompts(8, 1, 300)
    expected = hf_greedy(model_dir, prompts, MAX_NEW)
    assert generate(runners_for(model_dir), prompts, MAX_NEW, chunk=64) == expected
    runners = runners_for(model_dir, pp=3, pp_layer_partition="1.5,1,1.5")
    assert generate(runners, prompts, MAX_NEW, chunk=100, admit_per_step=4) == expected


def test_fp8_latent_cache_agrees_with_the_fp32_one_on_most_tokens(deepseek_v3_dir):
    """The latent entries stored as e4m3 bytes (one scale), widened as they are read; teacher-forced
    top-1 against transformers fp32. Measured 0.635: the tiny DeepSeek is sensitive (transformers'
    own bf16 agrees with its fp32 on 0.823; the tiny Llama's fp8 cache: 0.807)."""
    prompts = mixed_prompts(12, hi=160, seed=7)
    forced = hf_greedy(deepseek_v3_dir, prompts, 16)
    ours = forced_logits(runners_for(deepseek_v3_dir, kv_cache_dtype="fp8"), prompts, forced, chunk=48)
    assert top1_agreement(ours, hf_forced_logits(deepseek_v3_dir, prompts, forced, torch.float32)) >= 0.6
