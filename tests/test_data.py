"""mathgrpo.data and scripts/prepare_data.py on the real parquet files and the real Qwen3 tokenizer."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mathgrpo.config import ConfigError, DataConfig, from_dict
from mathgrpo.data.prompts import DataError, IteratorState, PromptBatches, PromptRecord, load_tokenizer, read_prompts

ROOT = Path(__file__).resolve().parents[1]
TRAIN = "dapo_math_17k_processed.parquet"
SUFFIX = " Please reason step by step, and put your final answer within \\boxed{}."


def recipe_prompt(content: str) -> str:
    """docs/recipe.md §1.3: Qwen3's template with enable_thinking=False, written out by hand."""
    return f"<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"


@pytest.fixture(scope="module")
def tokenizer(qwen3_tokenizer_dir):
    return load_tokenizer(qwen3_tokenizer_dir)


@pytest.fixture(scope="module")
def train(recipe_data, tokenizer):
    """The whole recipe train file, read once (about 4 s on 2 cores)."""
    config = DataConfig(train_files=(str(recipe_data / TRAIN),))
    return read_prompts(config.train_files, tokenizer, config)


def write(path, columns: dict) -> str:
    pq.write_table(pa.table(columns), path)
    return str(path)


def verl_columns(prompts, answers, prompt_type=None, answer_type=pa.string()):
    """A small verl-schema table; `answers` may hold non-strings with a matching `answer_type`."""
    n = len(prompts)
    return {
        "prompt": pa.array(prompts, type=prompt_type),
        "data_source": pa.array(["synthetic"] * n),
        "reward_model": pa.array([{"ground_truth": a, "style": "rule"} for a in answers],
                                 type=pa.struct([("ground_truth", answer_type), ("style", pa.string())])),
        "extra_info": pa.array([{"index": str(i)} for i in range(n)]),
    }


def chat(content):
    return [{"role": "user", "content": content}]


# ---------------------------------------------------------------------------------------------------
# The real files.


def test_train_file_reads_with_overlong_prompts_dropped(recipe_data, tokenizer, train):
    records, summary = train
    table = pq.read_table(recipe_data / TRAIN)
    assert summary.rows == table.num_rows == 17917  # docs/recipe.md §1.3
    assert summary.skipped == {}
    assert summary.kept + summary.dropped_overlong == 17917 and summary.dropped_overlong > 0
    assert all(len(record.prompt_ids) <= 1024 for record in records)
    assert summary.longest_prompt == max(len(record.prompt_ids) for record in records)
    # The dropped rows are exactly the ones whose prompt, tokenized on its own, is over 1024 tokens.
    dropped = sorted(set(range(17917)) - {record.index for record in records})
    assert len(dropped) == summary.dropped_overlong
    prompts = table.column("prompt").to_pylist()
    for row in dropped:
        ids = tokenizer(recipe_prompt(prompts[row][0]["content"]), add_special_tokens=False)["input_ids"]
        assert len(ids) > 1024
    # Batched tokenization equals one-at-a-time tokenization of the hand-written template.
    answers = table.column("reward_model").to_pylist()
    for record in [records[i] for i in np.random.default_rng(0).choice(len(records), 16, replace=False)]:
        content = prompts[record.index][0]["content"]
        assert record.messages == ({"role": "user", "content": content},)
        assert list(record.prompt_ids) == tokenizer(recipe_prompt(content), add_special_tokens=False)["input_ids"]
        assert record.ground_truth == answers[record.index]["ground_truth"]
        assert record.data_source == "math_dapo" and set(record.extra_info) == {"index"}
    assert f"17917 rows, kept {summary.kept}, dropped {summary.dropped_overlong}" in str(summary)


def test_steps_per_epoch_of_the_recipe(train):
    records, summary = train
    batches = PromptBatches.from_config(records, DataConfig())
    # verl drops the last partial batch: 17,917 // 64 = 279 (279 * 64 = 17,856), and the 17,917 - 8
    # kept after the length filter give the same: 17,909 // 64 = 279.
    assert batches.steps_per_epoch == 279 == summary.kept // 64
    assert PromptBatches(records, 64, drop_last=False).steps_per_epoch == 280
    # Sequential order (data.shuffle=False): step 279 is the first batch of epoch 1, records 0..63.
    batch, state = batches.next(IteratorState(epoch=0, position=279))
    assert batch == records[:64] and state == IteratorState(epoch=1, position=1)
    last, _ = batches.next(IteratorState(epoch=0, position=278))
    assert last == records[278 * 64:279 * 64]


