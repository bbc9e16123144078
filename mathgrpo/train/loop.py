"""`python -m mathgrpo train`: the GRPO loop (docs/design.md), as setup, one RL step and its metrics.

One step (verl's ray_trainer.fit, docs/recipe.md §2.7):
    prompts (data/prompts.py, 64) → rollout ×n (JAX sampler or vLLM) → reward (process pool) → group
    advantages → pack into micro-batches → jitted train step (fused π_old, TIS, token-mean, AdamW)
    → weight sync to the rollout engine → validation every `test_freq` steps and at the end →
    checkpoint every `save_freq` steps and at the end → metrics (verl's names).

Exact resume: the checkpoint holds the train state, the data iterator's position and the step; the
sampling seed of step k is a function of (trainer.seed, k), so a run restarted from step k's
checkpoint replays steps k+1, k+2, ... bit for bit (CPU). `train` resumes from the latest committed
checkpoint in `trainer.output_dir/checkpoints` by itself.

Only process 0 logs; every process runs the same program (JAX multi-controller).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import time
from typing import Any, Sequence

import jax
import numpy as np
import yaml

from mathgrpo.config import ExperimentConfig, ModelConfig, ModelSource, RolloutConfig, to_dict
from mathgrpo.data.prompts import IteratorState, PromptBatches, load_tokenizer, read_prompts
from mathgrpo.parallel import mesh as parallel_mesh
from mathgrpo.parallel import shardings as parallel_shardings
from mathgrpo.rl import advantages as rl_advantages
from mathgrpo.rl import rollout_correction
from mathgrpo.rollout import factory, shares
from mathgrpo.rollout.base import SamplingParams
from mathgrpo.train import packing as train_packing
from mathgrpo.train import state as train_state
from mathgrpo.train import step as train_step_lib
from mathgrpo.utils.process import fetch, is_main_process, log
from mathgrpo.weights import hf, orbax
from mathgrpo.weights.policy import Policy, load_policy

STEP_SEED_STRIDE = 1_000_003
# Fault injection for the resume tests: "step:N" or "save:N" SIGKILLs this process in the middle of
# step N (after the update, before its checkpoint) or right after step N's asynchronous save began.
KILL_AT_ENV = "MATHGRPO_KILL_AT"


def _maybe_kill(point: str, step: int) -> None:
    """Test hook: MATHGRPO_KILL_AT=point:step kills every process there, point:step@i only process i."""
    where = os.environ.get(KILL_AT_ENV, "")
    if where in (f"{point}:{step}", f"{point}:{step}@{jax.process_index()}"):
        os.kill(os.getpid(), signal.SIGKILL)


PERTURB_SCORES_ENV = "MATHGRPO_TEST_PERTURB_SCORES"  # tests: a process index whose gathered scores change


def _maybe_perturb_scores(scores: np.ndarray) -> None:
    """Test hook: makes one process's batch differ from the others', as a bug or a race would."""
    if os.environ.get(PERTURB_SCORES_ENV) == str(jax.process_index()):
        scores[0] += 1.0


def step_seed(seed: int, step: int) -> int:
    """The sampling seed of a step: a function of (seed, step) only, so resumed runs replay it."""
    return (seed * STEP_SEED_STRIDE + step) % (2**31 - 1)


def load_source(config: ExperimentConfig, mesh, source: ModelSource | None = None,
                tokenizer_dir: str | None = None) -> Policy:
    """The model of `source` (default: the policy, `model`) from its HF directory or Orbax checkpoint, in
    its `param_dtype` (the policy: fp32 master weights), placed in the mesh's shardings."""
    source, rules = source or config.model, parallel_mesh.logical_rules(config.mesh)
    runtime = {k: v for k, v in source.runtime().items() if k != "param_dtype"}
    return load_policy(source.path, dtype=source.param_dtype, tokenizer_dir=source.tokenizer or tokenizer_dir,
                       shardings=lambda c: parallel_shardings.param_shardings(c, mesh, rules), **runtime)


