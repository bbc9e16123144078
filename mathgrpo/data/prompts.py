"""Prompts from verl-schema parquet: chat template, length filter, deterministic resumable batches.

The schema is verl's RL parquet (docs/recipe.md §4): `prompt` is a list of `{role, content}` chat messages
(`DataConfig.prompt_key`), `reward_model.ground_truth` is the answer the reward grades against,
`data_source` names the set (the reward and the `val-core/<data_source>/...` metrics key on it) and
`extra_info` is passed through untouched. A plain-string `prompt` is accepted too and becomes one user
message. Each row is rendered as verl's `RLHFDataset` does it (docs/recipe.md §1.3):

    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False,
                                         enable_thinking=False)           # the recipe's kwargs
    ids  = tokenizer(text, add_special_tokens=False)["input_ids"]

which for Qwen3 is `<|im_start|>user\\n{content}<|im_end|>\\n<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n`.
All rows of a read are rendered and tokenized in one batched call (the fast tokenizer's Rust batch path).

Bad input, decided case by case; a *skip* is counted in `DataSummary.skipped` under its reason:
- the file lacks the prompt column, `reward_model` (a struct with a `ground_truth` field) or
  `data_source`, or a column has the wrong type: `DataError` naming the column, the file and what was
  expected. A schema mistake is never one row's problem, so nothing is read.
- an empty prompt (null, `""`, `[]`, or messages whose contents are all blank): skip "empty prompt".
  A message with no role is malformed (error).
- a null, NaN or blank ground truth: skip "missing ground truth" (no answer can be graded right).
- an int or float ground truth becomes `str(value)`, as ttrl_math's `reward_func` does
  (`compute_score(solution, str(ground_truth))`); a bool, list or dict is an error, since `str()`
  would silently make an answer ("True", "['1', '2']") that no response can match.
- a prompt over `max_prompt_length` tokens: with `filter_overlong_prompts` (the recipe) it is dropped
  and counted in `dropped_overlong` (verl keeps `len <= max_prompt_length`); without it, an error, as
  verl's `truncation='error'`.

Batches: `PromptBatches.next(state)` returns the next `train_batch_size` records and the next
`IteratorState(epoch, position)`, a pure function of (records, config, state), so a checkpointed state
dict resumes exactly where an uninterrupted run would be. Order is the file order (the recipe's
`data.shuffle=False`, verl's SequentialSampler) or a permutation drawn per epoch from
`default_rng([seed, epoch])`; departure: verl shuffles with a torch Generator, so its shuffled order
differs from ours (the recipe does not shuffle). With `drop_last` (verl's train dataloader) an epoch
has ⌊N / batch⌋ steps: 279 for the 17,917-row recipe file.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from typing import Any, Iterator, Sequence

import numpy as np

from mathgrpo.config import ConfigError, DataConfig  # noqa: F401  (DataConfig lives in the config tree)


class DataError(ValueError):
    """Input that cannot be used: the message names the file, column or row and what was expected."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class PromptRecord:
    index: int  # row in its file
    messages: tuple[dict[str, str], ...]  # the chat, {role, content} each
    prompt_ids: tuple[int, ...]  # chat template applied, add_special_tokens=False
    ground_truth: str
    data_source: str
    extra_info: dict[str, Any]


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataSummary:
    """What a read found; `str()` is the line the trainer prints."""

    files: tuple[str, ...]
    rows: int
    kept: int
    dropped_overlong: int
    skipped: dict[str, int]  # reason -> rows
    max_prompt_length: int
    longest_prompt: int  # tokens, over kept records (0 if none)
    mean_prompt: float  # tokens, over kept records
    seconds: float

    def __str__(self) -> str:
        names = ", ".join(os.path.basename(path) for path in self.files)
        skipped = ", ".join(f"{count} {reason}" for reason, count in sorted(self.skipped.items())) or "none"
        return (f"{names}: {self.rows} rows, kept {self.kept}, dropped {self.dropped_overlong} over "
                f"{self.max_prompt_length} prompt tokens, skipped {skipped}; prompt tokens mean "
                f"{self.mean_prompt:.1f} max {self.longest_prompt}; {self.seconds:.1f} s")


def load_tokenizer(path: str | os.PathLike):
    """A HF tokenizer dir (or model dir) that has a chat template, as verl requires."""
    from transformers import AutoTokenizer  # lazy: heavy import

    if not os.path.isdir(path):
        raise DataError(f"tokenizer {os.fspath(path)!r} is not a directory (expected a HF tokenizer or model dir)")
    tokenizer = AutoTokenizer.from_pretrained(path)
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(f"tokenizer at {os.fspath(path)!r} has no chat_template; the prompts are chats")
    return tokenizer


