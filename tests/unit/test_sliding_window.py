"""Sliding windows: the positions each query attends to, against transformers' own mask
function, for prefills (fresh and chunked, reading the cache) and decodes (what the two
embedding_bag passes read); which layers are windowed; what is refused, naming the field."""
from __future__ import annotations

import json

import pytest
import torch

from asyncpp.config import EngineArgs, create_engine_config
from asyncpp.core.microbatch import SeqWork
from asyncpp.core.stages import StageSpec
from asyncpp.model import kernels
from asyncpp.model.attention import PagedAttention, allocate_kv_cache
from asyncpp.model.attention_metadata import HeadLayout, KernelDecode, build_metadata
from asyncpp.model.registry import check_supported
from asyncpp.model.sliding_window import layer_windows, stage_windows

BS = 16
LAYOUT = dict(num_heads=4, num_kv_heads=2, head_dim=8, block_size=BS)


def hf_mask(query_start: int, context: int, window: int) -> torch.Tensor:
    """transformers' sliding-window causal mask: [queries, keys], True = attend."""
    from transformers.masking_utils import sdpa_mask, sliding_window_causal_mask_function

    mask = sdpa_mask(1, q_length=context - query_start, kv_length=context, q_offset=query_start,
                     mask_function=sliding_window_causal_mask_function(window), allow_is_causal_skip=False)
    return mask[0, 0]


