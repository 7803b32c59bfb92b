"""A family's variant asyncpp does not build is refused while the engine config is resolved
(before any stage starts), naming the config field."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from asyncpp.engine_args import EngineArgs, create_engine_config
from asyncpp.model.registry import check_supported
from helpers.models import make_phi3


def test_longrope_past_the_original_context_is_refused_before_stages(tmp_path):
    model_dir = make_phi3(tmp_path, longrope=True, partial_rotary_factor=0.75)
    args = dict(model=str(model_dir), skip_tokenizer_init=True, device="cpu", pipeline_parallel_size=2)
    with pytest.raises(ValueError, match=r"original_max_position_embeddings \(512\).*max_model_len <= 512"):
        create_engine_config(EngineArgs(**args))  # the model's own 1024 positions
    assert create_engine_config(EngineArgs(**args, max_model_len=512)).max_model_len == 512


@pytest.mark.parametrize("arch, fields, named", [
    ("Phi3ForCausalLM", {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4}}, "rope_parameters.rope_type"),
    ("Qwen3MoeForCausalLM", {"rope_parameters": {"rope_type": "dynamic", "rope_theta": 1e4}}, "'dynamic'"),
    ("MixtralForCausalLM", {"rope_parameters": {"rope_type": "default", "rope_theta": 1e4,
                                                "partial_rotary_factor": 0.5}}, "partial_rotary_factor"),
    ("Qwen3ForCausalLM", {"hidden_act": "gelu"}, "hidden_act 'gelu'"),
])
def test_unbuilt_variants_name_the_field(arch, fields, named):
    with pytest.raises(ValueError, match=named) as info:
        check_supported(SimpleNamespace(architectures=[arch], **fields))
    assert arch in str(info.value)