def load_teacher(config: ExperimentConfig, mesh, student: ModelConfig, tokenizer_dir: str) -> Policy:
    """The frozen OPD teacher (`distill.teacher`) on the student's mesh, by the same sharding rules; it
    must share the student's vocabulary (its log-probs are read at the student's token ids)."""
    teacher = load_source(config, mesh, config.distill.teacher, tokenizer_dir)
    if teacher.config.vocab_size != student.vocab_size:
        raise ValueError(f"distill.teacher {config.distill.teacher.path} has vocab_size {teacher.config.vocab_size}, "
                         f"the student {config.model.path} {student.vocab_size}: the teacher scores the "
                         "student's token ids, so both need the same vocabulary")
    log(f"teacher: {config.distill.teacher.path} ({teacher.config.num_hidden_layers} layers, hidden "
        f"{teacher.config.hidden_size}, {teacher.config.param_dtype})")
    return teacher


def make_engine(config: ExperimentConfig, model_config: ModelConfig, params: Any, mesh):
    """The rollout engine of `rollout.engine`, holding its own copy of the weights."""
    max_length = config.data.max_prompt_length + max(config.data.max_response_length, config.rollout.val_max_tokens)
    return factory.make_engine(config.rollout.engine, model_config, params, max_length=max_length,
                               rollout=config.rollout, seed=config.trainer.seed, mesh=mesh,
                               rules=parallel_mesh.logical_rules(config.mesh))


def sampling_params(rollout: RolloutConfig, max_tokens: int, *, validation: bool = False) -> SamplingParams:
    if validation:
        return SamplingParams(n=rollout.val_n, temperature=rollout.val_temperature, top_p=rollout.val_top_p,
                              top_k=rollout.val_top_k, max_tokens=max_tokens, stop_token_ids=rollout.stop_token_ids)
    return SamplingParams(n=rollout.n, temperature=rollout.temperature, top_p=rollout.top_p, top_k=rollout.top_k,
                          max_tokens=max_tokens, stop_token_ids=rollout.stop_token_ids)


