"""`plan`: ahead-of-time compiles of the 4B recipe on 8 (fake) devices; nothing allocated."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mathgrpo.config import load_config
from mathgrpo.rollout import base
from mathgrpo.tools import plan

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = os.path.join(ROOT, "configs", "qwen3_4b_base_grpo.yaml")
OPD_RECIPE = os.path.join(ROOT, "configs", "qwen3_1p7b_base_opd.yaml")
GIB = 2**30


@pytest.mark.slow
def test_plan_cli_on_the_recipe():
    # The JAX sampler's weights as training shards them: XLA:CPU upcasts a bf16 weight to fp32 for its
    # dot, and with a replicated per-layer copy it holds every layer's fp32 copy at once (a 15.7 GB
    # temporary for the 4B burst; BENCHMARKS.md, session 16). XLA:GPU does not: the replicated copy is
    # planned for described H100s below.
    result = subprocess.run([sys.executable, "-m", "mathgrpo", "plan", "--config", RECIPE,
                             "rollout.sampler_weights=sharded"], cwd=ROOT,
                            capture_output=True, text=True,
                            env={k: v for k, v in os.environ.items() if k != "XLA_FLAGS"})
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["devices"] == 8 and report["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
    assert report["params"] == 4_022_468_096
    # fp32 params sharded 8 ways: 4,022,468,096 · 4 B / 8 ≈ 1.87 GiB; Adam moments twice that.
    assert abs(report["param_bytes_per_device"] - 4_022_468_096 * 4 / 8) < 0.01 * GIB
    assert abs(report["optimizer_bytes_per_device"] - 2 * 4_022_468_096 * 4 / 8) < 0.01 * GIB
    assert report["per_device_peak_bytes"] == report["train_step"]["peak_bytes"]
    assert report["per_device_peak_bytes"] > report["param_bytes_per_device"] + report["optimizer_bytes_per_device"]
    assert report["fits"] is True
    assert "train_step" in result.stdout and "fits: True" in result.stdout
    # The JAX sampler's pool, chosen for the JAX share: the training rollout (n = 8, 7,168 new tokens)
    # and validation (n = 16, 31,744) with one max_slots, each beside the resident train state.
    sampler = report["sampler"]
    assert sampler["chosen"] and sampler["fits"]
    assert (sampler["train"]["n"], sampler["train"]["max_tokens"], sampler["train"]["cache_length"]) == (8, 7168, 8192)
    assert (sampler["validation"]["n"], sampler["validation"]["max_tokens"]) == (16, 31744)
    assert sampler["least_slots"] == 2  # a prompt's 16 validation samples start together on 8 devices
    assert sampler["max_slots"] >= 2
    # The sampler's own copy: bf16 (the compute dtype), in training's fsdp8 shards; the q and k norms'
    # head_dim scales (36 layers × 2 × 128) are not sharded.
    assert sampler["weights"] == "sharded" and sampler["weight_dtype"] == "bfloat16"
    head_norms = 36 * 2 * 128
    assert sampler["weight_bytes_per_device"] == 2 * ((4_022_468_096 - head_norms) // 8 + head_norms)
    kv_per_token = 2 * 36 * 8 * 128 * 2  # k and v · layers · kv heads · head dim · bf16
    for call, length in (("train", 8192), ("validation", 32768)):
        pool = sampler[call]
        assert pool["pool_rows"] == 8 * sampler["max_slots"]
        assert pool["pool_kv_bytes_per_device"] == sampler["max_slots"] * length * kv_per_token
        assert pool["burst"]["argument_bytes"] > pool["pool_kv_bytes_per_device"] + sampler["weight_bytes_per_device"]
        assert pool["rollout_peak_bytes"] == sampler["resident_train_state_bytes"] + pool["peak_bytes"]
        assert pool["rollout_peak_bytes"] <= report["jax_memory_budget_bytes"]
    # The admission updates the pool in place: no second copy of it in its temporaries.
    assert sampler["validation"]["admit"]["temp_bytes"] < sampler["validation"]["pool_kv_bytes_per_device"]
    assert "JAX sampler: max_slots" in result.stdout and "chosen for the device memory" in result.stdout


def test_plan_sampler_chooses_the_most_rows_that_fit_and_checks_a_given_max_slots():
    """On one CPU device with a tiny model: a budget that holds the pool at 5 rows (and the train state)
    gets 5 rows chosen; a configured max_slots is compiled as given and reported as over the budget."""
    import jax

    from mathgrpo.config import GRPOConfig, MeshConfig, ModelConfig, OptimConfig
    from mathgrpo.parallel import mesh as parallel_mesh
    from mathgrpo.rollout import jax_sampler

    model = ModelConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=2, num_key_value_heads=1, head_dim=32, param_dtype="float32",
                        compute_dtype="float32")
    mesh_config = MeshConfig(data=1, fsdp=1, tensor=1)
    mesh = parallel_mesh.make_mesh(mesh_config, jax.devices()[:1])
    rules = parallel_mesh.logical_rules(mesh_config)
    inputs = plan.PlanInputs(model=model, mesh=mesh_config, grpo=GRPOConfig(), optim=OptimConfig(),
                             max_prompt_length=64, max_response_length=192, n=2, val_n=4, val_max_tokens=448)
    resident = 1_000_000
    held = jax_sampler.abstract_held_params(model, mesh, rules, inputs.sampler_weights)
    at_five = {call: plan._pool_memory(inputs, mesh, rules, held, 5, sampling)["peak_bytes"]
               for call, sampling in (("train", base.SamplingParams(n=2, max_tokens=192)),
                                      ("validation", base.SamplingParams(n=4, top_p=0.95, max_tokens=448)))}
    budget = resident + max(at_five.values()) + 1
    chosen = plan.plan_sampler(inputs, mesh, rules, resident=resident, budget=budget)
    assert chosen["chosen"] and chosen["least_slots"] == 4 and chosen["max_slots"] == 5 and chosen["fits"]
    assert chosen["validation"]["peak_bytes"] == at_five["validation"]
    given = plan.plan_sampler(dataclasses.replace(inputs, max_slots=9), mesh, rules, resident=resident,
                              budget=budget)
    assert not given["chosen"] and given["max_slots"] == 9 and not given["validation"]["fits"]


def test_opd_config_plans_with_its_teacher():
    """`inputs_from_config` of the OPD recipe carries the 4B teacher (bf16, its cuDNN attention planned as
    blockwise on CPU devices) and the distill section; a GRPO config has neither."""
    inputs = plan.inputs_from_config(load_config(OPD_RECIPE), platform="cpu")
    assert inputs.teacher.num_hidden_layers == 36 and inputs.teacher.hidden_size == 2560
    assert inputs.teacher.param_dtype == "bfloat16" and inputs.teacher.attention == "blockwise"
    assert inputs.model.num_hidden_layers == 28 and inputs.model.param_dtype == "float32"
    assert inputs.distill.top_k == 16 and inputs.distill.top_k_strategy == "only_stu" and inputs.n == 4
    grpo = plan.inputs_from_config(load_config(RECIPE), platform="cpu")
    assert grpo.teacher is None and grpo.distill is None


def _tiny_opd_inputs(**overrides):
    """A tiny fp32 student (AdamW) and a bigger bf16 teacher on fsdp=2, top-16 only_stu: PlanInputs."""
    from mathgrpo.config import DistillConfig, GRPOConfig, MeshConfig, ModelConfig, ModelSource, OptimConfig

    shapes = dict(vocab_size=256, num_attention_heads=2, num_key_value_heads=1, head_dim=32, compute_dtype="float32")
    student = ModelConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, param_dtype="float32", **shapes)
    teacher = ModelConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=3, param_dtype="bfloat16",
                          remat_policy="none", **shapes)
    distill = DistillConfig(teacher=ModelSource(path="unused"), top_k=16, top_k_strategy="only_stu")
    inputs = plan.PlanInputs(model=student, mesh=MeshConfig(data=1, fsdp=2, tensor=1),
                             grpo=GRPOConfig(micro_batch_tokens=256, logprob_chunk_size=64, logprob_vocab_block=128),
                             optim=OptimConfig(), max_prompt_length=32, max_response_length=96, sequences_per_step=8,
                             n=2, val_n=4, val_max_tokens=224, max_slots=2, device_memory_gib=1.0,
                             vllm_memory_utilization=0.5, teacher=teacher, distill=distill)
    return dataclasses.replace(inputs, **overrides)


def test_opd_plan_holds_the_teacher_in_every_phase():
    """OPD on 2 fake CPU devices: the report has the teacher, the scoring pass and the OPD step (on a batch
    with [M, R, L, K'] top-k fields); the teacher's resident bytes are its params' bf16 bytes over the 2
    shards; each phase's total is its program's peak plus what stays resident beside it, and `fits` is
    their comparison with the JAX budget: a budget that holds the step alone (GRPO's check) but not the
    step with the teacher beside it does not fit."""
    import jax

    from mathgrpo.model import abstract_params, count_params

    inputs = _tiny_opd_inputs()
    devices = jax.devices("cpu")[:2]
    report = plan.plan(inputs, devices)
    assert report["algorithm"] == "opd" and report["candidate_width"] == 16
    # bf16 over fsdp=2; the per-layer q/k norms ([layers, head_dim]) are replicated, so whole on each device
    teacher_params = count_params(abstract_params(inputs.teacher))
    replicated = 2 * 3 * 32  # q_norm and k_norm, 3 layers, head_dim 32
    assert report["teacher"]["params"] == teacher_params
    assert report["teacher_param_bytes_per_device"] == (teacher_params - replicated) * 2 // 2 + replicated * 2
    student = count_params(abstract_params(inputs.model))
    assert report["teacher"]["param_dtype"] == "bfloat16" and report["params"] == student
    # the scoring pass's arguments hold both models' params and the packed batch; its outputs the top-k fields
    scoring = report["scoring_pass"]
    assert scoring["argument_bytes"] > report["param_bytes_per_device"] + report["teacher_param_bytes_per_device"]
    micro_batches, length = report["micro_batches_in_buffer"], 256
    topk_bytes = 3 * micro_batches * length * 16 * 4  # ids, advantages, old log-probs: one row per device
    assert scoring["output_bytes"] >= topk_bytes
    assert report["train_step"]["argument_bytes"] >= topk_bytes + report["param_bytes_per_device"]
    phases = report["phases"]
    state = report["param_bytes_per_device"] + report["optimizer_bytes_per_device"]
    teacher = report["teacher_param_bytes_per_device"]
    assert phases["train"]["resident_bytes"] == teacher
    assert phases["scoring"]["resident_bytes"] == report["optimizer_bytes_per_device"]
    assert phases["rollout"]["resident_bytes"] == report["sampler"]["resident_bytes"] == state + teacher
    assert report["sampler"]["resident_teacher_bytes"] == teacher
    for name in ("train", "validation"):
        pool = report["sampler"][name]
        assert pool["rollout_peak_bytes"] == state + teacher + pool["peak_bytes"]
    assert phases["train"]["peak_bytes"] == report["train_step"]["peak_bytes"]
    assert phases["scoring"]["peak_bytes"] == scoring["peak_bytes"]
    budget = report["jax_memory_budget_bytes"]
    for phase in phases.values():
        assert phase["total_bytes"] == phase["peak_bytes"] + phase["resident_bytes"]
        assert phase["fits"] == (phase["total_bytes"] <= budget)
    assert report["fits"] is True
    assert report["per_device_peak_bytes"] == max(phases["train"]["total_bytes"], phases["scoring"]["total_bytes"])
    text = plan.format_report(report)
    for words in ("teacher (bfloat16)", "train_step (OPD, K'=16)", "scoring_pass", "OPD phases",
                  "rollout", "scoring", "the teacher's params (the student's train state is the step's argument)"):
        assert words in text

    # a budget one byte under the step with the teacher beside it: the step alone fits (GRPO's check), OPD not
    # (JAX's share next to vLLM at u = 0.5: 1 - 0.5 - the 0.05 margin)
    tight = phases["train"]["total_bytes"] - 1
    over = plan.plan(_tiny_opd_inputs(device_memory_gib=tight / 0.45 / GIB), devices)
    assert over["jax_memory_budget_bytes"] == pytest.approx(tight, abs=0.5)
    assert over["train_step"]["peak_bytes"] == report["train_step"]["peak_bytes"] <= tight
    assert over["phases"]["train"]["fits"] is False and over["fits"] is False
    assert all(phase["fits"] == (phase["total_bytes"] <= tight) for phase in over["phases"].values())


def test_jax_share_follows_the_rollout_engine(monkeypatch):
    """JAX preallocates what `prepare` sets: next to vLLM, 1 - gpu_memory_utilization - 0.05; with the JAX
    sampler, 0.95 of the device (an XLA_PYTHON_CLIENT_MEM_FRACTION already set wins). `plan` checks against
    the same share, and with the JAX sampler its `fits` includes the sampler's pools (GRPO here: vLLM's
    room instead where vLLM samples)."""
    import jax

    from mathgrpo.config import ConfigError, RolloutConfig, jax_memory_fraction
    from mathgrpo.rollout import factory

    assert jax_memory_fraction("vllm", 0.65) == pytest.approx(0.30)
    assert jax_memory_fraction("jax", 0.65) == pytest.approx(0.95)
    with pytest.raises(ConfigError, match="gpu_memory_utilization=0.96 leaves no memory for JAX"):
        jax_memory_fraction("vllm", 0.96)
    monkeypatch.delenv("XLA_PYTHON_CLIENT_MEM_FRACTION", raising=False)
    factory.prepare("jax", RolloutConfig(engine="jax"))
    assert os.environ["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.950"
    monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.5")
    factory.prepare("jax", RolloutConfig(engine="jax"))
    assert os.environ["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.5"

    devices = jax.devices("cpu")[:2]
    grpo = dict(teacher=None, distill=None, device_memory_gib=1.0, max_slots=32, val_max_tokens=992)  # pools > step
    with_vllm = plan.plan(_tiny_opd_inputs(**grpo), devices)
    alone = plan.plan(_tiny_opd_inputs(engine="jax", **grpo), devices)
    assert with_vllm["jax_memory_budget_bytes"] == pytest.approx(0.45 * GIB)
    assert alone["jax_memory_budget_bytes"] == pytest.approx(0.95 * GIB) and alone["vllm_kv_cache_tokens"] is None
    assert alone["train_step"]["peak_bytes"] == with_vllm["train_step"]["peak_bytes"]
    assert alone["fits"] and alone["sampler"]["fits"]
    assert "rollout.engine jax" in plan.format_report(alone) and "next to vLLM" in plan.format_report(with_vllm)
    # a device whose JAX share holds the train step but not the sampler's pools: fits only where vLLM samples
    step, pools = alone["train_step"]["peak_bytes"], alone["sampler"]["validation"]["rollout_peak_bytes"]
    assert step < pools
    between = (step + pools) / 2 / 0.95 / GIB
    squeezed = plan.plan(_tiny_opd_inputs(engine="jax", **grpo | {"device_memory_gib": between}), devices)
    assert not squeezed["sampler"]["fits"] and not squeezed["fits"]


@pytest.mark.slow
def test_naive_step_is_far_over_and_memory_work_pays():
    """The naive step (O(T²) reference attention, no remat, full-length fp32 logits) is over 50 GiB;
    the configured one is an order of magnitude below it."""
    config = load_config(RECIPE, ["grpo.micro_batch_tokens=16384"])
    naive = plan.plan(plan.inputs_from_config(config, naive=True), plan.plan_devices(config.mesh))
    planned = plan.plan(plan.inputs_from_config(config), plan.plan_devices(config.mesh))
    assert naive["per_device_peak_bytes"] > 50 * GIB
    assert planned["per_device_peak_bytes"] * 10 < naive["per_device_peak_bytes"]


def test_devices_this_process_runs_on_are_not_described():
    import jax

    assert not plan.is_described(jax.devices()[0])
    assert not plan.is_described(jax.devices("cpu")[-1])


SPEC = os.path.join(ROOT, "configs", "gpus", "h100_sxm.txtpb")


def cuda_plugin_installed() -> bool:
    import importlib.util

    return any(importlib.util.find_spec(name) is not None for name in ("jax_cuda13_plugin", "jax_cuda12_plugin"))


def test_gpu_spec_needs_every_mesh_axis_sized():
    from mathgrpo.config import MeshConfig

    with pytest.raises(ValueError, match="fsdp=-1"):
        plan.plan_devices(MeshConfig(data=1, fsdp=-1, tensor=1), gpu_spec=Path(SPEC).read_text())


@pytest.mark.skipif(cuda_plugin_installed(), reason="checks the error raised without JAX's CUDA plugin")
def test_gpu_spec_without_the_cuda_plugin_says_what_to_install():
    from mathgrpo.config import MeshConfig

    with pytest.raises(RuntimeError, match="needs JAX's CUDA plugin"):
        plan.plan_devices(MeshConfig(data=1, fsdp=8, tensor=1), gpu_spec=Path(SPEC).read_text())


def test_cudnn_attention_is_refused_for_a_cpu_mesh_inside_jit():
    """`layers.target_platform` asks the mesh in context (what is compiled for), not the process's
    backend: inside a jit over CPU devices the cuDNN path is refused with the platform named."""
    import jax
    import jax.numpy as jnp

    from mathgrpo.model import layers

    mesh = jax.make_mesh((2,), ("fsdp",), devices=jax.devices("cpu")[:2])
    seen = []

    def f(x):
        seen.append(layers.target_platform())
        return x

    with jax.set_mesh(mesh):
        jax.jit(f).lower(jnp.zeros(2))
    assert seen == ["cpu"]
    q = jnp.zeros((1, 4, 2, 8), jnp.bfloat16)
    segments = jnp.ones((1, 4), jnp.int32)
    index = jnp.arange(4)
    with jax.set_mesh(mesh), pytest.raises(RuntimeError, match="compiled for are 'cpu'"):
        jax.jit(lambda q: layers.cudnn_packed_attention(q, q, q, segments, segments, index, index,
                                                        max_segments=2)).lower(q)


def test_described_gpu_checks_leave_cpu_plans_alone():
    import jax
    from jax._src.cudnn import fused_attention_stablehlo as cudnn_attention

    before = cudnn_attention.check_compute_capability
    with plan.described_gpu_checks(jax.devices("cpu")):
        assert cudnn_attention.check_compute_capability is before
    assert cudnn_attention.check_compute_capability is before


def _plan_for_described_gpus(spec_name: str, *overrides: str) -> dict:
    """The recipe's step for Qwen3-0.6B (8,192-token rows) planned for 8 GPUs of configs/gpus/SPEC by
    the CLI, in a process whose JAX backend is the CPU: its JSON report."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | {"JAX_PLATFORMS": "cpu"}
    result = subprocess.run(
        [sys.executable, "-m", "mathgrpo", "plan", "--config", RECIPE,
         "--gpu-spec", os.path.join(ROOT, "configs", "gpus", spec_name),
         "model.architecture=configs/models/qwen3_0p6b_base.yaml", "grpo.micro_batch_tokens=8192", *overrides],
        cwd=ROOT, capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not cuda_plugin_installed(), reason="needs JAX's CUDA plugin (requirements-gpu.txt); no GPU")
def test_plan_compiles_for_described_h100s_without_a_gpu():
    """XLA:GPU compiles the recipe's sharded step for Qwen3-0.6B on 8 described H100s (deviceless AOT),
    cuDNN's packed attention included, on whatever machine runs this; the varlen workspace is added."""
    report = _plan_for_described_gpus("h100_sxm.txtpb")
    assert report["device_kind"] == "NVIDIA H100 80GB HBM3" and report["devices"] == 8
    assert report["attention"] == "cudnn packed (varlen)"
    segments, heads, head_dim = 8, 16, 128  # the recipe's model.attention_max_segments; Qwen3-0.6B
    expected = int(plan.CUDNN_VARLEN_BWD_BYTES * segments * 8192 * heads * head_dim)
    assert report["train_step"]["cudnn_workspace_bytes"] == expected
    assert report["train_step"]["temp_bytes"] > 0 and report["fits"] is True
    # The admission writes the prompts' KV into the pool in place: its temporaries hold no second copy
    # of the pool (a loop of per-row writes made XLA:GPU copy it whole; model.qwen3.write_prompts).
    pool = report["sampler"]["validation"]
    assert pool["admit"]["temp_bytes"] < pool["pool_kv_bytes_per_device"]
    # The sampler's replicated copy (the default): Qwen3-0.6B whole in bf16 on each GPU, in the burst's
    # arguments, beside the pool.
    sampler = report["sampler"]
    assert sampler["weights"] == "replicated" and sampler["weight_dtype"] == "bfloat16" and sampler["fits"]
    assert sampler["weight_bytes_per_device"] == 2 * report["params"]
    assert pool["burst"]["argument_bytes"] > pool["pool_kv_bytes_per_device"] + sampler["weight_bytes_per_device"]


@pytest.mark.skipif(not cuda_plugin_installed(), reason="needs JAX's CUDA plugin (requirements-gpu.txt); no GPU")
def test_plan_for_described_a100s_takes_the_masked_cudnn_path():
    """Ampere (the recipe's A800s) has no packed cuDNN layout: the step compiles with the masked cuDNN
    attention and no varlen workspace is added."""
    report = _plan_for_described_gpus("a100_sxm4_80gb.txtpb")
    assert report["device_kind"] == "NVIDIA A100-SXM4-80GB" and report["attention"] == "cudnn masked"
    assert report["train_step"]["cudnn_workspace_bytes"] == 0 and report["train_step"]["temp_bytes"] > 0


@pytest.mark.skipif(not cuda_plugin_installed(), reason="needs JAX's CUDA plugin (requirements-gpu.txt); no GPU")
def test_full_offload_moves_the_saved_layer_inputs_to_pinned_host_memory():
    """The recipe's activation offload (`remat_policy: full_offload`) against `full`, both compiled by
    XLA:GPU: the [L, T, D] bf16 stack of saved layer inputs (28 · 8,192 · 1,024 · 2 B per device for
    Qwen3-0.6B) leaves the device's temporaries and appears as pinned host memory."""
    stack = 28 * 8192 * 1024 * 2
    full = _plan_for_described_gpus("h100_sxm.txtpb", "model.remat_policy=full")["train_step"]
    offload = _plan_for_described_gpus("h100_sxm.txtpb", "model.remat_policy=full_offload")["train_step"]
    assert full["host_temp_bytes"] == 0
    assert offload["host_temp_bytes"] >= stack
    assert full["temp_bytes"] - offload["temp_bytes"] >= 0.9 * stack
