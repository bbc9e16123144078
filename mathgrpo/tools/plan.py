"""`python -m mathgrpo plan`: compile the real programs ahead of time on abstract arrays and report
per-device memory and FLOPs before a run starts.

Nothing is allocated: params, optimizer state and batches are `jax.ShapeDtypeStruct`s with their
shardings, and `jit(...).lower(...).compile()` yields XLA's own memory analysis of each program:
- the train step (one packed micro-batch row of `grpo.micro_batch_tokens` tokens per device, the
  mini-batch's worth of micro-batches in the buffer, gradient accumulation, AdamW; state donated);
- the log-prob pass (no gradient) over the same batch;
- the JAX sampler as it runs (rollout/jax_sampler.py): a burst of decode steps over its pool of
  `rollout.max_slots` rows per device (KV cache of prompt + max_tokens slots each) and the admission of
  one prompt into n rows, for the training rollout (n, max_response_length) and for validation (val_n,
  val_max_tokens), on the sampler's own copy of the weights (compute dtype; whole on each device, or
  training's FSDP shards: `rollout.sampler_weights`, in the programs' arguments). While the sampler runs
  the train state stays resident beside it, so its peak counts
  with the params and optimizer state. With `rollout.max_slots: null` the plan chooses the most rows
  per device that fit both (the cost of a row measured from two compiles, the choice compiled again).
With `algorithm: opd` (train/distill.py) the plan covers the three phases of an OPD step, each beside what
stays resident during it: the rollout (the sampler's pool beside the student's train state and the frozen
teacher's params), the scoring pass (`make_score_fn`: student and teacher forward over the packed batch,
writing the [M, R, L, K'] top-k fields; its arguments hold both models' params, the student's optimizer
state stays resident beside it) and the OPD train step (the loss at the K' candidate ids, on the batch
with the top-k fields; the teacher's params stay resident beside it). The teacher is sharded by the
student's rules in its own `param_dtype`; it has no optimizer state.
When the mesh needs more devices than exist: on a machine with a GPU, XLA:GPU compiles for a described
topology of that many GPUs of the local kind (`jax.experimental.topologies`, deviceless AOT), so the
analysis is the GPU compiler's own; elsewhere fake CPU devices stand in (set before JAX starts, see
__main__), and the analysis is XLA:CPU's compile of the same sharded program — an estimate of the GPU
figure (XLA:CPU keeps some bf16 intermediates in f32), not a GPU measurement. With `gpu_spec` (a text
`stream_executor::GpuTargetConfigProto`, e.g. configs/gpus/h100_sxm.txtpb) XLA:GPU compiles for
described GPUs of that kind on any machine, a CPU-only one included: the CUDA plugin must be installed
(`jax[cuda13]`, requirements-gpu.txt), a GPU need not be (`described_gpu_checks`).

Peak per device = arguments + outputs − aliased (donated) + temporaries. A compile for described
GPUs does not size cuDNN's workspaces (no device to ask), and the packed (varlen) attention's backward
workspace is large (grows with model.attention_max_segments × row tokens × heads × head dim): for
described devices the plan adds it, `CUDNN_VARLEN_BWD_BYTES` per element, measured on an H100 as the
difference between a real-device and a described-device compile of the same single-GPU 4B step.
Before Hopper (an A100/A800: sm 8.0) cuDNN has no packed layout and the model takes the masked cuDNN
path (`attention` in the report); its workspace is not estimated.
`fits` compares the train step's peak (OPD: each phase's peak plus what is resident beside it, the
sampler's pools included) with the device memory JAX preallocates (`config.jax_memory_fraction`, what
`rollout.factory.prepare` sets): next to vLLM (`rollout.engine: vllm`), 1 − u − a 0.05 margin, with
vLLM's u (`rollout.gpu_memory_utilization`) holding its bf16 weights plus KV cache room; the JAX
sampler's pools are then sized within the same JAX share (informative: vLLM samples). With
`rollout.engine: jax` JAX has the device but the margin, and `fits` includes the sampler's pools.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mathgrpo.config import (
    MEMORY_MARGIN,
    DistillConfig,
    GRPOConfig,
    MeshConfig,
    ModelConfig,
    OptimConfig,
    jax_memory_fraction,
)
from mathgrpo.model import abstract_params, count_params
from mathgrpo.model.layers import cudnn_packed_supported
from mathgrpo.parallel import mesh as parallel_mesh
from mathgrpo.parallel import shardings as parallel_shardings
from mathgrpo.rollout.base import SamplingParams
from mathgrpo.tracking.flops import flops_per_step
from mathgrpo.train import distill as distill_step
from mathgrpo.train import packing
from mathgrpo.train import state as train_state
from mathgrpo.train import step as train_step_lib
from mathgrpo.train.packing import PackedBatch

GIB = 2**30
# Measured (H100, jax 0.11.2, 2026-11-25): the 4B step on one GPU, 16,384-token rows, 8 segments,
# 32 heads of 128: temp 38.59 GiB compiled for the real device vs 34.90 GiB for a described one,
# 3,961,005,056 bytes = 7.378 bytes per (segment × token × head × head-dim) element.
CUDNN_VARLEN_BWD_BYTES = 7.38
SAMPLER_CALLS = ("train", "validation")  # the sampler's calls: the training rollout and validation


@dataclasses.dataclass(frozen=True)
class PlanInputs:
    model: ModelConfig
    mesh: MeshConfig
    grpo: GRPOConfig
    optim: OptimConfig
    max_prompt_length: int = 1024
    max_response_length: int = 7168
    sequences_per_step: int = 512  # prompts × n
    device_memory_gib: float = 80.0
    vllm_memory_utilization: float = 0.65
    engine: str = "vllm"  # rollout.engine: next to vLLM, JAX has its share of the device; the JAX sampler, the rest
    n: int = 8  # rollout.n
    temperature: float = 1.0  # the training rollout's sampling settings (they pick the traced filters)
    top_p: float = 1.0
    top_k: int = -1
    val_n: int = 16
    val_max_tokens: int = 31744
    val_temperature: float = 1.0
    val_top_p: float = 0.95
    val_top_k: int = -1
    max_slots: int | None = None  # JAX sampler pool rows per device; None: chosen here
    sampler_weights: str = "replicated"  # the JAX sampler's copy of the weights (jax_sampler.weight_rules)
    teacher: ModelConfig | None = None  # algorithm: opd: the frozen teacher (distill.teacher)
    distill: DistillConfig | None = None  # algorithm: opd: top_k and its strategy give K'


def _abstract(tree: Any, shardings: Any) -> Any:
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)


def compiled_memory(compiled) -> dict:
    """XLA's memory analysis of a compiled program, with its device peak (arguments + outputs − aliased
    + temp) and the pinned host memory it uses for offloaded temporaries (`remat_policy: full_offload`)."""
    analysis = compiled.memory_analysis()
    args, out = analysis.argument_size_in_bytes, analysis.output_size_in_bytes
    alias, temp = analysis.alias_size_in_bytes, analysis.temp_size_in_bytes
    return {"argument_bytes": args, "output_bytes": out, "alias_bytes": alias, "temp_bytes": temp,
            "peak_bytes": args + out - alias + temp, "host_temp_bytes": analysis.host_temp_size_in_bytes}


def _flops(compiled) -> float | None:
    cost = compiled.cost_analysis()
    if isinstance(cost, list):
        cost = cost[0] if cost else {}
    return float(cost.get("flops", 0.0)) if cost else None


def plan(inputs: PlanInputs, devices: list | None = None) -> dict:
    with described_gpu_checks(list(devices) if devices is not None else jax.devices()):
        return _plan(inputs, devices)


@contextlib.contextmanager
def described_gpu_checks(devices: list):
    """Compiling for described GPUs: JAX's cuDNN attention wrapper (and `layers.cudnn_packed_supported`,
    which uses it) asks the process's own GPU for the compute capability — none on a CPU-only machine,
    another kind where the spec names a different GPU — so meanwhile it answers for the described
    devices (the packed varlen layout needs sm >= 9.0). Our own platform check,
    layers.target_platform, already asks the mesh's devices."""
    device = devices[0]
    if device.platform != "gpu" or not is_described(device):
        yield
        return
    from jax._src.cudnn import fused_attention_stablehlo as cudnn_attention

    def version(text: str) -> tuple[int, ...]:
        return tuple(int(x) for x in text.split("."))

    capability = version(device.compute_capability)
    saved = cudnn_attention.check_compute_capability, cudnn_attention.is_cuda_compute_capability_equal
    cudnn_attention.check_compute_capability = lambda c: capability >= version(c)
    cudnn_attention.is_cuda_compute_capability_equal = lambda c: capability == version(c)
    try:
        yield
    finally:
        cudnn_attention.check_compute_capability, cudnn_attention.is_cuda_compute_capability_equal = saved