def table_for(context: int) -> list[int]:
    """A block table whose blocks are not in order (block i of the sequence is 3i + 7 mod 97)."""
    return [(3 * i + 7) % 97 for i in range(-(-context // BS))]


@pytest.mark.parametrize("window", [1, 5, 16, 32, 40])
@pytest.mark.parametrize("start,length", [(0, 3), (0, 33), (0, 100), (5, 30), (31, 2), (32, 9), (40, 41), (100, 17)])
def test_prefill_masks_match_transformers(window, start, length):
    context = start + length
    seq = SeqWork(0, [7] * length, start, table_for(context), None)
    meta = build_metadata([seq], HeadLayout(**LAYOUT, windows=(window,)), "cpu")
    [p] = meta.windows[window][0]
    ours = torch.zeros(length, context, dtype=torch.bool)
    if p.mask is None:  # plain causal: only where no query reaches past its window
        assert context <= window and start == 0
        ours[:] = torch.ones(length, length, dtype=torch.bool).tril()
    else:
        ours[:, p.kv_start:] = p.mask
    assert torch.equal(ours, hf_mask(start, context, window))
    if p.context_blocks is not None:  # the cache is read from the block holding the first key needed
        assert p.kv_start % BS == 0 and p.kv_start <= max(0, start - window + 1) < p.kv_start + BS
        assert p.context_blocks.tolist() == table_for(context)[p.kv_start // BS:]
    full = meta.prefills[0]
    assert (p is full) == (context <= window)  # a context the window cannot cut shares the full view


def decode_reads(meta, window: int | None, row: int, head: int, table: list[int]) -> list[int]:
    """The positions whose V rows the decode of sequence `row` reads for query head `head`,
    checked against its probability columns and the pad mask."""
    _, d = meta.view(window)
    heads, kv_heads = LAYOUT["num_heads"], LAYOUT["num_kv_heads"]
    bag = row * heads + head
    ends = d.value_offsets.tolist() + [len(d.value_index)]
    rows = d.value_index[ends[bag]:ends[bag + 1]]
    assert (rows % kv_heads == head // (heads // kv_heads)).all()
    slots = (rows // kv_heads).tolist()
    columns = d.prob_index[ends[bag]:ends[bag + 1]] - bag * d.padded_len
    assert not d.pad_mask[row, 0, columns].any() and int((~d.pad_mask[row, 0]).sum()) == len(slots)
    return [table.index(s // BS) * BS + s % BS for s in slots]


@pytest.mark.parametrize("window", [1, 5, 16, 32, 40])
def test_decode_reads_match_transformers(window):
    contexts = [1, 5, 16, 17, 31, 32, 33, 40, 41, 47, 48, 49, 64, 100, 257]
    seqs = [SeqWork(i, [7], c - 1, table_for(c), None) for i, c in enumerate(contexts)]
    meta = build_metadata(seqs, HeadLayout(**LAYOUT, windows=(window,)), "cpu")
    _, d = meta.view(window)
    for i, c in enumerate(contexts):
        expected = hf_mask(c - 1, c, window)[0].nonzero().flatten().tolist()
        for head in (0, 3):
            assert decode_reads(meta, window, i, head, table_for(c)) == expected
            assert decode_reads(meta, None, i, head, table_for(c)) == list(range(c))
    # Blocks wholly before the window are not read: the longest sequence's window spans few blocks.
    assert d.padded_len <= (-(-window // BS) + 1) * BS < meta.decode.padded_len


def test_one_metadata_per_distinct_window_and_shared_when_short():
    seqs = [SeqWork(0, [7], 20, table_for(21), None), SeqWork(1, [7] * 30, 0, table_for(30), None)]
    meta = build_metadata(seqs, HeadLayout(**LAYOUT, windows=(32, 64)), "cpu")
    assert set(meta.windows) == {32, 64}
    for window in (32, 64):  # no context reaches past either window: the full view, not a copy
        prefills, decode = meta.view(window)
        assert decode is meta.decode and prefills[0] is meta.prefills[0]
    with pytest.raises(KeyError):
        meta.view(16)  # a window the layout did not declare is a bug, never full attention


def _config(model_type: str, **fields):
    from transformers import AutoConfig

    return AutoConfig.for_model(model_type, num_hidden_layers=4, **fields)


def test_which_layers_are_windowed():
    assert layer_windows(_config("mistral", sliding_window=40)) == [40] * 4
    assert layer_windows(_config("mistral", sliding_window=40), max_model_len=40) == [None] * 4  # cannot matter
    assert layer_windows(_config("mistral", sliding_window=None)) == [None] * 4
    assert layer_windows(_config("llama")) == [None] * 4
    qwen2 = _config("qwen2", use_sliding_window=True, sliding_window=40, max_window_layers=2)
    assert layer_windows(qwen2) == [None, None, 40, 40]
    assert layer_windows(_config("qwen2", use_sliding_window=False, sliding_window=40)) == [None] * 4
    gemma3 = _config("gemma3_text", sliding_window=32, sliding_window_pattern=3)
    assert layer_windows(gemma3) == [32, 32, None, 32]
    assert layer_windows(_config("gemma2", sliding_window=32)) == [32, None, 32, None]
    split = StageSpec(1, 2, 0, 1, 2, 4, mlp_only_first=True)  # layer 2's MLP, layer 3
    assert stage_windows(gemma3, split, 1024) == (32,)
    assert stage_windows(gemma3, StageSpec(0, 2, 0, 1, 2, 3), 1024) == ()


def gemma3_config(**fields):
    base = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_attention_heads=2, num_key_value_heads=1,
                head_dim=16, sliding_window=8, sliding_window_pattern=2, architectures=["Gemma3ForCausalLM"])
    return _config("gemma3_text", **{**base, **fields})


@pytest.mark.parametrize("fields,message", [
    (dict(layer_types=["sliding_attention", "chunked_attention", "full_attention", "full_attention"]),
     "layer_types ['chunked_attention']"),
    (dict(rope_scaling={"rope_type": "dynamic", "factor": 2.0}),
     "rope_parameters['full_attention'] rope_type 'dynamic'"),
    (dict(use_bidirectional_attention=True), "use_bidirectional_attention"),
    (dict(hidden_activation="swish_glu"), "hidden_activation 'swish_glu'"),
])
def test_unsupported_gemma3_variants_are_refused_naming_the_field(fields, message):
    check_supported(gemma3_config())
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(")):
        check_supported(gemma3_config(**fields))


def test_refused_before_any_stage_starts(tmp_path):
    """create_engine_config reads the config alone (no weights here) and refuses it."""
    config = gemma3_config(layer_types=["sliding_attention", "chunked_attention", "full_attention", "full_attention"])
    config.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="layer_types"):
        create_engine_config(EngineArgs(model=str(tmp_path), skip_tokenizer_init=True, device="cpu"))


def test_multimodal_gemma3_is_refused_by_name(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gemma3",
                                                      "architectures": ["Gemma3ForConditionalGeneration"]}))
    with pytest.raises(ValueError, match="Gemma3ForConditionalGeneration: .*Gemma3ForCausalLM"):
        create_engine_config(EngineArgs(model=str(tmp_path), skip_tokenizer_init=True, device="cpu"))


@pytest.mark.skipif(not kernels.available(), reason="compiled kernels not built")
@pytest.mark.parametrize("softcap", [None, 5.0])
def test_windowed_decode_kernel_matches_the_torch_path(softcap):
    """The compiled kernel takes each sequence's first position in the window (and the cap);
    the torch path reads the blocks from there: the same attention."""
    torch.manual_seed(0)
    heads, kv_heads, head_dim, window = 4, 2, 16, 40
    contexts = [1, 16, 39, 40, 41, 57, 100, 300]
    seqs = [SeqWork(i, [7], c - 1, table_for(c), None) for i, c in enumerate(contexts)]
    cache = allocate_kv_cache(1, 97, BS, kv_heads, head_dim, torch.float32, "cpu")[0]
    for t in cache:
        t.copy_(torch.randn(t.shape) * 3)
    q = torch.randn(len(seqs), heads, head_dim) * 3
    attention = PagedAttention(heads, kv_heads, head_dim, head_dim ** -0.5, window, softcap)
    outs = []
    for kernel in (False, True):
        layout = HeadLayout(heads, kv_heads, head_dim, BS, decode_kernel=kernel, windows=(window,))
        _, decode = build_metadata(seqs, layout, "cpu").view(window)
        assert isinstance(decode, KernelDecode) == kernel
        outs.append(attention._decode(q, cache, decode, None))
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)