class Timer:
    """Wall-clock sections of a step (verl's timing_raw)."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        yield
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


def padded(rows: list[np.ndarray], width: int) -> tuple[np.ndarray, np.ndarray]:
    """[R, width] zero-padded values and mask of per-response arrays."""
    values = np.zeros((len(rows), width), np.float32)
    mask = np.zeros((len(rows), width), np.float32)
    for i, row in enumerate(rows):
        values[i, :len(row)] = row
        mask[i, :len(row)] = 1.0
    return values, mask


class CheckpointError(RuntimeError):
    """A checkpoint could not be written; the message names the step, the directory and the last good one."""


def _checkpoint_failure(checkpointer, step: int, error: Exception) -> CheckpointError:
    steps = [s for s in checkpointer.all_steps() if s != step]
    last_good = max(steps) if steps else None
    return CheckpointError(
        f"saving the checkpoint of step {step} under {checkpointer.directory} failed: {error}. "
        + (f"The last complete checkpoint is step {last_good}; `train` resumes from it." if last_good is not None
           else "No complete checkpoint exists yet."))


def save_checkpoint(checkpointer, step: int, state, extra: dict) -> None:
    """Starts an asynchronous save; a failure of it, or of the previous one, stops the run with a clear
    error (the incomplete directory is never picked up: Orbax commits by renaming at the end)."""
    try:
        checkpointer.save(step, state, extra)
    except OSError as error:
        raise _checkpoint_failure(checkpointer, step, error) from error


def wait_for_checkpoint(checkpointer) -> None:
    try:
        checkpointer.wait()
    except OSError as error:
        raise _checkpoint_failure(checkpointer, checkpointer.latest_step() or -1, error) from error


def run_validation(config: ExperimentConfig, engine, records, tokenizer, step: int, run_dir: str, pool) -> dict:
    from mathgrpo.eval import validate

    params = sampling_params(config.rollout, config.rollout.val_max_tokens, validation=True)
    params = params.replace(seed=step_seed(config.trainer.seed + 1, step))
    metrics, _ = validate.validate(engine, records, tokenizer, params, reward_pool=pool,
                                   jsonl_path=os.path.join(run_dir, "validation", f"step_{step:06d}.jsonl"),
                                   log_generations=config.trainer.log_generations)
    return metrics


@dataclasses.dataclass
class Run:
    """What a training run holds from one step to the next (built by `setup`)."""

    config: ExperimentConfig
    run_dir: str
    mesh: Any
    model_config: ModelConfig
    tokenizer_dir: str
    tokenizer: Any
    batches: PromptBatches
    val_records: Sequence
    total_steps: int
    state: Any
    data_state: IteratorState
    start_step: int
    checkpointer: Any
    step_fn: Any
    batch_shardings: Any
    engine: Any
    logger: Any
    pool: Any
    teacher_params: Any = None  # algorithm: opd
    score_fn: Any = None  # algorithm: opd: the teacher's scoring pass (train/distill.py)

    def checkpoint_extra(self, step: int) -> dict:
        return {"step": step, "data_state": self.data_state.to_dict(), "config": to_dict(self.config),
                "model": self.model_config.architecture(), "param_dtype": self.model_config.param_dtype,
                "tokenizer_dir": os.path.abspath(self.tokenizer_dir)}

    def close(self) -> None:
        for part in (self.checkpointer, self.logger, self.pool):
            part.close()


@dataclasses.dataclass
class StepResult:
    """One RL step's rollout, rewards and update, for its metrics and logged samples."""

    prompt_ids: list[np.ndarray]
    responses: list[np.ndarray]
    truths: list[str]
    response_lengths: np.ndarray
    scores: np.ndarray
    advantages: np.ndarray
    reward_timeouts: int
    metrics: dict  # actor/* from the train step and rollout_corr/*


