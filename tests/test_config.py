"""ModelConfig: presets equal from_hf of the real configs; strict building; clear errors."""

import json
from pathlib import Path

import pytest

from mathgrpo.config import ConfigError, ModelConfig, apply_overrides, from_dict, load_model_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "models"

# The fields of the real config.json files on the Hugging Face hub (Qwen/Qwen3-*-Base; 4B values also
# in recipe_spec §5.1). Fields that do not affect a dense Qwen3 (dtype, use_cache, ...) are omitted.
_COMMON = dict(
    architectures=["Qwen3ForCausalLM"], model_type="qwen3", vocab_size=151936, head_dim=128,
    num_key_value_heads=8, hidden_act="silu", rope_theta=1000000, rope_scaling=None, rms_norm_eps=1e-06,
    max_position_embeddings=32768, initializer_range=0.02, attention_bias=False, attention_dropout=0.0,
    use_sliding_window=False, sliding_window=None, bos_token_id=151643, eos_token_id=151643,
    torch_dtype="bfloat16",
)
REAL_HF_CONFIGS = {
    "qwen3_0p6b_base": dict(_COMMON, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                            num_attention_heads=16, tie_word_embeddings=True, max_window_layers=28),
    "qwen3_1p7b_base": dict(_COMMON, hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                            num_attention_heads=16, tie_word_embeddings=True, max_window_layers=28),
    "qwen3_4b_base": dict(_COMMON, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                          num_attention_heads=32, tie_word_embeddings=True, max_window_layers=36),
    "qwen3_8b_base": dict(_COMMON, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                          num_attention_heads=32, tie_word_embeddings=False, max_window_layers=36),
}


@pytest.mark.parametrize("name", sorted(REAL_HF_CONFIGS))
def test_preset_equals_from_hf_of_the_real_config(name):
    assert load_model_config(CONFIGS / f"{name}.yaml") == ModelConfig.from_hf(REAL_HF_CONFIGS[name])


def test_from_hf_reads_transformers5_rope_parameters_and_files(tmp_path):
    hf = dict(REAL_HF_CONFIGS["qwen3_4b_base"])
    del hf["rope_theta"]
    hf["rope_parameters"] = {"rope_theta": 5000000.0, "rope_type": "default"}
    (tmp_path / "config.json").write_text(json.dumps(hf))
    config = ModelConfig.from_hf(tmp_path)
    assert config.rope_theta == 5000000.0
    assert ModelConfig.from_hf(tmp_path / "config.json") == config


def test_to_hf_round_trips():
    config = ModelConfig.from_hf(REAL_HF_CONFIGS["qwen3_8b_base"])
    assert ModelConfig.from_hf(config.to_hf()) == config


@pytest.mark.parametrize("change, message", [
    (dict(model_type="llama", architectures=["LlamaForCausalLM"]), "not a dense Qwen3"),
    (dict(model_type="qwen3_moe", architectures=["Qwen3MoeForCausalLM"]), "not a dense Qwen3"),
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(attention_bias=True), "attention_bias"),
    (dict(use_sliding_window=True), "use_sliding_window"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "rope scaling"),
    (dict(num_key_value_heads=3), "multiple of"),
])
def test_from_hf_rejects_what_is_not_dense_qwen3(change, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_hf(dict(REAL_HF_CONFIGS["qwen3_4b_base"], **change))


def test_from_hf_names_missing_keys():
    hf = dict(REAL_HF_CONFIGS["qwen3_4b_base"])
    del hf["hidden_size"]
    with pytest.raises(ConfigError, match="hidden_size"):
        ModelConfig.from_hf(hf)


def test_strict_building_names_the_key():
    base = load_model_config(CONFIGS / "qwen3_4b_base.yaml").architecture()
    with pytest.raises(ConfigError, match=r"model\.hidden_sise"):
        from_dict(ModelConfig, dict(base, hidden_sise=3), prefix="model.")
    with pytest.raises(ConfigError, match=r"model\.hidden_size: expected an integer"):
        from_dict(ModelConfig, dict(base, hidden_size="big"), prefix="model.")
    with pytest.raises(ConfigError, match=r"model\.tie_word_embeddings: expected true or false"):
        from_dict(ModelConfig, dict(base, tie_word_embeddings=1), prefix="model.")
    with pytest.raises(ConfigError, match="model.attention"):
        from_dict(ModelConfig, dict(base, attention="flash9"), prefix="model.")


def test_overrides_parse_values_as_yaml():
    config = load_model_config(CONFIGS / "qwen3_0p6b_base.yaml",
                               ("attention=blockwise", "scan_layers=false", "rope_theta=1e4"))
    assert (config.attention, config.scan_layers, config.rope_theta) == ("blockwise", False, 10000.0)
    assert apply_overrides({"a": {"b": 1}}, ["a.c=[1, 2]"]) == {"a": {"b": 1, "c": [1, 2]}}
    with pytest.raises(ConfigError, match="key.path=value"):
        apply_overrides({}, ["nonsense"])
