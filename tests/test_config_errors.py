"""The model config reader (models.config_from_dict, each architecture's from_dict) on damaged
config.json files: a named error that says which key is wrong, never a TypeError or
ValueError from deep inside (tests/fuzz/fuzz_config.py searches further)."""

from __future__ import annotations

import pytest
from published_configs import DEEPSEEK_V2_LITE, MIXTRAL_8X7B

from edgemoe.errors import ModelDirectoryError, UnsupportedArchitectureError, UnsupportedConfigError
from edgemoe.models import config_from_dict


@pytest.mark.parametrize(
    "change, error, words",
    [
        ({"hidden_size": "4096"}, ModelDirectoryError, "'hidden_size' is '4096'"),
        ({"num_hidden_layers": True}, ModelDirectoryError, "'num_hidden_layers'"),
        ({"num_attention_heads": 0}, ModelDirectoryError, "'num_attention_heads' is 0"),
        ({"rms_norm_eps": [1]}, ModelDirectoryError, "'rms_norm_eps'"),
        ({"rope_scaling": "yes"}, ModelDirectoryError, "rope parameters"),
        ({"rope_scaling": {"rope_type": "longrope"}}, UnsupportedConfigError, "rope type 'longrope'"),
        ({"num_experts_per_tok": 9}, ModelDirectoryError, "9 experts of 8"),
        ({"layer_types": ["full_attention"]}, ModelDirectoryError, "layer_types"),
        ({"model_type": ["mixtral"]}, UnsupportedArchitectureError, "no model_type"),
        ({"sliding_window": 1.5}, ModelDirectoryError, "'sliding_window'"),
    ],
)
def test_a_damaged_field_is_named(change, error, words):
    with pytest.raises(error) as e:
        config_from_dict({**MIXTRAL_8X7B, **change})
    assert words in str(e.value)


def test_deepseek_fields_and_an_unsupported_routing():
    assert config_from_dict(DEEPSEEK_V2_LITE).kv_lora_rank == 512
    with pytest.raises(ModelDirectoryError, match="'kv_lora_rank'"):
        config_from_dict({**DEEPSEEK_V2_LITE, "kv_lora_rank": None})
    with pytest.raises(UnsupportedConfigError, match="topk_method"):
        config_from_dict({**DEEPSEEK_V2_LITE, "topk_method": "random"})
    # an unsupported variant is still a NotImplementedError, which the size model relies on
    assert issubclass(UnsupportedConfigError, NotImplementedError)


def test_not_an_object():
    with pytest.raises(ModelDirectoryError, match="not a JSON object"):
        config_from_dict([1, 2])