def setup(config: ExperimentConfig) -> Run:
    """Starts a run or resumes the latest checkpoint: mesh, policy, data, train state, rollout engine,
    logger and reward pool."""
    from mathgrpo.reward import pool as reward_pool
    from mathgrpo.tracking import sinks

    factory.prepare(config.rollout.engine, config.rollout)  # before JAX starts; stops if vLLM is missing
    parallel_mesh.initialize_distributed()
    if config.data.train_batch_size < jax.process_count():
        raise ValueError(f"data.train_batch_size={config.data.train_batch_size} prompts cannot be shared by "
                         f"{jax.process_count()} processes: each generates at least one prompt's group")
    trainer = config.trainer
    run_dir = os.path.abspath(trainer.output_dir)
    os.makedirs(run_dir, exist_ok=True)
    mesh = parallel_mesh.make_mesh(config.mesh)
    rules = parallel_mesh.logical_rules(config.mesh)
    model_config, params, tokenizer_dir, _ = load_source(config, mesh)
    tokenizer = load_tokenizer(tokenizer_dir)
    records, summary = read_prompts(config.data.train_files, tokenizer, config.data)
    log(f"train data: {summary}")
    val_records = ()
    if config.data.val_files:
        val_records, val_summary = read_prompts(config.data.val_files, tokenizer, config.data)
        log(f"validation data: {val_summary}")
    batches = PromptBatches.from_config(records, config.data)
    total_steps = trainer.total_steps or batches.steps_per_epoch * trainer.total_epochs

    optimizer = train_state.make_optimizer(config.optim)
    state_shardings = train_state.train_state_shardings(model_config, optimizer, mesh, rules)
    init = jax.jit(lambda p: train_state.init_train_state(p, config.optim), out_shardings=state_shardings)
    checkpointer = orbax.TrainCheckpointer(os.path.join(run_dir, "checkpoints"), keep=trainer.keep_checkpoints)
    data_state, start_step = IteratorState(), 0
    latest = checkpointer.latest_step()
    if latest is not None:
        abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                jax.eval_shape(init, params), state_shardings)
        try:
            state, extra = checkpointer.restore(latest, abstract)
        except (ValueError, TypeError, KeyError) as error:
            raise CheckpointError(f"the checkpoint {checkpointer.directory}/{latest} does not match the model "
                                  f"{config.model.path} ({model_config.num_hidden_layers} layers, hidden "
                                  f"{model_config.hidden_size}): {error}") from error
        data_state, start_step = IteratorState.from_dict(extra["data_state"]), int(extra["step"])
        log(f"resumed from {checkpointer.directory}/{latest} (step {start_step})")
    else:
        state = init(params)
    del params
    with open(os.path.join(run_dir, "config.yaml"), "w") as f:
        yaml.safe_dump(to_dict(config), f, sort_keys=False)
    teacher_params = score_fn = None
    if config.algorithm == "opd":
        from mathgrpo.train import distill as distill_step

        teacher = load_teacher(config, mesh, model_config, tokenizer_dir)
        teacher_params = teacher.params
        score_fn = distill_step.make_score_fn(model_config, teacher.config, config.distill, config.grpo,
                                              temperature=config.rollout.temperature, mesh=mesh, rules=rules)
    return Run(
        config=config, run_dir=run_dir, mesh=mesh, model_config=model_config, tokenizer_dir=tokenizer_dir,
        tokenizer=tokenizer, batches=batches, val_records=val_records, total_steps=total_steps, state=state,
        data_state=data_state, start_step=start_step, checkpointer=checkpointer,
        step_fn=train_step_lib.make_train_step(model_config, config.grpo, config.optim, mesh=mesh, rules=rules,
                                               temperature=config.rollout.temperature,
                                               horizon=config.data.max_response_length),
        batch_shardings=train_packing.batch_shardings(mesh),
        engine=make_engine(config, model_config, state.params, mesh),
        logger=sinks.make_logger(trainer.logger, run_dir, enabled=is_main_process(), total_steps=total_steps,
                                 project_name=trainer.project_name, experiment_name=trainer.experiment_name,
                                 config=to_dict(config)),
        pool=reward_pool.RewardPool(),  # workers start on the first answer that needs sympy / math-verify
        teacher_params=teacher_params, score_fn=score_fn)


