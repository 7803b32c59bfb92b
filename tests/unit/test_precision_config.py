"""dtype="auto" follows the checkpoint as vLLM does on CPU, and the 8-bit choices are
validated with the flag's name."""
from __future__ import annotations

import json

import pytest
import torch

from asyncpp.engine_args import EngineArgs
from helpers.driver import engine_config
from helpers.models import make_llama


def _with_checkpoint_dtype(model_dir, dtype: str):
    config = json.loads((model_dir / "config.json").read_text())
    config.pop("torch_dtype", None)
    config["dtype"] = dtype
    (model_dir / "config.json").write_text(json.dumps(config))
    return model_dir


@pytest.mark.parametrize(("checkpoint", "expected"), [
    ("float32", torch.float32), ("bfloat16", torch.bfloat16), ("float16", torch.bfloat16)])
def test_auto_dtype_is_the_checkpoints_with_fp16_as_bf16_on_cpu(tmp_path, checkpoint, expected):
    model_dir = _with_checkpoint_dtype(make_llama(tmp_path / "m"), checkpoint)
    config = engine_config(model_dir, dtype="auto")
    assert config.dtype == expected
    assert config.kv_cache_dtype == expected  # kv_cache_dtype "auto": the model's


def test_fp8_kv_cache_halves_a_bf16_block(llama_dir):
    bf16 = engine_config(llama_dir, dtype="bfloat16")
    fp8 = engine_config(llama_dir, dtype="bfloat16", kv_cache_dtype="fp8")
    assert fp8.kv_cache_dtype == torch.float8_e4m3fn
    assert engine_config(llama_dir, kv_cache_dtype="fp8_e5m2").kv_cache_dtype == torch.float8_e5m2
    assert fp8.kv_bytes_per_block() * 2 == bf16.kv_bytes_per_block()


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"kv_cache_dtype": "int4"}, "kv_cache_dtype must be one of auto, fp8, fp8_e4m3, fp8_e5m2"),
    ({"quantization": "awq"}, "quantization must be one of int8"),
    ({"dtype": "float8"}, "dtype must be one of")])
def test_bad_precision_flags_name_the_flag(kwargs, message):
    with pytest.raises(ValueError, match=message):
        EngineArgs(**kwargs)
