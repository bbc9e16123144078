"""The `generate` command: sample completions of one chat prompt and print them.

    python -m mathgrpo generate --model HF_DIR_or_CKPT --prompt "What is 2 + 3?" \\
        [--n 4 --max-tokens 256 --temperature 1.0 --top-p 1.0 --top-k -1 --seed 0 --engine jax|vllm --tokenizer DIR]

The prompt is one user message rendered with the tokenizer's chat template (enable_thinking=False, as
the recipe's data), so it is what the policy sees in training. `--model` is a HF directory (config.json)
or an Orbax params checkpoint (meta/; its tokenizer is the one it records, or --tokenizer). Responses
stop on the generation config's EOS ids, the tokenizer's EOS, `<|im_end|>` and `<|endoftext|>`.
`--temperature 0` is greedy. Each completion is printed decoded (special tokens skipped), with its
finish reason, length and mean log-prob under softmax(logits / T) (greedy: T = 1), the engines' contract.
The JAX sampler is the default and runs anywhere; `--engine vllm` runs vLLM (its CPU build on a CPU).
"""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from mathgrpo.config import ENGINES

    parser.add_argument("--model", required=True, help="HF model directory or Orbax params checkpoint")
    parser.add_argument("--prompt", required=True, help="the user message")
    parser.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the model's)")
    parser.add_argument("--n", type=int, default=1, help="completions to sample")
    parser.add_argument("--max-tokens", type=int, default=256, help="most new tokens per completion")
    parser.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=-1, help="-1 or 0 = off")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-slots", type=int, default=None,
                        help="JAX engine: continuous batching over a pool of this many rows (default: one static "
                             "batch of every row)")
    parser.add_argument("--engine", default="jax", choices=list(ENGINES))
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="dtype of the loaded params (JAX sampler)")
    parser.add_argument("--compute-dtype", default="bfloat16", choices=["float32", "bfloat16"],
                        help="matmul dtype of either engine (model.compute_dtype)")


def chat_prompt_ids(tokenizer, message: str) -> list[int]:
    """One user message through the chat template, tokenized as data.read_prompts does."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": message}], tokenize=False,
                                         add_generation_prompt=True, enable_thinking=False)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def main(args: argparse.Namespace) -> int:
    from mathgrpo.config import RolloutConfig
    from mathgrpo.rollout import factory
    from mathgrpo.rollout.base import SamplingParams

    try:
        params = SamplingParams(n=args.n, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                                max_tokens=args.max_tokens, seed=args.seed)
    except ValueError as error:
        raise SystemExit(f"generate: {error}") from None
    # eager: one prompt, so vLLM's start-up (CUDA graphs, torch.compile) would cost more than it saves.
    rollout = RolloutConfig(engine=args.engine, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                            enforce_eager=True, max_slots=args.max_slots)
    try:
        factory.prepare(args.engine, rollout)  # before JAX starts and before a large model loads
    except factory.EngineUnavailable as error:
        raise SystemExit(f"generate: {error}") from None
    import numpy as np

    from mathgrpo.data.prompts import load_tokenizer
    from mathgrpo.weights.policy import load_policy

    try:
        config, weights, tokenizer_dir, generation_config = load_policy(
            args.model, dtype=args.dtype, tokenizer_dir=args.tokenizer, compute_dtype=args.compute_dtype)
    except FileNotFoundError as error:
        raise SystemExit(f"generate: --model {error}") from None
    tokenizer = load_tokenizer(tokenizer_dir)
    from mathgrpo.eval.validate import default_stop_token_ids

    params = params.replace(stop_token_ids=default_stop_token_ids(tokenizer, generation_config))
    prompt = chat_prompt_ids(tokenizer, args.prompt)
    max_length = len(prompt) + args.max_tokens
    try:
        engine = factory.make_engine(args.engine, config, weights, max_length=max_length, rollout=rollout,
                                     seed=args.seed, sampling=params)
    except ValueError as error:  # a model or settings the engine cannot serve
        raise SystemExit(f"generate: {error}") from None
    batch = engine.generate([prompt], params)
    print(f"prompt: {len(prompt)} tokens; engine {args.engine}; n={params.n}, temperature={params.temperature}, "
          f"top_p={params.top_p}, top_k={params.top_k}, max_tokens={params.max_tokens}, seed={params.seed}; "
          f"stop tokens {list(params.stop_token_ids)}")
    for r in range(len(batch)):
        logprobs = batch.response_logprobs(r)
        print(f"--- completion {r + 1}/{len(batch)}: finish={batch.finish_reasons[r]}, {batch.lengths[r]} tokens, "
              f"mean log-prob {float(np.mean(logprobs)):.4f}")
        print(tokenizer.decode(batch.response(r), skip_special_tokens=True))
    sys.stdout.flush()
    return 0