def rl_step(run: Run, step: int, prompts_batch: Sequence, timer: Timer) -> StepResult:
    """One GRPO step: each process samples its share of the prompts' groups, grades them and gathers the
    whole batch; group advantages; the train step on the packed batch; the new weights to the engine."""
    from mathgrpo.reward import pool as reward_pool

    config, n = run.config, run.config.rollout.n
    share = shares.process_share(len(prompts_batch))  # whole groups: this process's prompts
    sampling = sampling_params(config.rollout, config.data.max_response_length)
    with timer("gen"):
        local = run.engine.generate([prompts_batch[i].prompt_ids for i in share],
                                    sampling.replace(seed=step_seed(config.trainer.seed, step)),
                                    first_prompt=share.start)
    run.engine.sleep()  # vLLM frees its KV cache and weights for the update; the sync wakes it
    if jax.process_count() > 1:
        print(f"process {jax.process_index()}/{jax.process_count()}: step {step}: generated prompts "
              f"{share.start}..{share.stop - 1} of {len(prompts_batch)} ({len(local)} responses)", flush=True)
    with timer("reward"):
        local_records = [prompts_batch[share.start + i // n] for i in range(len(local))]
        local_texts = run.tokenizer.batch_decode([local.response(i) for i in range(len(local))],
                                                 skip_special_tokens=True)
        local_scores, reward_info = reward_pool.score_batch(
            local_texts, [r.ground_truth for r in local_records], [r.data_source for r in local_records],
            pool=run.pool)
        rollout, scores, timeouts = shares.gather(local, np.asarray(local_scores, np.float32),
                                                  reward_info["timeouts"])
        _maybe_perturb_scores(scores)
        shares.check_same(step, rollout.token_ids, rollout.logprobs, rollout.lengths, scores)
    responses = [np.asarray(rollout.response(i)) for i in range(len(rollout))]
    rollout_logprobs = [rollout.response_logprobs(i) for i in range(len(rollout))]
    with timer("adv"):  # OPD: the outcome term of token_reward_direct_plus_grpo; the token rewards come later
        advantages = np.asarray(rl_advantages.group_advantages(scores, n, config.grpo.adv_eps,
                                                               config.grpo.norm_adv_by_std))
        if config.algorithm == "opd" and config.distill.estimator == "token_reward_direct":
            advantages = np.zeros_like(advantages)
    with timer("update_actor"):
        prompt_ids = [np.asarray(prompts_batch[i // n].prompt_ids) for i in range(len(rollout))]
        packed, placements = train_packing.pack(
            prompt_ids, responses, advantages, num_rows=parallel_mesh.data_parallel_size(run.mesh),
            row_length=config.grpo.micro_batch_tokens, max_sequences_per_row=train_packing.sequence_cap(
                run.model_config), rollout_logprobs=rollout_logprobs)
        batch = parallel_shardings.put_global(packed, run.batch_shardings)
    distill_metrics = {}
    if run.score_fn is not None:  # OPD: the teacher scores the student's top-k tokens; token-level advantages
        with timer("rm"):
            batch, scored = run.score_fn(run.state.params, run.teacher_params, batch)
            distill_metrics = {k: float(v) for k, v in fetch(scored).items()}
    with timer("update_actor"):
        run.state, outputs = run.step_fn(run.state, batch)
        actor = {k: float(v) for k, v in fetch(outputs["metrics"]).items()}
        _maybe_kill("step", step)
        old_logprobs = train_packing.unpack_responses(fetch(outputs["old_logprobs"]), placements)
    with timer("update_weights"):
        run.engine.update_weights(run.state.params)
    width = max(len(r) for r in responses)
    old, mask = padded(old_logprobs, width)
    rollout_lp, _ = padded(rollout_logprobs, width)
    correction = rollout_correction.rollout_correction_metrics(old, rollout_lp, mask,
                                                               threshold=config.grpo.rollout_is_threshold)
    return StepResult(prompt_ids=prompt_ids, responses=responses,
                      truths=[prompts_batch[i // n].ground_truth for i in range(len(rollout))],
                      response_lengths=rollout.lengths.astype(np.int64), scores=scores, advantages=advantages,
                      reward_timeouts=int(timeouts),
                      metrics={**actor, **distill_metrics, **{k: float(v) for k, v in correction.items()}})


def step_metrics(run: Run, step: int, result: StepResult, timer: Timer) -> dict:
    """verl's data, timing, throughput, MFU and memory metrics of a finished step."""
    from mathgrpo.tracking import flops, verl_metrics

    config, devices = run.config, run.mesh.devices.size
    prompt_lengths = np.array([len(p) for p in result.prompt_ids])
    response_tokens = int(result.response_lengths.sum())
    total_tokens = response_tokens + int(prompt_lengths.sum())
    metrics = verl_metrics.data_metrics(
        scores=result.scores, advantages=result.advantages, response_lengths=result.response_lengths,
        prompt_lengths=prompt_lengths, max_response_length=config.data.max_response_length,
        max_prompt_length=config.data.max_prompt_length)
    metrics.update(verl_metrics.timing_metrics(timer.seconds, response_tokens=response_tokens,
                                               total_tokens=total_tokens))
    metrics.update(verl_metrics.throughput_metrics(total_tokens=total_tokens, step_time=timer.seconds["step"],
                                                   n_devices=devices))
    metrics["perf/mfu/actor"] = flops.mfu(run.model_config, sequence_lengths=result.response_lengths + prompt_lengths,
                                          seconds=timer.seconds["update_actor"], n_devices=devices,
                                          peak_flops=config.hardware.peak_flops)
    if config.algorithm == "opd":  # the math reward is only logged (verl: critic/true_reward/*)
        metrics = {k.replace("critic/score/", "critic/true_reward/"): v for k, v in metrics.items()
                   if not k.startswith("critic/rewards/")}
    metrics.update(verl_metrics.memory_metrics())
    metrics["training/global_step"] = step
    metrics["training/epoch"] = run.data_state.epoch
    metrics["reward/timeouts"] = float(result.reward_timeouts)
    return metrics


def logged_samples(run: Run, result: StepResult) -> list[dict]:
    """The first `trainer.log_generations` responses of the step, decoded (samples.jsonl)."""
    decode = run.tokenizer.decode
    return [{"prompt": decode(result.prompt_ids[i]), "response": decode(result.responses[i], skip_special_tokens=True),
             "ground_truth": result.truths[i], "score": float(result.scores[i])}
            for i in range(min(run.config.trainer.log_generations, len(result.responses)))]


def train(config: ExperimentConfig) -> dict:
    """Runs (or resumes) the GRPO loop; returns the last step's metrics."""
    from mathgrpo.tracking import plots, sinks

    run = setup(config)
    trainer, metrics = config.trainer, {}
    try:
        if trainer.val_before_train and run.start_step == 0 and run.val_records:
            run.logger.log(0, run_validation(config, run.engine, run.val_records, run.tokenizer, 0, run.run_dir,
                                             run.pool))
        for step in range(run.start_step + 1, run.total_steps + 1):
            timer, step_start = Timer(), time.perf_counter()
            prompts_batch, run.data_state = run.batches.next(run.data_state)
            result = rl_step(run, step, prompts_batch, timer)
            metrics = dict(result.metrics)
            last = step == run.total_steps
            if run.val_records and (step % trainer.test_freq == 0 or last):
                with timer("testing"):
                    metrics.update(run_validation(config, run.engine, run.val_records, run.tokenizer, step,
                                                  run.run_dir, run.pool))
            if step % trainer.save_freq == 0 or last:
                with timer("save_checkpoint"):
                    save_checkpoint(run.checkpointer, step, run.state, run.checkpoint_extra(step))
                _maybe_kill("save", step)
            timer.seconds["step"] = time.perf_counter() - step_start
            metrics.update(step_metrics(run, step, result, timer))
            run.logger.log(step, metrics, logged_samples(run, result))
        wait_for_checkpoint(run.checkpointer)
        if trainer.export_hf:
            export_dir = os.path.join(run.run_dir, "hf")
            hf.save(run.model_config, run.state.params, export_dir, dtype=trainer.export_dtype,
                    tokenizer_dir=run.tokenizer_dir)
            log(f"exported the final policy to {export_dir}")
    finally:
        run.close()
    metrics_file = os.path.join(run.run_dir, "metrics.jsonl")
    if is_main_process() and os.path.exists(metrics_file):
        try:
            plots.plot_curves(sinks.read_metrics_jsonl(metrics_file), os.path.join(run.run_dir, "curves.png"))
        except ValueError as error:  # nothing finite to draw yet
            log(f"no curves plotted: {error}")
    return metrics


def main(args) -> int:
    from mathgrpo.config import load_config

    config = load_config(args.config, args.overrides)
    try:
        metrics = train(config)
    except factory.EngineUnavailable as error:  # raised before any work
        raise SystemExit(f"train: {error}") from None
    log(json.dumps({k: v for k, v in metrics.items() if isinstance(v, (int, float))}))
    return 0
