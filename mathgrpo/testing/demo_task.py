"""The embedded default task (`make demo`): arithmetic in verl's schema, a character tokenizer, a tiny Qwen3.

Everything real-sized in mathgrpo works on these unchanged: the tokenizer is a Hugging Face
tokenizer directory (built with the `tokenizers` library, with a Qwen-style chat template) loaded
through `AutoTokenizer`; the data are verl-schema parquet files read by data/prompts.py; the model is a
Qwen3 HF directory (config.json + safetensors) written by weights/hf.py; answers are graded by the recipe's
`math_reward` from a `\\boxed{}`.

Task: "problem 417: 3+8=?" with single-digit operands. Every prompt is unique (its number); the
held-out prompts never appear in training, while the arithmetic facts they ask are the same small
table — like a held-out math benchmark whose skills the training set teaches. A tiny model cannot
infer unseen addition facts from a few hundred examples, so held-out *facts* would measure nothing
GRPO can move; held-out *problems* measure whether the policy answers reliably.
"""

from __future__ import annotations

import json
import os

import numpy as np

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>", "<unk>")
CHARACTERS = "0123456789abcdefghijklmnopqrstuvwxyz+-*=?.,:;!()[]{}\\/ \n'\"$%&^_<>|#@~`"
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
DATA_SOURCE = "arith"


def build_tokenizer(directory: str | os.PathLike) -> str:
    """A character-level HF tokenizer (special tokens first, then one token per character), saved to
    `directory` with a chat template; returns the directory."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + tuple(CHARACTERS))}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   unk_token="<unk>")
    fast.chat_template = CHAT_TEMPLATE
    os.makedirs(directory, exist_ok=True)
    fast.save_pretrained(os.fspath(directory))
    return os.fspath(directory)


def vocab_size() -> int:
    return len(SPECIAL_TOKENS) + len(CHARACTERS)


def problems(train_size: int, held_out: int, seed: int, operand_limit: int = 10
             ) -> tuple[list[tuple[int, int, int]], list[tuple[int, int, int]]]:
    """(problem number, a, b) triples; numbers are distinct, so no held-out prompt is in training."""
    rng = np.random.default_rng(seed)
    numbers = rng.choice(10_000, size=train_size + held_out, replace=False)
    operands = rng.integers(0, operand_limit, size=(train_size + held_out, 2))
    triples = [(int(k), int(a), int(b)) for k, (a, b) in zip(numbers, operands)]
    return triples[held_out:], triples[:held_out]


def prompt_text(number: int, a: int, b: int) -> str:
    return f"problem {number}: {a}+{b}=?"


def response_text(a: int, b: int, answer: int | None = None) -> str:
    """A response: restate the sum, then the boxed answer (a one-step "chain of thought" that puts the
    operands right before the answer, where a two-layer model can attend to them)."""
    return f"{a}+{b}=\\boxed{{{a + b if answer is None else answer}}}"


def write_parquet(path: str | os.PathLike, pairs: list[tuple[int, int, int]], split: str) -> None:
    """verl's RL schema: prompt (chat list), data_source, ability, reward_model, extra_info."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{
        "prompt": [{"role": "user", "content": prompt_text(k, a, b)}],
        "data_source": DATA_SOURCE,
        "ability": "math",
        "reward_model": {"ground_truth": str(a + b), "style": "rule"},
        "extra_info": {"index": f"{split}-{i}", "split": split},
    } for i, (k, a, b) in enumerate(pairs)]
    pq.write_table(pa.Table.from_pylist(rows), os.fspath(path))


def write_sft_jsonl(path: str | os.PathLike, pairs: list[tuple[int, int, int]], *, noise: float, seed: int) -> None:
    """Demonstrations for the warm start: the prompt chat and a target response, a `noise` fraction of
    them off by one (a+b+1). Imitating them gives the weak base policy the demo starts GRPO from: it
    writes `\\boxed{}` and knows the sums, but is right only part of the time — what a verifiable
    reward can fix and imitation cannot."""
    rng = np.random.default_rng(seed)
    with open(path, "w") as f:
        for k, a, b in pairs:
            answer = a + b + 1 if rng.random() < noise else a + b
            f.write(json.dumps({"messages": [{"role": "user", "content": prompt_text(k, a, b)}],
                                "response": response_text(a, b, answer)}) + "\n")


def build_task(directory: str | os.PathLike, *, train_size: int = 1024, held_out: int = 64, seed: int = 0,
               operand_limit: int = 10, noise: float = 0.5) -> dict:
    """Writes tokenizer/, train.parquet, val.parquet and sft.jsonl under `directory`; returns their paths."""
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    train, val = problems(train_size, held_out, seed, operand_limit)
    paths = {
        "tokenizer": build_tokenizer(os.path.join(directory, "tokenizer")),
        "train": os.path.join(directory, "train.parquet"),
        "val": os.path.join(directory, "val.parquet"),
        "sft": os.path.join(directory, "sft.jsonl"),
    }
    write_parquet(paths["train"], train, "train")
    write_parquet(paths["val"], val, "val")
    write_sft_jsonl(paths["sft"], train, noise=noise, seed=seed)
    return paths


def build_model(directory: str | os.PathLike, tokenizer_dir: str, *, seed: int = 0, **overrides) -> str:
    """A randomly initialized tiny Qwen3 written as a HF directory (fp32) with the tokenizer beside it.
    head_dim 32 (4 heads x 32 = hidden 128): the smallest vLLM's CPU attention supports, so the demo's
    policy also runs with rollout.engine=vllm."""
    import jax

    from mathgrpo.config import ModelConfig
    from mathgrpo.model import init_params
    from mathgrpo.weights import hf

    values = dict(vocab_size=vocab_size(), hidden_size=128, intermediate_size=384, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=32, rope_theta=10_000.0,
                  tie_word_embeddings=True, max_position_embeddings=256, bos_token_id=0, eos_token_id=2,
                  compute_dtype="float32")
    values.update(overrides)
    config = ModelConfig(**values)
    hf.save(config, init_params(config, jax.random.key(seed)), directory, dtype="float32",
               tokenizer_dir=tokenizer_dir)
    return os.fspath(directory)
