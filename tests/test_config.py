"""ModelConfig: presets equal from_hf of the real configs; strict building; clear errors."""

import json
from pathlib import Path

import pytest

from mathgrpo.config import ConfigError, ModelConfig, apply_overrides, from_dict, load_model_config
from mathgrpo.weights.hf import model_config_from_hf, model_config_to_hf
from mathgrpo.weights.policy import resolve_model_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "models"

# The fields of the real config.json files on the Hugging Face hub (Qwen/Qwen3-*-Base; 4B values also
# in docs/recipe.md §5.1). Fields that do not affect a dense Qwen3 (dtype, use_cache, ...) are omitted.
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
    assert load_model_config(CONFIGS / f"{name}.yaml") == model_config_from_hf(REAL_HF_CONFIGS[name])


def test_from_hf_reads_transformers5_rope_parameters_and_files(tmp_path):
    hf = dict(REAL_HF_CONFIGS["qwen3_4b_base"])
    del hf["rope_theta"]
    hf["rope_parameters"] = {"rope_theta": 5000000.0, "rope_type": "default"}
    (tmp_path / "config.json").write_text(json.dumps(hf))
    config = model_config_from_hf(tmp_path)
    assert config.rope_theta == 5000000.0
    assert model_config_from_hf(tmp_path / "config.json") == config


def test_to_hf_round_trips():
    config = model_config_from_hf(REAL_HF_CONFIGS["qwen3_8b_base"])
    assert model_config_from_hf(model_config_to_hf(config)) == config


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
        model_config_from_hf(dict(REAL_HF_CONFIGS["qwen3_4b_base"], **change))


def test_from_hf_names_missing_keys():
    hf = dict(REAL_HF_CONFIGS["qwen3_4b_base"])
    del hf["hidden_size"]
    with pytest.raises(ConfigError, match="hidden_size"):
        model_config_from_hf(hf)


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


# docs/recipe.md §0, the table of the recipe (thunlp/OPD grpo.sh), value for value.
RECIPE_TABLE = {
    "data.train_batch_size": 64, "rollout.n": 8,
    "grpo.micro_batch_tokens": 32768, "data.max_prompt_length": 1024, "data.max_response_length": 7168,
    "rollout.val_max_tokens": 31744, "rollout.temperature": 1.0, "rollout.top_p": 1.0, "rollout.top_k": -1,
    "rollout.val_n": 16, "rollout.val_temperature": 1.0, "rollout.val_top_p": 0.95,
    "optim.lr": 1e-6, "optim.b1": 0.9, "optim.b2": 0.999, "optim.weight_decay": 0.01, "optim.eps": 1e-8,
    "optim.clip_grad": 1.0, "optim.schedule": "constant", "optim.warmup_steps": 0,
    "grpo.clip_ratio_low": 0.2, "grpo.clip_ratio_high": 0.2, "grpo.clip_ratio_c": 3.0, "grpo.entropy_coeff": 0.0,
    "grpo.use_kl_loss": False, "grpo.loss_agg_mode": "token-mean", "grpo.norm_adv_by_std": True,
    "grpo.adv_eps": 1e-6, "grpo.rollout_is": "token", "grpo.rollout_is_threshold": 2.0,
    "data.shuffle": False, "data.filter_overlong_prompts": True, "data.enable_thinking": False,
    "trainer.total_epochs": 1, "trainer.save_freq": 20, "trainer.test_freq": 20, "trainer.val_before_train": False,
    "rollout.engine": "vllm", "rollout.stop_token_ids": (151643,), "model.param_dtype": "float32",
    "model.remat_policy": "full_offload",  # gradient checkpointing + activation offload (docs/recipe.md §0)
}


def test_recipe_config_matches_the_recipe_table():
    from mathgrpo.config import load_config

    config = load_config(CONFIGS.parent / "qwen3_4b_base_grpo.yaml")
    for key, expected in RECIPE_TABLE.items():
        section, name = key.split(".")
        assert getattr(getattr(config, section), name) == expected, key
    assert config.mesh.resolve(8) == {"data": 1, "fsdp": 8, "tensor": 1}  # 1 node × 8 GPUs, FSDP
    assert [p.rsplit("/", 1)[-1] for p in config.data.val_files] == ["aime25.parquet", "amc23.parquet",
                                                                     "aime24.parquet"]
    assert resolve_model_config(config.model) == load_model_config(CONFIGS / "qwen3_4b_base.yaml").replace(
        **config.model.runtime())


@pytest.mark.parametrize("override, message", [
    ("grpo.group_size=4", "unknown key"),  # the group size is rollout.n, stored once
    ("grpo.temperature=0.7", "unknown key"),  # the training temperature is rollout.temperature
    ("rollout.temperature=0", "rollout.temperature must be > 0"),
    ("grpo.micro_batch_tokens=4096", "below the longest sequence"),
    ("trainer.save_frq=3", "trainer.save_frq"),
    ("optim.lr=fast", "optim.lr: expected a number"),
])
def test_recipe_config_rejects_inconsistent_overrides(override, message):
    from mathgrpo.config import load_config

    with pytest.raises(ConfigError, match=message):
        load_config(CONFIGS.parent / "qwen3_4b_base_grpo.yaml", [override])


def test_mesh_can_name_a_sharding_config_file():
    from mathgrpo.config import load_config

    recipe = CONFIGS.parent / "qwen3_4b_base_grpo.yaml"
    mesh_file = CONFIGS.parent / "mesh" / "fsdp4_tp2.yaml"
    config = load_config(recipe, [f"mesh={mesh_file}"])
    assert (config.mesh.data, config.mesh.fsdp, config.mesh.tensor) == (1, 4, 2)
    with pytest.raises(ConfigError, match="no such sharding config"):
        load_config(recipe, ["mesh=configs/mesh/nope.yaml"])