@pytest.mark.parametrize("name, rows, source", [("aime24.parquet", 30, "AIME24"), ("aime25.parquet", 30, "AIME25"),
                                                ("amc23.parquet", 83, "AMC23"), ("math500.parquet", 500, "MATH-500")])
def test_validation_files_read(recipe_data, tokenizer, name, rows, source):
    config = DataConfig(val_files=(str(recipe_data / name),))
    records, summary = read_prompts(config.val_files, tokenizer, config)
    table = pq.read_table(recipe_data / name).to_pylist()
    assert summary.rows == len(table) == rows and summary.kept == rows and summary.skipped == {}
    for record, row in zip(records, table):
        assert record.ground_truth == row["reward_model"]["ground_truth"] and record.data_source == source
        assert record.extra_info == row["extra_info"] and record.messages[0]["content"].endswith(SUFFIX)


def test_aime24_prompt_is_the_recipe_template(recipe_data, tokenizer):
    config = DataConfig(val_files=(str(recipe_data / "aime24.parquet"),))
    records, _ = read_prompts(config.val_files, tokenizer, config)
    content = pq.read_table(recipe_data / "aime24.parquet").column("prompt").to_pylist()[0][0]["content"]
    expected = tokenizer(recipe_prompt(content), add_special_tokens=False)["input_ids"]
    assert list(records[0].prompt_ids) == expected
    assert expected[0] == 151644 and expected[-7:] == [151644, 77091, 198, 151667, 271, 151668, 271]
    # enable_thinking=True leaves the think block to the model: the prompt ends at "assistant\n".
    thinking = DataConfig(val_files=config.val_files, enable_thinking=True)
    records, _ = read_prompts(thinking.val_files, tokenizer, thinking)
    assert tokenizer.decode(records[0].prompt_ids).endswith("<|im_end|>\n<|im_start|>assistant\n")