def _plan(inputs: PlanInputs, devices: list | None = None) -> dict:
    model, algo = inputs.model, inputs.grpo
    mesh = parallel_mesh.make_mesh(inputs.mesh, devices)
    rules = parallel_mesh.logical_rules(inputs.mesh)
    optimizer = train_state.make_optimizer(inputs.optim)
    rows = parallel_mesh.data_parallel_size(mesh)
    row_length = algo.micro_batch_tokens
    max_sequence = inputs.max_prompt_length + inputs.max_response_length
    if max_sequence > row_length:
        raise ValueError(f"grpo.micro_batch_tokens={row_length} is below the longest sequence "
                         f"({inputs.max_prompt_length} + {inputs.max_response_length}); packing would fail")
    sequences_per_row = math.ceil(inputs.sequences_per_step / rows)
    sequences_per_micro = max(row_length // max_sequence, 1)
    micro_batches = 1 << (math.ceil(sequences_per_row / sequences_per_micro) - 1).bit_length()

    state_shardings = train_state.train_state_shardings(model, optimizer, mesh, rules)
    params = abstract_params(model)
    abstract_state = jax.eval_shape(
        lambda p: train_state.init_train_state(p, inputs.optim), params)
    state = _abstract(abstract_state, state_shardings)
    opd = inputs.distill is not None
    if opd and inputs.teacher is None:
        raise ValueError("an OPD plan (PlanInputs.distill set) needs the teacher's ModelConfig (PlanInputs.teacher)")
    width = distill_step.candidate_width(inputs.distill) if opd else 0  # K'; 0: no top-k fields
    shape = (micro_batches, rows, row_length)
    ints, floats = jax.ShapeDtypeStruct(shape, jnp.int32), jax.ShapeDtypeStruct(shape, jnp.float32)
    scalar_i, scalar_f = jax.ShapeDtypeStruct((), jnp.int32), jax.ShapeDtypeStruct((), jnp.float32)
    packed = PackedBatch(
        tokens=ints, positions=ints, segment_ids=ints, loss_mask=floats, advantages=floats,
        rollout_logprobs=floats, old_logprobs=floats, ref_logprobs=floats, sequence_index=ints,
        sequence_slots=jax.ShapeDtypeStruct((inputs.sequences_per_step,), jnp.int32),
        legacy_weight=jax.ShapeDtypeStruct((micro_batches, rows), jnp.float32),
        num_micro_batches=scalar_i, token_count=scalar_f, sequence_count=scalar_f)
    batch = _abstract(packed, packing.batch_shardings(mesh))  # as `pack` gives it
    if width:  # the batch the scoring pass returns: the OPD step's input
        candidates = (*shape, width)
        step_batch = _abstract(packed.replace(
            topk_ids=jax.ShapeDtypeStruct(candidates, jnp.int32),
            topk_advantages=jax.ShapeDtypeStruct(candidates, jnp.float32),
            topk_old_logprobs=jax.ShapeDtypeStruct(candidates, jnp.float32)), packing.batch_shardings(mesh, topk=True))
    else:  # GRPO, and sampled-token OPD (top_k = 0: the advantages carry the token rewards)
        step_batch = batch

    step = train_step_lib.make_train_step(model, algo, inputs.optim, mesh=mesh, rules=rules,
                                          temperature=inputs.temperature, horizon=inputs.max_response_length)
    compiled_step = step.lower(state, step_batch).compile()
    logprob_fn = train_step_lib.make_logprob_fn(model, algo, mesh=mesh, rules=rules, temperature=inputs.temperature)
    compiled_logprob = logprob_fn.lower(state.params, batch).compile()

    workspace = 0
    packed_attention = model.attention == "cudnn" and cudnn_packed_supported()  # sm >= 9.0; else the masked path
    if is_described(mesh.devices.flat[0]) and packed_attention:
        heads = model.num_attention_heads // mesh.shape["tensor"]
        workspace = int(CUDNN_VARLEN_BWD_BYTES * model.attention_max_segments * row_length * heads * model.head_dim)
    params_bytes = per_device(abstract_state.params, state_shardings.params)
    opt_bytes = per_device(abstract_state.opt_state, state_shardings.opt_state)
    train_memory = compiled_memory(compiled_step)
    train_memory["cudnn_workspace_bytes"] = workspace  # added for described devices (see above)
    train_memory["peak_bytes"] += workspace
    device_bytes = inputs.device_memory_gib * GIB
    jax_budget = device_bytes * jax_memory_fraction(inputs.engine, inputs.vllm_memory_utilization)
    with_vllm = inputs.engine == "vllm"
    teacher_report = scoring_memory = None
    teacher_bytes = 0
    if opd:
        teacher = inputs.teacher
        teacher_shardings = parallel_shardings.param_shardings(teacher, mesh, rules)
        teacher_abstract = abstract_params(teacher)
        teacher_bytes = per_device(teacher_abstract, teacher_shardings)
        score_fn = distill_step.make_score_fn(model, teacher, inputs.distill, algo, temperature=inputs.temperature,
                                              mesh=mesh, rules=rules)
        scoring_memory = compiled_memory(score_fn.lower(
            state.params, _abstract(teacher_abstract, teacher_shardings), batch).compile())
        teacher_report = {"params": count_params(teacher_abstract), "param_dtype": teacher.param_dtype,
                          "compute_dtype": teacher.compute_dtype, "num_hidden_layers": teacher.num_hidden_layers,
                          "hidden_size": teacher.hidden_size, "param_bytes_per_device": teacher_bytes}
    sampler = plan_sampler(inputs, mesh, rules, resident=params_bytes + opt_bytes, budget=jax_budget,
                           teacher=teacher_bytes)
    vllm_weights = count_params(params) * 2  # bf16 copy held by the engine (TP=1: whole model)
    vllm_room = device_bytes * inputs.vllm_memory_utilization - vllm_weights if with_vllm else None
    kv_bytes_per_token = model.num_hidden_layers * model.num_key_value_heads * model.head_dim * 2 * 2
    report = {
        "algorithm": "opd" if opd else "grpo",
        "devices": mesh.devices.size,
        "mesh": dict(mesh.shape),
        "device_kind": mesh.devices.flat[0].device_kind,
        "attention": model.attention if model.attention != "cudnn" else
                     "cudnn packed (varlen)" if packed_attention else "cudnn masked",
        "micro_batch_tokens_per_device": row_length,
        "micro_batches_in_buffer": micro_batches,
        "params": count_params(params),
        "param_bytes_per_device": params_bytes,
        "optimizer_bytes_per_device": opt_bytes,
        "gradient_bytes_per_device": params_bytes,  # fp32 accumulator, inside the step's temporaries
        "train_step": train_memory,
        "logprob_pass": compiled_memory(compiled_logprob),
        "sampler": sampler,
        "flops_per_micro_batch_per_device": _flops(compiled_step),
        "flops_per_step_estimate": flops_per_step(model, [max_sequence] * inputs.sequences_per_step),
        "per_device_peak_bytes": train_memory["peak_bytes"],
        "jax_memory_budget_bytes": jax_budget,
        "engine": inputs.engine,
        "vllm_kv_cache_tokens": int(max(vllm_room, 0) // kv_bytes_per_token) if with_vllm else None,
        # next to vLLM: the train step and vLLM's room; with the JAX sampler: the train step and its pools
        "fits": bool(train_memory["peak_bytes"] <= jax_budget and (vllm_room > 0 if with_vllm else sampler["fits"])),
    }
    if opd:
        phases = {
            "rollout": {"peak_bytes": max(sampler[call]["peak_bytes"] for call in SAMPLER_CALLS),
                        "resident_bytes": sampler["resident_bytes"],
                        "resident": "the student's train state (params, optimizer state) and the teacher's params"},
            "scoring": {"peak_bytes": scoring_memory["peak_bytes"], "resident_bytes": opt_bytes,
                        "resident": "the student's optimizer state (both models' params are the pass's arguments)"},
            "train": {"peak_bytes": train_memory["peak_bytes"], "resident_bytes": teacher_bytes,
                      "resident": "the teacher's params (the student's train state is the step's argument)"},
        }
        for phase in phases.values():
            phase["total_bytes"] = phase["peak_bytes"] + phase["resident_bytes"]
            phase["fits"] = bool(phase["total_bytes"] <= jax_budget)
        report.update({
            "teacher": teacher_report, "teacher_param_bytes_per_device": teacher_bytes, "candidate_width": width,
            "scoring_pass": scoring_memory, "phases": phases,
            # the trainer's peak outside the rollout (the rollout's is the sampler's, as for GRPO)
            "per_device_peak_bytes": max(phases["train"]["total_bytes"], phases["scoring"]["total_bytes"]),
            "fits": bool(all(phase["fits"] for phase in phases.values()) and (vllm_room > 0 if with_vllm else True)),
        })
    return report


def per_device(tree, shardings_tree) -> int:
    """Bytes per device of a tree of arrays or ShapeDtypeStructs in `shardings_tree`'s shardings."""
    return int(sum(np.prod(s.shard_shape(a.shape)) * a.dtype.itemsize
                   for a, s in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings_tree))))