# ---------------------------------------------------------------------------------------------------
# Reading.


def _check_schema(schema, path: str, prompt_key: str) -> None:
    import pyarrow as pa

    def need(column: str, expected: str) -> Any:
        if column not in schema.names:
            raise DataError(f"{path}: no column {column!r} (expected {expected}); columns are {schema.names}")
        return schema.field(column).type

    prompt_type = need(prompt_key, "a chat list of {role, content} messages or a string")
    if pa.types.is_list(prompt_type) or pa.types.is_large_list(prompt_type):
        element = prompt_type.value_type
        if not (pa.types.is_struct(element) and {"role", "content"} <= {f.name for f in element}):
            raise DataError(f"{path}: column {prompt_key!r} is a list of {element}; expected "
                            "messages struct<role, content>")
    elif not (pa.types.is_string(prompt_type) or pa.types.is_large_string(prompt_type)):
        raise DataError(f"{path}: column {prompt_key!r} has type {prompt_type}; expected a chat list "
                        "of {role, content} messages or a string")
    reward_type = need("reward_model", "a struct with a ground_truth field")
    if not pa.types.is_struct(reward_type) or "ground_truth" not in {f.name for f in reward_type}:
        raise DataError(f"{path}: column 'reward_model' has type {reward_type}; expected a struct "
                        "with a ground_truth field (reward_model.ground_truth)")
    source_type = need("data_source", "a string naming the set, e.g. 'AIME24'")
    if not (pa.types.is_string(source_type) or pa.types.is_large_string(source_type)):
        raise DataError(f"{path}: column 'data_source' has type {source_type}; expected a string")


def _messages(prompt: Any, path: str, row: int) -> tuple[dict[str, str], ...] | None:
    """The chat of one row; None if it is empty."""
    if prompt is None:
        return None
    if isinstance(prompt, str):
        return ({"role": "user", "content": prompt},) if prompt.strip() else None
    messages = []
    for number, message in enumerate(prompt):
        if message is None or not message.get("role"):
            raise DataError(f"{path}: row {row}: message {number} has no role (expected {{role, content}})")
        messages.append({"role": message["role"], "content": message.get("content") or ""})
    return tuple(messages) if any(m["content"].strip() for m in messages) else None