def test_overlong_prompts_are_dropped_and_counted_or_rejected(recipe_data, tokenizer):
    path = str(recipe_data / "aime24.parquet")
    contents = [m[0]["content"] for m in pq.read_table(path).column("prompt").to_pylist()]
    lengths = [len(tokenizer(recipe_prompt(c), add_special_tokens=False)["input_ids"]) for c in contents]
    limit = sorted(lengths)[len(lengths) // 2]  # some prompts pass, some do not, one is exactly at it
    config = DataConfig(val_files=(path,), max_prompt_length=limit)
    records, summary = read_prompts(config.val_files, tokenizer, config)
    assert summary.dropped_overlong == sum(length > limit for length in lengths) > 0
    assert [r.index for r in records] == [i for i, length in enumerate(lengths) if length <= limit]
    assert max(len(r.prompt_ids) for r in records) == limit  # verl keeps len <= max_prompt_length
    first_over = next(i for i, length in enumerate(lengths) if length > limit)
    strict = DataConfig(val_files=(path,), max_prompt_length=limit, filter_overlong_prompts=False)
    with pytest.raises(DataError, match=rf"row {first_over}: prompt length {lengths[first_over]} is longer than "
                                        rf"data.max_prompt_length={limit}"):
        read_prompts(strict.val_files, tokenizer, strict)


# ---------------------------------------------------------------------------------------------------
# Bad input.


@pytest.mark.parametrize("drop, column", [("prompt", "prompt"), ("reward_model", "reward_model"),
                                          ("data_source", "data_source")])
def test_missing_column_is_an_error_naming_it(tmp_path, tokenizer, drop, column):
    columns = verl_columns([chat("1+1?")], ["2"])
    del columns[drop]
    path = write(tmp_path / "bad.parquet", columns)
    with pytest.raises(DataError, match=rf"bad.parquet: no column '{column}' \(expected"):
        read_prompts([path], tokenizer, DataConfig())


def test_wrong_column_types_are_errors(tmp_path, tokenizer):
    columns = verl_columns([chat("1+1?")], ["2"])
    columns["prompt"] = pa.array([7])
    with pytest.raises(DataError, match="column 'prompt' has type int64; expected a chat list"):
        read_prompts([write(tmp_path / "a.parquet", columns)], tokenizer, DataConfig())
    columns = verl_columns([chat("1+1?")], ["2"])
    columns["reward_model"] = pa.array([{"answer": "2"}])
    with pytest.raises(DataError, match="reward_model.ground_truth"):
        read_prompts([write(tmp_path / "b.parquet", columns)], tokenizer, DataConfig())
    columns = verl_columns([chat("1+1?")], ["2"])
    columns["question"] = columns.pop("prompt")
    with pytest.raises(DataError, match="no column 'prompt'"):
        read_prompts([write(tmp_path / "c.parquet", columns)], tokenizer, DataConfig())
    # ... which data.prompt_key names.
    records, _ = read_prompts([str(tmp_path / "c.parquet")], tokenizer, DataConfig(prompt_key="question"))
    assert records[0].messages == ({"role": "user", "content": "1+1?"},)
    with pytest.raises(DataError, match="no such parquet file"):
        read_prompts([str(tmp_path / "absent.parquet")], tokenizer, DataConfig())
    with pytest.raises(DataError, match="no parquet files"):
        read_prompts([], tokenizer, DataConfig())


def test_empty_prompts_are_skipped_and_string_prompts_are_one_user_message(tmp_path, tokenizer):
    prompts = [chat("What is 2+3?"), None, [], chat("   "), chat("Hi"), [{"role": "system", "content": ""}]]
    path = write(tmp_path / "chats.parquet", verl_columns(prompts, list("501234")))
    records, summary = read_prompts([path], tokenizer, DataConfig())
    assert [r.index for r in records] == [0, 4] and [r.ground_truth for r in records] == ["5", "3"]
    assert summary.skipped == {"empty prompt": 4} and summary.rows == 6 and summary.kept == 2
    assert "skipped 4 empty prompt" in str(summary)

    path = write(tmp_path / "strings.parquet", verl_columns(["What is 2+3?", "", None], ["5", "1", "2"]))
    records, summary = read_prompts([path], tokenizer, DataConfig())
    assert summary.skipped == {"empty prompt": 2}
    assert records[0].messages == ({"role": "user", "content": "What is 2+3?"},)
    assert list(records[0].prompt_ids) == tokenizer(recipe_prompt("What is 2+3?"),
                                                    add_special_tokens=False)["input_ids"]

    path = write(tmp_path / "norole.parquet", verl_columns([[{"role": None, "content": "x"}]], ["1"]))
    with pytest.raises(DataError, match="row 0: message 0 has no role"):
        read_prompts([path], tokenizer, DataConfig())


def test_ground_truths_numbers_become_strings_missing_ones_are_skipped(tmp_path, tokenizer):
    # Integers and floats become str(value), as ttrl_math's reward_func does; null, NaN and "" are skipped.
    prompts = [chat("q")] * 2
    cases = [(pa.int64(), [7, None], ["7"]), (pa.float64(), [142.0, float("nan")], ["142.0"]),
             (pa.string(), ["025", "  "], ["025"])]
    for number, (answer_type, answers, expected) in enumerate(cases):
        path = write(tmp_path / f"gt{number}.parquet", verl_columns(prompts, answers, answer_type=answer_type))
        records, summary = read_prompts([path], tokenizer, DataConfig())
        assert [r.ground_truth for r in records] == expected
        assert summary.skipped == {"missing ground truth": 1}
    # A null reward_model is a missing ground truth too.
    columns = verl_columns(prompts, ["1", "2"])
    columns["reward_model"] = pa.array([None, {"ground_truth": "2", "style": "rule"}],
                                       type=columns["reward_model"].type)
    records, summary = read_prompts([write(tmp_path / "null.parquet", columns)], tokenizer, DataConfig())
    assert [r.ground_truth for r in records] == ["2"] and summary.skipped == {"missing ground truth": 1}
    # A bool or a list would str() into an answer nothing matches: an error.
    for name, answer_type, answers in [("bool", pa.bool_(), [True, False]),
                                       ("list", pa.list_(pa.string()), [["1", "2"], ["3"]])]:
        path = write(tmp_path / f"{name}.parquet", verl_columns(prompts, answers, answer_type=answer_type))
        with pytest.raises(DataError, match="row 0: reward_model.ground_truth is .* expected one answer"):
            read_prompts([path], tokenizer, DataConfig())


def test_tokenizer_must_exist_and_have_a_chat_template(tmp_path, qwen3_tokenizer_dir):
    with pytest.raises(DataError, match="is not a directory"):
        load_tokenizer(tmp_path / "absent")
    for name in ("tokenizer.json", "vocab.json", "merges.txt"):
        (tmp_path / name).write_bytes((qwen3_tokenizer_dir / name).read_bytes())
    config = json.loads((qwen3_tokenizer_dir / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(DataError, match="has no chat_template"):
        load_tokenizer(tmp_path)


# ---------------------------------------------------------------------------------------------------
# Config.


def test_config_defaults_are_the_recipe_and_errors_name_the_field():
    config = DataConfig()
    assert (config.prompt_key, config.max_prompt_length, config.train_batch_size, config.shuffle,
            config.drop_last, config.filter_overlong_prompts, config.enable_thinking) == \
        ("prompt", 1024, 64, False, True, True, False)
    assert DataConfig(train_files=["a.parquet"]).train_files == ("a.parquet",)
    assert from_dict(DataConfig, {"train_files": ["a.parquet"], "shuffle": True}).train_files == ("a.parquet",)
    for field, value in [("train_batch_size", 0), ("max_prompt_length", -1), ("train_files", "a.parquet"),
                         ("val_files", [""]), ("seed", -1), ("shuffle", "yes"), ("prompt_key", ""),
                         ("tokenizer", ""), ("train_batch_size", True)]:
        with pytest.raises(ConfigError, match=rf"data\.{field}"):
            DataConfig(**{field: value})


# ---------------------------------------------------------------------------------------------------
# Batches and resuming.


def fake_records(n):
    return tuple(PromptRecord(index=i, messages=(), prompt_ids=(i,), ground_truth=str(i), data_source="s",
                              extra_info={}) for i in range(n)) if n else ()


def indices(batch):
    return [record.index for record in batch]


@pytest.mark.parametrize("shuffle", [False, True])
def test_resuming_from_a_saved_state_gives_the_uninterrupted_batches(shuffle):
    # 10 records in batches of 3 with drop_last: 3 steps an epoch, so 8 batches cross two epoch boundaries.
    batches = PromptBatches(fake_records(10), 3, shuffle=shuffle, seed=5)
    uninterrupted = [indices(batch) for batch, _ in batches.iterate(num_batches=8)]
    for k in range(9):
        state = IteratorState()
        for _, state in batches.iterate(state, num_batches=k):
            pass
        saved = json.loads(json.dumps(state.to_dict()))  # as a checkpoint stores it
        fresh = PromptBatches(fake_records(10), 3, shuffle=shuffle, seed=5)
        resumed = [indices(batch) for batch, _ in fresh.iterate(IteratorState.from_dict(saved), num_batches=8 - k)]
        assert uninterrupted[:k] + resumed == uninterrupted, k
    epochs = [uninterrupted[0:3], uninterrupted[3:6]]
    for epoch in epochs:  # within an epoch: 9 distinct records, each batch of 3
        flat = sum(epoch, [])
        assert len(set(flat)) == 9 and all(len(batch) == 3 for batch in epoch)
    if shuffle:
        assert epochs[0] != epochs[1]  # a new permutation each epoch
        other_seed = [indices(b) for b, _ in PromptBatches(fake_records(10), 3, shuffle=True, seed=6).iterate(
            num_batches=3)]
        assert other_seed != epochs[0]
    else:
        assert epochs[0] == epochs[1] == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]  # record 9 dropped (drop_last)


def test_without_drop_last_the_partial_batch_is_served_and_tiny_sets_fail():
    batches = PromptBatches(fake_records(10), 3, drop_last=False)
    assert batches.steps_per_epoch == 4
    got = [indices(batch) for batch, _ in batches.iterate(num_batches=5)]
    assert got == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9], [0, 1, 2]]
    shuffled = PromptBatches(fake_records(10), 3, shuffle=True, drop_last=False)
    assert sorted(sum((indices(b) for b, _ in shuffled.iterate(num_batches=4)), [])) == list(range(10))
    with pytest.raises(DataError, match="2 prompts make no batch of data.train_batch_size=3 with drop_last"):
        PromptBatches(fake_records(2), 3)
    with pytest.raises(DataError, match="expected"):
        IteratorState.from_dict({"epoch": 0})
    with pytest.raises(DataError, match="position"):
        IteratorState(position=-1)
    assert IteratorState.from_dict({"epoch": np.int64(2), "position": np.int32(1)}) == IteratorState(epoch=2,
                                                                                                    position=1)