def _pool_memory(inputs: PlanInputs, mesh, rules, params, slots_per_device: int, sampling) -> dict:
    """XLA's memory analysis of the sampler's burst and admission at `slots_per_device` pool rows per
    device, for calls of `sampling` (max_tokens) on prompts of max_prompt_length tokens, with `params`
    the sampler's copy of the weights (`jax_sampler.abstract_held_params`)."""
    from jax.sharding import Mesh

    from mathgrpo.rollout import jax_sampler

    model = inputs.model
    mesh = Mesh(mesh.devices, mesh.axis_names)  # the sampler's Auto axes (JaxSampler)
    shards = parallel_mesh.data_parallel_size(mesh)
    pool_rows, length = slots_per_device * shards, inputs.max_prompt_length + sampling.max_tokens
    rules = jax_sampler.weight_rules(rules, inputs.sampler_weights)
    kwargs = jax_sampler.jit_shardings(mesh, jax.tree.map(lambda a: a.sharding, params))
    state = jax_sampler.abstract_pool(model, sampling, mesh, pool_rows, length,
                                      jax_sampler.per_layer_cache(mesh, isinstance(params["layers"], tuple)))
    one = parallel_shardings.replicated(mesh)
    scalar = jax.ShapeDtypeStruct((), jnp.int32, sharding=one)
    burst = parallel_mesh.MeshJit(jax_sampler.burst, mesh, rules, **kwargs["burst"])
    burst_memory = compiled_memory(burst.lower(model, sampling, mesh, params, state, scalar, scalar).compile())
    n = sampling.n
    _, width = jax_sampler.admission(pool_rows, n, shards)
    prompt = jax.ShapeDtypeStruct((width, inputs.max_prompt_length), jnp.int32,
                                  sharding=kwargs["admit"]["in_shardings"][2])
    key = jax.ShapeDtypeStruct((), jax.eval_shape(lambda: jax.random.key(0)).dtype, sharding=one)
    admit = parallel_mesh.MeshJit(jax_sampler.admit, mesh, rules, **kwargs["admit"])
    ints = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=one)  # noqa: E731
    admit_memory = compiled_memory(admit.lower(
        model, sampling.replace(n=1), mesh, params, state, prompt, ints(width), ints(width, n), key,
        ints(width, n, 2), ints(width)).compile())
    kv_bytes = 2 * model.num_hidden_layers * model.num_key_value_heads * model.head_dim * jnp.dtype(
        model.compute_dtype).itemsize * length * slots_per_device // mesh.shape["tensor"]
    return {"max_slots": slots_per_device, "pool_rows": pool_rows, "cache_length": length, "n": n,
            "admitted_prompts_per_call": width,
            "max_tokens": sampling.max_tokens, "pool_kv_bytes_per_device": int(kv_bytes),
            "burst": burst_memory, "admit": admit_memory,
            "peak_bytes": max(burst_memory["peak_bytes"], admit_memory["peak_bytes"])}


