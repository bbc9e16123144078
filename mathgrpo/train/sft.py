"""`python -m mathgrpo sft`: a small supervised warm start on the same model and train-step code.

The GRPO train step with every advantage 1, π_old = the detached current policy (ratio ≡ 1) and no
TIS weights has per-token loss −ρ_t and gradient −∇log π(o_t)/N — exactly the gradient of the
token-mean cross-entropy of the targets. So SFT reuses packing, micro-batching, clipping and
AdamW as they are; the reported `sft/cross_entropy` is the token mean of −log π from the step's
own forward pass (before the update).

Input: JSONL lines {"messages": [chat ...], "response": "target text"}; the chat template is applied
to the messages (generation prompt added) and the response is followed by the stop token.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import numpy as np

from mathgrpo.config import ExperimentConfig
from mathgrpo.data.prompts import load_tokenizer
from mathgrpo.parallel import mesh as parallel_mesh
from mathgrpo.parallel import shardings
from mathgrpo.train import packing as train_packing
from mathgrpo.train import state as train_state
from mathgrpo.train import step as train_step_lib
from mathgrpo.train.loop import load_source
from mathgrpo.utils.process import is_main_process, log
from mathgrpo.weights import hf, orbax


def read_examples(path: str, tokenizer, stop_token_id: int, enable_thinking: bool) -> tuple[list, list]:
    prompts, responses = [], []
    with open(path) as f:
        for line_number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                example = json.loads(line)
                messages, response = example["messages"], example["response"]
            except (json.JSONDecodeError, KeyError, TypeError) as error:
                raise ValueError(f"{path}:{line_number}: expected a JSON object with 'messages' and 'response' "
                                 f"({error})") from None
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                                 enable_thinking=enable_thinking)
            prompts.append(np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], np.int32))
            target = tokenizer(response, add_special_tokens=False)["input_ids"] + [stop_token_id]
            responses.append(np.asarray(target, np.int32))
    if not prompts:
        raise ValueError(f"{path}: no examples")
    return prompts, responses


def sft(config: ExperimentConfig, data_path: str, *, steps: int, batch_size: int, lr: float, out: str,
        seed: int = 0) -> dict:
    """Trains `steps` steps of `batch_size` random examples; writes out/params (Orbax) and out/hf."""
    mesh = parallel_mesh.make_mesh(config.mesh)
    rules = parallel_mesh.logical_rules(config.mesh)
    model_config, params, tokenizer_dir, _ = load_source(config, mesh)
    tokenizer = load_tokenizer(tokenizer_dir)
    prompts, responses = read_examples(data_path, tokenizer, config.rollout.stop_token_ids[0],
                                       config.data.enable_thinking)
    algo = dataclasses.replace(config.grpo, rollout_is=None, use_kl_loss=False, entropy_coeff=0.0,
                               loss_agg_mode="token-mean", loss_scaling="global",
                               importance_level="token")
    optim = dataclasses.replace(config.optim, lr=lr)
    optimizer = train_state.make_optimizer(optim)
    state = jax.jit(lambda p: train_state.init_train_state(p, optim),
                    out_shardings=train_state.train_state_shardings(model_config, optimizer, mesh, rules))(params)
    step_fn = train_step_lib.make_train_step(model_config, algo, optim, mesh=mesh, rules=rules)
    batch_shardings = train_packing.batch_shardings(mesh)
    rng = np.random.default_rng(seed)
    rows = parallel_mesh.data_parallel_size(mesh)
    history = []
    for step in range(1, steps + 1):
        chosen = rng.choice(len(prompts), size=min(batch_size, len(prompts)), replace=False)
        batch, placements = train_packing.pack([prompts[i] for i in chosen], [responses[i] for i in chosen],
                                         np.ones(len(chosen)), num_rows=rows, row_length=config.grpo.micro_batch_tokens,
                                         max_sequences_per_row=train_packing.sequence_cap(model_config))
        state, outputs = step_fn(state, shardings.put_global(batch, batch_shardings))
        logprobs = np.concatenate(train_packing.unpack_responses(jax.device_get(outputs["old_logprobs"]), placements))
        history.append(float(-logprobs.mean()))
        if step == 1 or step % 10 == 0 or step == steps:
            log(f"sft step {step}/{steps}: cross-entropy {history[-1]:.4f}")
    if is_main_process():
        os.makedirs(out, exist_ok=True)
    orbax.save_params(os.path.join(out, "params"), model_config, state.params, tokenizer_dir=tokenizer_dir)
    hf.save(model_config, state.params, os.path.join(out, "hf"), dtype=model_config.param_dtype,
               tokenizer_dir=tokenizer_dir)
    return {"sft/cross_entropy": history[-1], "sft/cross_entropy_first": history[0], "sft/steps": steps}


def main(args) -> int:
    from mathgrpo.config import load_config

    config = load_config(args.config, args.overrides)
    result = sft(config, args.data, steps=args.steps, batch_size=args.batch_size, lr=args.lr, out=args.out,
                 seed=args.seed)
    log(json.dumps(result))
    return 0
