"""The loader reads only what a rank owns; the registry names what it cannot build."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from asyncpp.model import loader
from asyncpp.model.registry import check_supported
from asyncpp.model.rotary import rope_parameters
from asyncpp.worker.model_runner import ModelRunner
from helpers.driver import GlooGroup, engine_config


class ReadLog:
    """Wraps safe_open so every tensor (slice) read is recorded."""

    def __init__(self, monkeypatch):
        self.names: set[str] = set()
        log = self

        class Recording:
            def __init__(self, *args, **kwargs):
                self.inner = safe_open(*args, **kwargs)

            def __enter__(self):
                self.handle = self.inner.__enter__()
                return self

            def __exit__(self, *exc):
                return self.inner.__exit__(*exc)

            def keys(self):
                return self.handle.keys()

            def get_slice(self, name):
                log.names.add(name)
                return self.handle.get_slice(name)

        monkeypatch.setattr(loader, "safe_open", Recording)


def _all_names(model_dir) -> set[str]:
    with safe_open(next(model_dir.glob("*.safetensors")), framework="pt") as f:
        return set(f.keys())


def test_each_stage_reads_only_its_tensors(llama_dir, monkeypatch):
    config = engine_config(llama_dir, pipeline_parallel_size=2)
    reads = []
    for stage in config.stages:
        log = ReadLog(monkeypatch)
        ModelRunner(config, stage)
        reads.append(log.names)
    assert reads[0] == {n for n in _all_names(llama_dir)
                        if n == "model.embed_tokens.weight" or n.startswith(("model.layers.0.", "model.layers.1."))}
    assert reads[1] == {n for n in _all_names(llama_dir)
                        if n in ("model.norm.weight", "lm_head.weight")
                        or n.startswith(("model.layers.2.", "model.layers.3."))}


def test_tied_head_on_last_stage_reads_the_embedding(qwen2_dir, monkeypatch):
    config = engine_config(qwen2_dir, pipeline_parallel_size=2)
    log = ReadLog(monkeypatch)
    runner = ModelRunner(config, config.stages[1])
    assert "model.embed_tokens.weight" in log.names
    with safe_open(next(qwen2_dir.glob("*.safetensors")), framework="pt") as f:
        head = runner.model.lm_head.weight
        assert torch.equal(head.to_dense() if head.is_mkldnn else head, f.get_tensor("model.embed_tokens.weight"))


def test_tensor_parallel_slices(llama_dir):
    """Rank 1 of 2 holds the second half of each split dimension, read as slices."""
    config = engine_config(llama_dir, tensor_parallel_size=2, distributed_executor_backend="mp")
    runner = ModelRunner(config, config.stages[1], GlooGroup(1, 2))
    model = runner.model
    dense = lambda t: t.to_dense() if t.is_mkldnn else t  # noqa: E731  (CPU weights may be prepacked)
    tensors = load_file(next(llama_dir.glob("*.safetensors")))
    q, k, v = (tensors[f"model.layers.0.self_attn.{n}_proj.weight"] for n in "qkv")
    qkv = dense(model.layers[0].self_attn.qkv_proj.weight)
    assert torch.equal(qkv, torch.cat([q[q.shape[0] // 2:], k[k.shape[0] // 2:], v[v.shape[0] // 2:]]))
    down = tensors["model.layers.0.mlp.down_proj.weight"]
    assert torch.equal(dense(model.layers[0].mlp.down_proj.weight), down[:, down.shape[1] // 2:])
    embed = tensors["model.embed_tokens.weight"]
    assert torch.equal(model.embed_tokens.weight, embed[embed.shape[0] // 2:])


def test_unsupported_architecture_is_named():
    cfg = SimpleNamespace(architectures=["BertForMaskedLM"], model_type="bert")
    with pytest.raises(ValueError, match="BertForMaskedLM"):
        check_supported(cfg, 1024)


def test_dynamic_rope_is_refused():
    cfg = SimpleNamespace(architectures=["LlamaForCausalLM"], rope_parameters={"rope_type": "dynamic",
                                                                              "rope_theta": 1e4, "factor": 2.0})
    with pytest.raises(ValueError, match="dynamic"):
        check_supported(cfg, 1024)


def test_rope_theta_from_either_config_layout():
    old = SimpleNamespace(rope_theta=500000.0, rope_scaling=None)
    new = SimpleNamespace(rope_parameters={"rope_type": "default", "rope_theta": 100000.0})
    assert rope_parameters(old) == {"rope_theta": 500000.0, "rope_type": "default"}
    assert rope_parameters(new)["rope_theta"] == 100000.0