def plan_sampler(inputs: PlanInputs, mesh, rules, *, resident: int, budget: float, teacher: int = 0) -> dict:
    """The JAX sampler's pool for the training rollout and for validation within `budget` bytes per
    device, with `resident` bytes (the train state) and `teacher` bytes (OPD: the frozen teacher's
    params) held beside it. One `max_slots` serves both (the engine's pool rows; each call sizes its
    rows' KV to its own max length): the configured one, checked, or the most rows per device that fit
    both calls (at least enough rows for a prompt's n samples): estimated from the cost of a row (two
    compiles per call), then confirmed by compiling that many rows and one more."""
    from jax.sharding import Mesh

    from mathgrpo.rollout import jax_sampler

    train_state_bytes, resident = resident, resident + teacher
    shards = parallel_mesh.data_parallel_size(mesh)
    held = jax_sampler.abstract_held_params(inputs.model, Mesh(mesh.devices, mesh.axis_names), rules,
                                            inputs.sampler_weights)  # in each program's arguments
    weight_bytes = per_device(held, jax.tree.map(lambda a: a.sharding, held))
    calls = {
        "train": SamplingParams(n=inputs.n, temperature=inputs.temperature, top_p=inputs.top_p, top_k=inputs.top_k,
                                max_tokens=inputs.max_response_length),
        "validation": SamplingParams(n=inputs.val_n, temperature=inputs.val_temperature, top_p=inputs.val_top_p,
                                     top_k=inputs.val_top_k, max_tokens=inputs.val_max_tokens),
    }
    least = max(-(-sampling.n // shards) for sampling in calls.values())  # a prompt's n samples start together
    chosen = inputs.max_slots is None
    slots = inputs.max_slots
    most = {}
    if chosen:
        for name, sampling in calls.items():  # a row's bytes from two compiles; memory is linear in the rows
            low, high = (_pool_memory(inputs, mesh, rules, held, s, sampling)["peak_bytes"]
                         for s in (least, 2 * least))
            per_row = max((high - low) / least, 1.0)
            most[name] = least + int((budget - resident - low) // per_row)
        slots = max(min(most.values()), least)
    def pools_at(slots: int) -> dict:
        return {name: _pool_memory(inputs, mesh, rules, held, slots, sampling) for name, sampling in calls.items()}

    def fit(pools: dict) -> bool:
        return all(resident + pool["peak_bytes"] <= budget for pool in pools.values())

    pools = pools_at(slots)
    if chosen:  # the compiled pools decide: step down while over, then up while one more row fits
        while slots > least and not fit(pools):
            slots -= 1
            pools = pools_at(slots)
        while fit(pools) and fit(bigger := pools_at(slots + 1)):
            slots, pools = slots + 1, bigger
    for pool in pools.values():
        pool["rollout_peak_bytes"] = resident + pool["peak_bytes"]
        pool["fits"] = bool(pool["rollout_peak_bytes"] <= budget)
    return {"max_slots": slots, "chosen": chosen, "most_slots_per_call": most, "least_slots": least,
            "weights": inputs.sampler_weights, "weight_dtype": str(jax.tree.leaves(held)[0].dtype),
            "weight_bytes_per_device": weight_bytes,
            "resident_train_state_bytes": train_state_bytes, "resident_teacher_bytes": teacher,
            "resident_bytes": resident, "budget_bytes": budget, **pools,
            "fits": all(pool["fits"] for pool in pools.values())}


def format_report(report: dict) -> str:
    def gib(x):
        return f"{x / GIB:8.2f} GiB"

    opd = report.get("algorithm") == "opd"
    whose = " (the student; OPD with a frozen teacher)" if opd else ""
    lines = [f"plan: {report['params'] / 1e9:.3f}B params{whose} on {report['devices']} devices {report['mesh']} "
             f"({report['device_kind']}, attention {report['attention']}); micro-batch "
             f"{report['micro_batch_tokens_per_device']} tokens/device, "
             f"{report['micro_batches_in_buffer']} in the buffer",
             f"  params (fp32)          {gib(report['param_bytes_per_device'])} / device",
             f"  optimizer state        {gib(report['optimizer_bytes_per_device'])} / device",
             f"  gradients (fp32)       {gib(report['gradient_bytes_per_device'])} / device (within temporaries)"]
    if opd:
        teacher = report["teacher"]
        label = f"teacher ({teacher['param_dtype']})"
        lines.append(f"  {label:<22} {gib(report['teacher_param_bytes_per_device'])} / device: "
                     f"{teacher['params'] / 1e9:.3f}B params, {teacher['num_hidden_layers']} layers, frozen (no "
                     "optimizer state), resident in every phase")
    programs = ("train_step", "logprob_pass", "scoring_pass") if opd else ("train_step", "logprob_pass")
    labels = {"train_step": f"train_step (OPD, K'={report['candidate_width']})" if opd else "train_step"}
    for name in programs:
        m = report[name]
        lines.append(f"  {labels.get(name, name):<22} peak {gib(m['peak_bytes'])}  (args {gib(m['argument_bytes'])}, "
                     f"temp {gib(m['temp_bytes'])}, out {gib(m['output_bytes'])}, aliased {gib(m['alias_bytes'])})")
    sampler = report["sampler"]
    how = "chosen for the device memory" if sampler["chosen"] else "rollout.max_slots, checked"
    beside = f"the train state {gib(sampler['resident_train_state_bytes'])}"
    if sampler.get("resident_teacher_bytes"):
        beside += f" and the teacher {gib(sampler['resident_teacher_bytes'])}"
    lines.append(f"  JAX sampler: max_slots {sampler['max_slots']} rows/device ({how}); weights "
                 f"{sampler['weights']} {sampler['weight_dtype']} {gib(sampler['weight_bytes_per_device']).strip()}"
                 f" / device (in each program's arguments); beside {beside}")
    with_what = "the train state and teacher" if sampler.get("resident_teacher_bytes") else "the train state"
    for name in SAMPLER_CALLS:
        pool = sampler[name]
        room = f"; up to {sampler['most_slots_per_call'][name]} rows alone" if sampler["chosen"] else ""
        lines.append(f"    {name:<10} n={pool['n']}, {pool['pool_rows']} rows x {pool['cache_length']} slots: "
                     f"KV {gib(pool['pool_kv_bytes_per_device'])}, burst peak {gib(pool['burst']['peak_bytes'])}, "
                     f"admit peak {gib(pool['admit']['peak_bytes'])}; with {with_what} "
                     f"{gib(pool['rollout_peak_bytes'])}: fits {pool['fits']}{room}")
    if opd:
        lines.append(f"  OPD phases, per device (program peak + what stays resident beside it, against the JAX "
                     f"budget {gib(report['jax_memory_budget_bytes']).strip()}):")
        for name, phase in report["phases"].items():
            lines.append(f"    {name:<8} {gib(phase['peak_bytes'])} + {gib(phase['resident_bytes'])} = "
                         f"{gib(phase['total_bytes'])}: fits {phase['fits']}  (resident: {phase['resident']})")
    if report["train_step"]["host_temp_bytes"]:
        lines.append(f"  + pinned host memory for offloaded activations {gib(report['train_step']['host_temp_bytes'])} "
                     "/ device (not in the device peak)")
    if report["train_step"].get("cudnn_workspace_bytes"):
        lines.append(f"  + cuDNN varlen backward workspace {gib(report['train_step']['cudnn_workspace_bytes'])} "
                     "(not sized by a described-device compile; included in the train_step peak)")
    flops = report["flops_per_micro_batch_per_device"]
    compiled_flops = f"{flops:.3e}" if flops is not None else "n/a (not reported by this compile)"
    lines.append(f"  FLOPs: {compiled_flops} per micro-batch per device (compiled); "
                 f"{report['flops_per_step_estimate']:.3e} per step at max lengths (verl's formula)")
    if report["engine"] == "vllm":
        lines.append(f"  JAX budget next to vLLM {gib(report['jax_memory_budget_bytes'])}; vLLM KV room "
                     f"{report['vllm_kv_cache_tokens']:,} tokens; fits: {report['fits']}")
    else:
        lines.append(f"  JAX budget (rollout.engine {report['engine']}: the device less a "
                     f"{MEMORY_MARGIN:.0%} margin) {gib(report['jax_memory_budget_bytes'])}; fits (train step "
                     f"and the sampler's pools): {report['fits']}")
    return "\n".join(lines)


def inputs_from_config(config, naive: bool = False, platform: str | None = None) -> PlanInputs:
    """PlanInputs of an ExperimentConfig (with `algorithm: opd`, the teacher's ModelConfig and the distill
    section too). When the devices planned for are not GPUs (`platform`, default: JAX's backend), cuDNN
    attention is planned as the blockwise one (same memory order), the teacher's as well.
    `naive`: the step without any memory work — reference O(T²) attention, no remat, no token
    chunks, full-length fp32 logits."""
    from mathgrpo.weights.policy import resolve_model_config

    model = resolve_model_config(config.model)
    platform = platform or jax.default_backend()
    if model.attention == "cudnn" and platform == "cpu":
        model = model.replace(attention="blockwise")
    teacher = resolve_model_config(config.distill.teacher) if config.algorithm == "opd" else None
    if teacher is not None and teacher.attention == "cudnn" and platform == "cpu":
        teacher = teacher.replace(attention="blockwise")
    algo = config.grpo
    if naive:
        model = model.replace(attention="reference", remat_policy="none", token_chunk_size=0)
        if teacher is not None:
            teacher = teacher.replace(attention="reference", remat_policy="none", token_chunk_size=0)
        algo = dataclasses.replace(algo, logprob_chunk_size=algo.micro_batch_tokens)
    return PlanInputs(
        model=model, mesh=config.mesh, grpo=algo, optim=config.optim,
        max_prompt_length=config.data.max_prompt_length, max_response_length=config.data.max_response_length,
        sequences_per_step=config.data.train_batch_size * config.rollout.n,
        device_memory_gib=config.hardware.device_memory_gib,
        vllm_memory_utilization=config.rollout.gpu_memory_utilization,
        n=config.rollout.n, temperature=config.rollout.temperature, top_p=config.rollout.top_p,
        top_k=config.rollout.top_k, val_n=config.rollout.val_n, val_max_tokens=config.rollout.val_max_tokens,
        val_temperature=config.rollout.val_temperature, val_top_p=config.rollout.val_top_p,
        val_top_k=config.rollout.val_top_k, max_slots=config.rollout.max_slots, engine=config.rollout.engine,
        sampler_weights=config.rollout.sampler_weights, teacher=teacher,
        distill=config.distill if config.algorithm == "opd" else None)


def is_described(device) -> bool:
    """True for a device of a described topology (AOT only), False for one this process can run on."""
    real = list(jax.devices())
    try:
        real += jax.devices("cpu")
    except RuntimeError:
        pass
    return all(device is not d for d in real)


def gpu_topology_devices(count: int, gpu_spec: str | None = None) -> list:
    """`count` GPUs described for ahead-of-time compilation (no memory on them): like the local one,
    or, given `gpu_spec` (the text of a `stream_executor::GpuTargetConfigProto`), of that kind —
    which needs the CUDA plugin installed but no GPU on this machine."""
    from jax.experimental import topologies

    options = {} if gpu_spec is None else {"target_config": gpu_spec}
    return list(topologies.get_topology_desc(platform="cuda", topology=f"1x1x{count}", **options).devices)


def plan_devices(mesh_config: MeshConfig, described: bool = False, gpu_spec: str | None = None) -> list:
    """Described GPUs of `gpu_spec` when one is given (any machine); real devices when there are
    enough (unless `described`); else, on a GPU machine, a described topology of that many GPUs;
    else the fake CPU devices __main__ asked XLA for."""
    sizes = (mesh_config.data, mesh_config.fsdp, mesh_config.tensor)
    needed = math.prod(v for v in sizes if v != -1)
    if gpu_spec is not None:
        if -1 in sizes:
            raise ValueError(f"planning for described GPUs needs every mesh axis sized; got data={sizes[0]}, "
                             f"fsdp={sizes[1]}, tensor={sizes[2]} (-1 fills with the devices present)")
        try:
            return gpu_topology_devices(needed, gpu_spec)
        except Exception as error:
            raise RuntimeError(
                f"cannot describe {needed} GPUs from the spec ({type(error).__name__}: {error}); planning for "
                "described GPUs needs JAX's CUDA plugin (pip install -r requirements-gpu.txt, or "
                "'jax[cuda13]' at this jax's version), not a GPU") from error
    devices = jax.devices()
    if len(devices) >= needed and not described:
        return devices
    if jax.default_backend() == "gpu" and -1 not in sizes:
        try:
            return gpu_topology_devices(needed)
        except Exception as error:  # an XLA build without deviceless GPU topologies: plan on CPU
            print(f"plan: no described GPU topology ({type(error).__name__}: {error}); using CPU devices")
    cpu = jax.devices("cpu")
    if len(cpu) < needed:
        raise RuntimeError(f"the mesh needs {needed} devices; found {len(devices)} and {len(cpu)} CPU devices "
                           "(run through `python -m mathgrpo plan`, which sets up fake CPU devices)")
    return cpu if -1 in sizes else cpu[:needed]
