"""Converts local copies of common math-RL layouts to verl-schema parquet that `mathgrpo.data` reads.

    python scripts/prepare_data.py open-r1 DAPO-Math-17k-Processed/en/train.parquet train.parquet
    python scripts/prepare_data.py jsonl aime24.jsonl aime24.parquet --data-source AIME24 --split test

Layouts:
- `open-r1`: open-r1/DAPO-Math-17k-Processed (docs/recipe.md §4): `prompt` is the bare problem (a string),
  `solution` its answer, plus `data_source`, `source_prompt` (DAPO's original chat, with its
  "Answer:" instructions), `ability`, `reward_model`, `extra_info`. The user message becomes
  `prompt + suffix` (or, with --use-source-prompt, `source_prompt` unchanged); the ground truth is
  `reward_model.ground_truth`, else `solution`.
- `jsonl`: one {problem, answer} object a line (keys configurable); the message is `problem + suffix`.

The default suffix is the validation sets' " Please reason step by step, and put your final answer
within \\boxed{}.". The recipe's 17,917-row train file has the suffix with double braces,
"\\boxed{{}}." (docs/recipe.md §1.3); pass --suffix to reproduce it. Nothing is downloaded.

Output columns: `prompt` (list of {content, role}), `data_source`, `ability`, `reward_model`
{ground_truth (string), style}, `extra_info` {index, split, ...}.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

SUFFIX = " Please reason step by step, and put your final answer within \\boxed{}."
OPEN_R1_COLUMNS = ("prompt", "solution", "data_source")


class PrepareError(ValueError):
    """Input that cannot be converted; the message names the file, row and key."""


def _answer(value: Any, where: str) -> str:
    """The ground truth as a string (verl's reward does `str(ground_truth)`); a missing one is an error."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)) \
            or (isinstance(value, float) and math.isnan(value)) or not str(value).strip():
        raise PrepareError(f"{where}: expected an answer (a string or a number), got {value!r}")
    return str(value)


def _row(content: list[dict[str, str]], answer: str, data_source: str, ability: str, extra: dict) -> dict:
    return {"prompt": content, "data_source": data_source, "ability": ability,
            "reward_model": {"ground_truth": answer, "style": "rule"}, "extra_info": extra}


def convert_open_r1(path: str, *, suffix: str = SUFFIX, use_source_prompt: bool = False,
                    data_source: str | None = None, split: str = "train") -> list[dict]:
    """Rows in verl's schema from an open-r1/DAPO-Math-17k-Processed parquet."""
    table = pq.read_table(path)
    needed = OPEN_R1_COLUMNS + (("source_prompt",) if use_source_prompt else ())
    missing = [column for column in needed if column not in table.schema.names]
    if missing:
        raise PrepareError(f"{path}: no column(s) {missing} (expected the open-r1/DAPO-Math-17k-Processed "
                           f"layout: {list(needed)}); columns are {table.schema.names}")
    rows = []
    for i, item in enumerate(table.to_pylist()):
        where = f"{path}: row {i}"
        if use_source_prompt:
            messages = [{"content": m["content"], "role": m["role"]} for m in item["source_prompt"] or []]
        else:
            if not isinstance(item["prompt"], str) or not item["prompt"].strip():
                raise PrepareError(f"{where}: 'prompt' is {item['prompt']!r}; expected the problem as a string")
            messages = [{"content": item["prompt"] + suffix, "role": "user"}]
        reward = item.get("reward_model")
        answer = reward.get("ground_truth") if isinstance(reward, dict) else None
        answer = _answer(item["solution"] if answer is None else answer, where)
        extra = {"index": str(i), "split": split}
        if isinstance(item.get("extra_info"), dict):
            extra.update({key: str(value) for key, value in item["extra_info"].items() if value is not None})
        rows.append(_row(messages, answer, data_source or item["data_source"] or "math_dapo",
                         item.get("ability") or "MATH", extra))
    return rows


def convert_jsonl(path: str, *, data_source: str, problem_key: str = "problem", answer_key: str = "answer",
                  suffix: str = SUFFIX, ability: str = "math", split: str = "test") -> list[dict]:
    """Rows in verl's schema from a JSONL of {problem, answer} objects."""
    rows = []
    with open(path, encoding="utf-8") as file:
        for number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            where = f"{path}: line {number}"
            try:
                item = json.loads(line)
            except json.JSONDecodeError as error:
                raise PrepareError(f"{where}: not JSON ({error})") from None
            if not isinstance(item, dict) or problem_key not in item or answer_key not in item:
                raise PrepareError(f"{where}: expected an object with keys {problem_key!r} and {answer_key!r}"
                                   f" (set --problem-key / --answer-key), got {line.strip()[:120]!r}")
            problem = item[problem_key]
            if not isinstance(problem, str) or not problem.strip():
                raise PrepareError(f"{where}: {problem_key!r} is {problem!r}; expected the problem as a string")
            extra = {"index": f"{data_source}-{len(rows)}", "split": split}
            rows.append(_row([{"content": problem + suffix, "role": "user"}], _answer(item[answer_key], where),
                             data_source, ability, extra))
    if not rows:
        raise PrepareError(f"{path}: no rows")
    return rows


def write_verl_parquet(rows: list[dict], path: str) -> None:
    prompt = pa.list_(pa.struct([("content", pa.string()), ("role", pa.string())]))
    reward = pa.struct([("ground_truth", pa.string()), ("style", pa.string())])
    columns = {
        "prompt": pa.array([row["prompt"] for row in rows], type=prompt),
        "data_source": pa.array([row["data_source"] for row in rows], type=pa.string()),
        "ability": pa.array([row["ability"] for row in rows], type=pa.string()),
        "reward_model": pa.array([row["reward_model"] for row in rows], type=reward),
        "extra_info": pa.array([row["extra_info"] for row in rows]),  # struct inferred from its keys
    }
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    pq.write_table(pa.table(columns), path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    layouts = parser.add_subparsers(dest="layout", required=True)
    open_r1 = layouts.add_parser("open-r1", help="open-r1/DAPO-Math-17k-Processed parquet")
    jsonl = layouts.add_parser("jsonl", help="JSONL of {problem, answer}")
    for sub in (open_r1, jsonl):
        sub.add_argument("input")
        sub.add_argument("output", help="the verl-schema parquet to write")
        sub.add_argument("--suffix", default=SUFFIX, help='appended to each problem (default: "%(default)s")')
    open_r1.add_argument("--use-source-prompt", action="store_true",
                         help="keep DAPO's original chat (source_prompt) instead of prompt + suffix")
    open_r1.add_argument("--data-source", default=None, help="override the data_source column")
    open_r1.add_argument("--split", default="train")
    jsonl.add_argument("--data-source", required=True, help="e.g. AIME24 (names the val-core metrics)")
    jsonl.add_argument("--problem-key", default="problem")
    jsonl.add_argument("--answer-key", default="answer")
    jsonl.add_argument("--ability", default="math")
    jsonl.add_argument("--split", default="test")
    args = parser.parse_args(argv)
    if not os.path.isfile(args.input):
        print(f"error: {args.input}: no such file", file=sys.stderr)
        return 1
    try:
        if args.layout == "open-r1":
            rows = convert_open_r1(args.input, suffix=args.suffix, use_source_prompt=args.use_source_prompt,
                                   data_source=args.data_source, split=args.split)
        else:
            rows = convert_jsonl(args.input, data_source=args.data_source, problem_key=args.problem_key,
                                 answer_key=args.answer_key, suffix=args.suffix, ability=args.ability,
                                 split=args.split)
    except (PrepareError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    write_verl_parquet(rows, args.output)
    print(f"wrote {len(rows)} rows to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