def test_trainer_logger_names_verl_sinks():
    from mathgrpo.config import TrainerConfig, load_config
    from mathgrpo.tracking import sinks

    assert sinks.SINKS == ("console", "jsonl", "tensorboard", "wandb") and TrainerConfig().logger == sinks.DEFAULT_SINKS
    recipe = load_config(CONFIGS.parent / "qwen3_4b_base_grpo.yaml")
    assert recipe.trainer.logger == ("console", "jsonl", "tensorboard")  # a YAML list loads as a tuple
    assert recipe.trainer.project_name == "OnPolicyDistillation"  # grpo.sh: trainer.project_name=$PROJECT_NAME
    assert recipe.trainer.experiment_name.startswith("grpo_DAPO-Math-17k-Processed_Qwen3-4B-Base_")
    assert load_config(CONFIGS.parent / "demo_cpu.yaml").trainer.logger == ("console", "jsonl", "tensorboard")
    # verl's own override syntax.
    config = load_config(CONFIGS.parent / "demo_cpu.yaml", ["trainer.logger=['console','wandb']",
                                                           "trainer.experiment_name=try2"])
    assert (config.trainer.logger, config.trainer.experiment_name) == (("console", "wandb"), "try2")
    assert load_config(CONFIGS.parent / "demo_cpu.yaml", ["trainer.logger=[]"]).trainer.logger == ()


@pytest.mark.parametrize("override, message", [
    ("trainer.logger=[console,swanlab]",
     r"trainer\.logger\[1\]: 'swanlab' is not one of \['console', 'jsonl', 'tensorboard', 'wandb'\]"),
    ("trainer.logger=[jsonl,console,jsonl]", "names a logger twice"),
    ("trainer.logger=console", r"trainer\.logger: expected a list"),
    ("trainer.logger=[console,3]", r"trainer\.logger\[1\]: 3 is not one of"),
    ("trainer.project_name=[a]", r"trainer\.project_name: expected a string"),
])
def test_trainer_logger_rejects_unknown_names(override, message):
    from mathgrpo.config import TrainerConfig, load_config

    with pytest.raises(ConfigError, match=message):
        load_config(CONFIGS.parent / "demo_cpu.yaml", [override])
    with pytest.raises(ConfigError, match="'mlflow' is not one of"):
        TrainerConfig(logger=("mlflow",))


def test_opd_recipe_config_is_the_forks_script():
    """configs/qwen3_1p7b_base_opd.yaml against thunlp/OPD's on_policy_distillation.sh (docs/recipe.md §1.5)."""
    from mathgrpo.config import load_config

    config = load_config(CONFIGS.parent / "qwen3_1p7b_base_opd.yaml")
    distill = config.distill
    assert config.algorithm == "opd"
    assert (distill.top_k, distill.top_k_strategy, distill.reward_weight_mode, distill.estimator) == (
        16, "only_stu", "student_p", "token_reward_direct")
    assert distill.teacher_temperature == 1.0 and distill.grpo_outcome_weight == 1.0
    assert distill.teacher.path == "model/Qwen3-4B-Base-GRPO" and config.model.path == "model/Qwen3-1.7B-Base"
    assert resolve_model_config(config.model) == load_model_config(CONFIGS / "qwen3_1p7b_base.yaml").replace(
        **config.model.runtime())
    assert resolve_model_config(distill.teacher).vocab_size == resolve_model_config(config.model).vocab_size
    assert (config.rollout.n, config.rollout.temperature, config.rollout.val_n, config.rollout.val_temperature,
            config.rollout.val_top_p, config.rollout.val_max_tokens) == (4, 1.0, 16, 0.7, 0.95, 31744)
    assert (config.data.train_batch_size, config.data.max_prompt_length, config.data.max_response_length) == (
        64, 1024, 7168)
    assert config.data.train_files == ("data/dapo_math_17k.parquet",) and not config.data.shuffle
    assert config.optim.lr == 1e-6 and config.grpo.rollout_is is None and not config.grpo.use_kl_loss


@pytest.mark.parametrize("overrides, message", [
    (["algorithm=grpo"], "the distill section"),
    (["distill.top_k_strategy=both"], r"distill\.top_k_strategy: 'both' is not one of"),
    (["distill.reward_weight_mode=teacher"], r"distill\.reward_weight_mode: 'teacher' is not one of"),
    (["distill.sampled_kl=k2"], r"distill\.sampled_kl: 'k2' is not one of"),
    (["distill.top_k=0", "distill.top_k_strategy=union"], "needs top-k ids"),
    (["distill.top_k=-1"], "distill.top_k must be >= 0"),
    (["distill.teacher_temperature=0"], "teacher_temperature must be > 0"),
    (["algorithm=ppo"], r"algorithm: 'ppo' is not one of \['grpo', 'opd'\]"),
])
def test_opd_config_errors_name_the_key(overrides, message):
    from mathgrpo.config import load_config

    with pytest.raises(ConfigError, match=message):
        load_config(CONFIGS.parent / "qwen3_1p7b_base_opd.yaml", overrides)


def test_grpo_config_without_distill():
    from mathgrpo.config import load_config

    with pytest.raises(ConfigError, match="opd needs it"):
        load_config(CONFIGS.parent / "qwen3_4b_base_grpo.yaml", ["algorithm=opd"])