def _ground_truth(value: Any, path: str, row: int) -> str | None:
    """`str(ground_truth)` as ttrl_math does; None if it is missing."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float, type(None))):
        raise DataError(f"{path}: row {row}: reward_model.ground_truth is {value!r} ({type(value).__name__}); "
                        "expected one answer as a string or a number")
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    text = str(value)
    return text if text.strip() else None


def read_prompts(paths: Sequence[str | os.PathLike], tokenizer, config: DataConfig
                 ) -> tuple[tuple[PromptRecord, ...], DataSummary]:
    """Reads verl-schema parquet files (concatenated in order) into tokenized prompt records."""
    import pyarrow.parquet as pq

    start = time.perf_counter()
    paths = tuple(os.fspath(path) for path in paths)
    if not paths:
        raise DataError("no parquet files to read (data.train_files / data.val_files is empty)")
    skipped: dict[str, int] = {}
    pending: list[tuple[str, int, tuple[dict[str, str], ...], str, str, dict]] = []
    rows = 0
    for path in paths:
        if not os.path.isfile(path):
            raise DataError(f"{path}: no such parquet file")
        table = pq.read_table(path)
        _check_schema(table.schema, path, config.prompt_key)
        prompts = table.column(config.prompt_key).to_pylist()
        rewards = table.column("reward_model").to_pylist()
        sources = table.column("data_source").to_pylist()
        extras = (table.column("extra_info").to_pylist() if "extra_info" in table.schema.names
                  else [None] * table.num_rows)
        rows += table.num_rows
        for row, (prompt, reward, source, extra) in enumerate(zip(prompts, rewards, sources, extras)):
            messages = _messages(prompt, path, row)
            if messages is None:
                skipped["empty prompt"] = skipped.get("empty prompt", 0) + 1
                continue
            answer = _ground_truth(None if reward is None else reward.get("ground_truth"), path, row)
            if answer is None:
                skipped["missing ground truth"] = skipped.get("missing ground truth", 0) + 1
                continue
            pending.append((path, row, messages, answer, source or "", dict(extra or {})))

    texts, token_ids = [], []
    if pending:  # one batched render and one batched tokenization: ~3 s for the 17,917-row file
        texts = tokenizer.apply_chat_template([list(item[2]) for item in pending], tokenize=False,
                                              add_generation_prompt=True, enable_thinking=config.enable_thinking)
        token_ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    records, dropped = [], 0
    for (path, row, messages, answer, source, extra), ids in zip(pending, token_ids):
        if len(ids) > config.max_prompt_length:
            if not config.filter_overlong_prompts:
                raise DataError(f"{path}: row {row}: prompt length {len(ids)} is longer than "
                                f"data.max_prompt_length={config.max_prompt_length} (verl's truncation='error'); "
                                "set data.filter_overlong_prompts=true to drop such prompts")
            dropped += 1
            continue
        records.append(PromptRecord(index=row, messages=messages, prompt_ids=tuple(ids), ground_truth=answer,
                                    data_source=source, extra_info=extra))
    lengths = [len(record.prompt_ids) for record in records]
    summary = DataSummary(files=paths, rows=rows, kept=len(records), dropped_overlong=dropped, skipped=skipped,
                          max_prompt_length=config.max_prompt_length, longest_prompt=max(lengths, default=0),
                          mean_prompt=float(np.mean(lengths)) if lengths else 0.0,
                          seconds=time.perf_counter() - start)
    return tuple(records), summary


# ---------------------------------------------------------------------------------------------------
# Batches over an explicit, checkpointable state.


@dataclasses.dataclass(frozen=True, kw_only=True)
class IteratorState:
    epoch: int = 0
    position: int = 0  # batches already taken in this epoch

    def __post_init__(self):
        for name in ("epoch", "position"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise DataError(f"iterator state {name} must be an integer >= 0, got {value!r}")

    def to_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "IteratorState":
        if not isinstance(data, dict) or set(data) != {"epoch", "position"}:
            raise DataError(f"iterator state: expected {{'epoch', 'position'}}, got {data!r}")
        # Checkpoint formats may hand back numpy integers.
        return cls(**{key: int(value) if isinstance(value, np.integer) else value for key, value in data.items()})


@dataclasses.dataclass(frozen=True)
class PromptBatches:
    """Batches of `batch_size` records over epochs; `next(state)` is pure, so resuming is exact."""

    records: tuple[PromptRecord, ...]
    batch_size: int
    shuffle: bool = False
    seed: int = 0
    drop_last: bool = True

    @classmethod
    def from_config(cls, records: Sequence[PromptRecord], config: DataConfig) -> "PromptBatches":
        return cls(tuple(records), config.train_batch_size, config.shuffle, config.seed, config.drop_last)

    def __post_init__(self):
        if self.batch_size < 1:
            raise DataError(f"batch size must be >= 1, got {self.batch_size}")
        if self.steps_per_epoch == 0:
            raise DataError(f"{len(self.records)} prompts make no batch of data.train_batch_size="
                            f"{self.batch_size}" + (" with drop_last" if self.drop_last and self.records else ""))

    @property
    def steps_per_epoch(self) -> int:
        whole, rest = divmod(len(self.records), self.batch_size)
        return whole + (1 if rest and not self.drop_last else 0)

    def order(self, epoch: int) -> np.ndarray:
        """The record indices of an epoch, in the order batches take them."""
        if not self.shuffle:
            return np.arange(len(self.records))
        # [seed, epoch] seeds a SeedSequence: distinct (seed, epoch) pairs never share an order
        # (seed + epoch would: seed 0 epoch 1 == seed 1 epoch 0).
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.records))

    def next(self, state: IteratorState) -> tuple[tuple[PromptRecord, ...], IteratorState]:
        """The batch at `state` and the state after it (an epoch ends after `steps_per_epoch` batches)."""
        epoch, position = state.epoch, state.position
        if position >= self.steps_per_epoch:
            epoch, position = epoch + 1, 0
        indices = self.order(epoch)[position * self.batch_size:(position + 1) * self.batch_size]
        return tuple(self.records[i] for i in indices), IteratorState(epoch=epoch, position=position + 1)

    def iterate(self, state: IteratorState = IteratorState(), num_batches: int | None = None
                ) -> Iterator[tuple[tuple[PromptRecord, ...], IteratorState]]:
        """Yields (batch, state after it); save the state to resume after that batch."""
        taken = 0
        while num_batches is None or taken < num_batches:
            batch, state = self.next(state)
            yield batch, state
            taken += 1