# ---------------------------------------------------------------------------------------------------
# scripts/prepare_data.py


@pytest.fixture(scope="module")
def prepare():
    spec = importlib.util.spec_from_file_location("prepare_data", ROOT / "scripts" / "prepare_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_prepare_open_r1_layout_round_trips(tmp_path, tokenizer, prepare):
    dapo = "Solve the following math problem step by step. ... Answer: $Answer ...\n\n{}\n\nRemember ..."
    problems, answers = ["What is 2+3?", "Compute 6*7."], ["5", "42"]
    source = write(tmp_path / "open_r1.parquet", {
        "prompt": pa.array(problems), "solution": pa.array(answers), "data_source": pa.array(["math_dapo"] * 2),
        "source_prompt": pa.array([chat(dapo.format(p)) for p in problems]), "ability": pa.array(["MATH"] * 2),
        "reward_model": pa.array([{"ground_truth": "5", "style": "rule-lighteval/MATH_v2"}, None]),
        "extra_info": pa.array([{"index": "uuid-0"}, {"index": "uuid-1"}])})
    out = str(tmp_path / "verl.parquet")
    assert prepare.main(["open-r1", source, out]) == 0
    records, summary = read_prompts([out], tokenizer, DataConfig())
    assert summary.kept == 2
    # The second row has no reward_model: its ground truth comes from `solution`.
    assert [r.ground_truth for r in records] == answers and records[1].extra_info["index"] == "uuid-1"
    assert [r.messages[0]["content"] for r in records] == [p + SUFFIX for p in problems]
    assert list(records[0].prompt_ids) == tokenizer(recipe_prompt(problems[0] + SUFFIX),
                                                    add_special_tokens=False)["input_ids"]
    assert prepare.main(["open-r1", source, out, "--use-source-prompt", "--suffix", "unused"]) == 0
    records, _ = read_prompts([out], tokenizer, DataConfig())
    assert records[1].messages == tuple(chat(dapo.format(problems[1])))
    no_solution = write(tmp_path / "nosol.parquet", {"prompt": pa.array(["x"]), "data_source": pa.array(["d"])})
    assert prepare.main(["open-r1", no_solution, out]) == 1


def test_prepare_jsonl_round_trips(tmp_path, tokenizer, prepare, capsys):
    source = tmp_path / "aime.jsonl"
    source.write_text(json.dumps({"question": "Find x.", "final": 204}) + "\n\n"
                      + json.dumps({"question": "Find y.", "final": "025"}) + "\n")
    out = str(tmp_path / "aime.parquet")
    double = " Please reason step by step, and put your final answer within \\boxed{{}}."  # the train file's
    assert prepare.main(["jsonl", str(source), out, "--data-source", "AIME24", "--problem-key", "question",
                         "--answer-key", "final", "--suffix", double]) == 0
    records, _ = read_prompts([out], tokenizer, DataConfig())
    assert [r.ground_truth for r in records] == ["204", "025"] and {r.data_source for r in records} == {"AIME24"}
    assert records[0].messages[0]["content"] == "Find x." + double
    assert records[1].extra_info == {"index": "AIME24-1", "split": "test"}
    assert prepare.main(["jsonl", str(source), out, "--data-source", "AIME24"]) == 1  # keys problem/answer absent
    assert "line 1: expected an object with keys 'problem' and 'answer'" in capsys.readouterr().err
