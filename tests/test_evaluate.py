"""Validation (`evaluate.validate`) on a scripted engine, and the `eval` command end to end.

References: mean@n and pass@k derived by hand below; best@k / maj@k from verl's bootstrap loop
re-written here (reseed 42, 1000 separate `np.random.choice(n, k)` draws, dict majority vote);
response texts from the real Qwen3 tokenizer.
"""

import argparse
import json
import os
from collections import defaultdict

import numpy as np
import pyarrow.parquet as pq
import pytest

from mathgrpo.data.prompts import PromptRecord, load_tokenizer
from mathgrpo.eval import validate
from mathgrpo.rollout import Rollout, RolloutBatch, SamplingParams
from mathgrpo.weights import hf

N = 4


@pytest.fixture(scope="module")
def tokenizer(qwen3_tokenizer_dir):
    return load_tokenizer(qwen3_tokenizer_dir)


class ScriptedEngine:
    """A deterministic `Rollout`: each prompt's n responses are given up front as token ids."""

    def __init__(self, script: dict[tuple[int, ...], list[list[int]]], stop_token_ids: tuple[int, ...]):
        self.script = script
        self.stop_token_ids = stop_token_ids
        self.calls: list[tuple[int, SamplingParams]] = []
        self.first_prompts: list[int] = []

    def generate(self, prompts, params, first_prompt=0):
        self.calls.append((len(prompts), params))
        self.first_prompts.append(first_prompt)
        rows = [ids for prompt in prompts for ids in self.script[tuple(prompt)][: params.n]]
        width = max(map(len, rows))
        token_ids = np.zeros((len(rows), width), np.int32)
        for r, ids in enumerate(rows):
            token_ids[r, : len(ids)] = ids
        return RolloutBatch(
            prompt_index=np.repeat(np.arange(len(prompts), dtype=np.int32), params.n),
            token_ids=token_ids,
            logprobs=np.zeros(token_ids.shape, np.float32),
            lengths=np.array([len(ids) for ids in rows], np.int32),
            finish_reasons=tuple("stop" if ids[-1] in self.stop_token_ids else "length" for ids in rows),
        )

    def sleep(self):
        pass

    def update_weights(self, params):
        pass


def verl_best_and_majority(accs, preds, k):
    """verl's bootstrap_metric with [max, calc_maj_val] for one prompt, as verl's loop writes it."""
    np.random.seed(42)
    best, majority = [], []
    for _ in range(1000):
        draw = np.random.choice(len(accs), size=k, replace=True)
        best.append(max(accs[i] for i in draw))
        votes = defaultdict(list)
        for i in draw:
            votes[preds[i]].append(accs[i])
        top = max(votes, key=lambda vote: len(votes[vote]))  # ties: the vote seen first
        majority.append(votes[top][0])
    return float(np.mean(best)), float(np.mean(majority))


@pytest.fixture(scope="module")
def scenario(tokenizer):
    """Two sources. "SetA": prompt 0 answers [7, 5, 5, 7] (truth 7), prompt 2 answers [3, 3, 3, 4]
    (truth 3); "SetB": prompt 1, truth 12, answers [11, no box, 12 without a stop token, 11]."""
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    stops = validate.default_stop_token_ids(tokenizer)

    def response(text, stop=True):
        return tokenizer.encode(text, add_special_tokens=False) + ([im_end] if stop else [])

    def prompt(text):
        chat = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True, enable_thinking=False)
        return tuple(tokenizer(chat, add_special_tokens=False)["input_ids"])

    questions = [("SetA", "What is 3 + 4?", "7"), ("SetB", "What is 3 * 4?", "12"), ("SetA", "What is 1 + 2?", "3")]
    records = [PromptRecord(index=10 + i, messages=({"role": "user", "content": q},), prompt_ids=prompt(q),
                            ground_truth=truth, data_source=source, extra_info={})
               for i, (source, q, truth) in enumerate(questions)]
    texts = [
        ["So the answer is \\boxed{7}.", "I get \\boxed{5}.", "Maybe \\boxed{5}", "Thus \\boxed{7}"],
        ["It is \\boxed{11}.", "It is twelve.", "So \\boxed{12}", "\\boxed{11}"],
        ["\\boxed{3}", "The sum is \\boxed{3}.", "\\boxed{3}", "\\boxed{4}"],
    ]
    script = {record.prompt_ids: [response(text, stop=not (p == 1 and s == 2)) for s, text in enumerate(answers)]
              for p, (record, answers) in enumerate(zip(records, texts))}
    return records, ScriptedEngine(script, stops), texts


def test_default_stop_tokens_are_eos_im_end_and_endoftext(tokenizer):
    stops = validate.default_stop_token_ids(tokenizer)
    expected = {tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")}
    assert set(stops) == expected | {tokenizer.eos_token_id} and len(stops) == len(set(stops))


def test_k_sizes():
    assert validate.pass_at_k_sizes(16) == [1, 2, 4, 8, 16]
    assert validate.pass_at_k_sizes(6) == [1, 2, 4]
    assert validate.bootstrap_sizes(16) == [2, 4, 8, 16]
    assert validate.bootstrap_sizes(6) == [2, 4, 6]  # verl: powers of two below n, then n
    assert validate.bootstrap_sizes(1) == []


def test_validate_metrics_against_hand_values(scenario, tokenizer, tmp_path, capsys):
    records, engine, _ = scenario
    assert isinstance(engine, Rollout)
    params = SamplingParams(n=N, max_tokens=32, stop_token_ids=engine.stop_token_ids, seed=5)
    jsonl_path = tmp_path / "validation" / "g.jsonl"  # the directory does not exist yet
    metrics, generations = validate.validate(engine, records, tokenizer, params, jsonl_path=jsonl_path,
                                             log_generations=2)
    assert engine.calls == [(3, params)]  # one call, all prompts, the caller's params (seed 5)

    # mean@4 averages over prompts: SetA has prompt 0 with 2/4 correct and prompt 2 with 3/4.
    assert metrics["val-core/SetA/acc/mean@4"] == pytest.approx((0.5 + 0.75) / 2)
    assert metrics["val-core/SetB/acc/mean@4"] == pytest.approx(0.25)
    # pass@k = 1 - C(n-c, k) / C(n, k). Prompt 0 (n=4, c=2): pass@1 = 1 - 2/4 = 1/2,
    # pass@2 = 1 - C(2,2)/C(4,2) = 1 - 1/6 = 5/6, pass@4 = 1 (C(2,4) = 0). Prompt 2 (c=3): pass@1 = 3/4,
    # pass@2 = 1 - C(1,2)/C(4,2) = 1, pass@4 = 1. SetB's single prompt (c=1): pass@1 = 1/4,
    # pass@2 = 1 - C(3,2)/C(4,2) = 1 - 3/6 = 1/2, pass@4 = 1.
    assert metrics["val-aux/SetA/acc/pass@1"] == pytest.approx((1 / 2 + 3 / 4) / 2)
    assert metrics["val-aux/SetA/acc/pass@2"] == pytest.approx((5 / 6 + 1) / 2)
    assert metrics["val-aux/SetA/acc/pass@4"] == pytest.approx(1.0)
    assert metrics["val-aux/SetB/acc/pass@2"] == pytest.approx(1 / 2)
    assert not any("pass@3" in key or "pass@8" in key for key in metrics)

    # best@k / maj@k: verl's bootstrap, per prompt, averaged over the source's prompts.
    prompt_answers = {"SetA": [([1, 0, 0, 1], ["7", "5", "5", "7"]), ([1, 1, 1, 0], ["3", "3", "3", "4"])],
                      "SetB": [([0, 0, 1, 0], ["11", "", "12", "11"])]}
    for source, prompts in prompt_answers.items():
        for k in (2, 4):
            values = np.mean([verl_best_and_majority(accs, preds, k) for accs, preds in prompts], axis=0)
            prefix = "val-core" if k == N else "val-aux"
            assert metrics[f"{prefix}/{source}/acc/best@{k}/mean"] == pytest.approx(values[0], abs=1e-12)
            assert metrics[f"{prefix}/{source}/acc/maj@{k}/mean"] == pytest.approx(values[1], abs=1e-12)
    # The other verl variables: reward (= score) and format_score (0 only for the unboxed response).
    assert metrics["val-aux/SetB/reward/mean@4"] == pytest.approx(0.25)
    assert metrics["val-aux/SetB/format_score/mean@4"] == pytest.approx(0.75)
    assert {key.split("/")[0] for key in metrics} == {"val-core", "val-aux"}
    assert all(isinstance(value, float) for value in metrics.values())

    # Generations: prompt-major, skip_special_tokens decoding, per-sample fields.
    assert [(g["prompt_index"], g["sample_index"]) for g in generations] == [(p, s) for p in range(3) for s in range(N)]
    first = generations[0]
    assert first["response"] == "So the answer is \\boxed{7}."  # <|im_end|> dropped by skip_special_tokens
    assert first["prompt"] == tokenizer.decode(records[0].prompt_ids, skip_special_tokens=True)
    assert "<|im_start|>" not in first["prompt"] and "What is 3 + 4?" in first["prompt"]
    assert (first["data_source"], first["row"], first["ground_truth"], first["pred"]) == ("SetA", 10, "7", "7")
    assert (first["score"], first["acc"], first["finish_reason"]) == (1.0, True, "stop")
    assert first["response_length"] == len(tokenizer.encode("So the answer is \\boxed{7}.")) + 1  # + <|im_end|>
    unstopped = generations[1 * N + 2]
    assert (unstopped["finish_reason"], unstopped["acc"], unstopped["pred"]) == ("length", True, "12")
    assert generations[1 * N + 1]["pred"] == "" and generations[1 * N + 1]["score"] == 0.0
    lines = jsonl_path.read_text().splitlines()
    assert [json.loads(line) for line in lines] == generations

    # Logged generations: verl's choice (sort by prompt, RandomState(42) shuffle, first 2), printed.
    ordered = sorted(generations, key=lambda g: g["prompt"])
    np.random.RandomState(42).shuffle(ordered)
    assert validate.select_logged_generations(generations, 2) == ordered[:2]
    printed = capsys.readouterr().out
    assert printed.count("[generation ") == 2 and ordered[0]["response"] in printed


def test_sources_are_independent(scenario, tokenizer):
    """A source's metrics depend only on its own samples: validating SetB alone changes nothing."""
    records, engine, _ = scenario
    params = SamplingParams(n=N, max_tokens=32, stop_token_ids=engine.stop_token_ids)
    together, _ = validate.validate(engine, records, tokenizer, params)
    alone, _ = validate.validate(engine, [records[1]], tokenizer, params)
    assert alone == {key: value for key, value in together.items() if "/SetB/" in key}


def test_chunked_calls_and_auto_grader(scenario, tokenizer):
    """prompts_per_call splits the engine calls (one seed; each call says where its prompts start, which
    keys their samples); "auto" grades a math_dapo source
    with verl's math_dapo (scores ±1, no format_score) while the other source keeps ttrl_math."""
    records, engine, _ = scenario
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    dapo = PromptRecord(index=0, messages=({"role": "user", "content": "2 + 2?"},), prompt_ids=(1, 2, 3),
                        ground_truth="4", data_source="math_dapo", extra_info={})
    engine.script[dapo.prompt_ids] = [tokenizer.encode(text) + [im_end]
                                      for text in ("Answer: 4", "Answer: 5", "Answer: 4", "no idea")]
    engine.calls.clear()
    engine.first_prompts.clear()
    params = SamplingParams(n=N, max_tokens=32, stop_token_ids=engine.stop_token_ids, seed=3)
    metrics, generations = validate.validate(engine, [records[0], dapo], tokenizer, params, grader="auto",
                                             prompts_per_call=1)
    assert [(count, p.seed) for count, p in engine.calls] == [(1, 3), (1, 3)] and engine.first_prompts == [0, 1]
    assert [g["score"] for g in generations[N:]] == [1.0, -1.0, 1.0, -1.0]
    assert metrics["val-aux/math_dapo/reward/mean@4"] == pytest.approx(0.0)
    assert metrics["val-core/math_dapo/acc/mean@4"] == pytest.approx(0.5)
    assert "val-aux/math_dapo/format_score/mean@4" not in metrics
    assert "val-aux/SetA/format_score/mean@4" in metrics


def test_engine_out_of_order_is_an_error(scenario, tokenizer):
    records, engine, _ = scenario

    class Shuffled(ScriptedEngine):
        def generate(self, prompts, params, first_prompt=0):
            batch = super().generate(prompts, params, first_prompt)
            return RolloutBatch(batch.prompt_index[::-1].copy(), batch.token_ids, batch.logprobs, batch.lengths,
                                batch.finish_reasons)

    with pytest.raises(ValueError, match="prompt-major"):
        validate.validate(Shuffled(engine.script, engine.stop_token_ids), records, tokenizer,
                          SamplingParams(n=N, max_tokens=32))


# ---------------------------------------------------------------------------------------------------
# The eval command, end to end on a tiny random model.


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, qwen3_tokenizer_dir):
    from mathgrpo.testing.tiny import make_tiny_qwen3

    path = tmp_path_factory.mktemp("tiny_eval_model")
    make_tiny_qwen3(path, vocab_size=151936, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                    num_attention_heads=2, num_key_value_heads=1, head_dim=16)
    assert hf.copy_tokenizer(qwen3_tokenizer_dir, path)
    return path


def run_eval(model, data, out, *extra):
    args = validate.add_arguments(argparse.ArgumentParser()).parse_args(
        ["--model", str(model), "--data", str(data), "--n", "2", "--max-tokens", "8", "--out", str(out), *extra])
    assert validate.main(args) == 0


@pytest.fixture(scope="module")
def aime_slice(recipe_data, tmp_path_factory):
    data = tmp_path_factory.mktemp("eval_data") / "aime24_3.parquet"
    pq.write_table(pq.read_table(recipe_data / "aime24.parquet").slice(0, 3), data)
    return data


def test_eval_command_end_to_end(tiny_model_dir, aime_slice, tmp_path, capsys):
    out = tmp_path / "out"
    run_eval(tiny_model_dir, aime_slice, out)
    printed = capsys.readouterr().out

    metrics = json.loads((out / "metrics.json").read_text())
    assert {"val-core/AIME24/acc/mean@2", "val-core/AIME24/acc/best@2/mean", "val-core/AIME24/acc/maj@2/mean",
            "val-aux/AIME24/acc/pass@1", "val-aux/AIME24/acc/pass@2"} <= set(metrics)
    assert json.loads(printed.strip().splitlines()[-1]) == metrics  # the last line is the metrics
    generations = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    assert len(generations) == 3 * 2
    assert all(1 <= g["response_length"] <= 8 and g["data_source"] == "AIME24" for g in generations)
    truths = [row["ground_truth"] for row in pq.read_table(aime_slice).column("reward_model").to_pylist()]
    assert [g["ground_truth"] for g in generations] == [truth for truth in truths for _ in range(2)]
    run = json.loads((out / "run.json").read_text())
    assert run["sampling"]["n"] == 2 and run["sampling"]["max_tokens"] == 8
    assert run["sampling"]["stop_token_ids"] == [151645, 151643]  # <|im_end|> (the tokenizer's eos), <|endoftext|>
    assert "AIME24: 3 prompts x 2 samples, mean@2 = " in printed
    assert "   best@k    maj@k   pass@k" in printed

    # The same weights as an Orbax params checkpoint (tokenizer found through its meta) sample the same.
    from mathgrpo.weights.orbax import hf_to_orbax

    hf_to_orbax(tiny_model_dir, tmp_path / "ckpt")
    run_eval(tmp_path / "ckpt", aime_slice, tmp_path / "out_ckpt")
    assert (tmp_path / "out_ckpt" / "generations.jsonl").read_text() == (out / "generations.jsonl").read_text()


def test_eval_with_a_continuous_pool_gives_the_static_batchs_generations(tiny_model_dir, aime_slice, tmp_path):
    """`--max-slots 2`: the 6 rows (3 prompts × 2) go through a pool of 2 rows, refilled twice; samples
    are keyed by (seed, prompt, sample), so the generations are the static batch's (fp32 compute)."""
    fp32 = ("--compute-dtype", "float32", "--temperature", "1.0", "--seed", "5")
    run_eval(tiny_model_dir, aime_slice, tmp_path / "static", *fp32)
    run_eval(tiny_model_dir, aime_slice, tmp_path / "pool", *fp32, "--max-slots", "2")
    static = [json.loads(line) for line in (tmp_path / "static" / "generations.jsonl").read_text().splitlines()]
    pool = [json.loads(line) for line in (tmp_path / "pool" / "generations.jsonl").read_text().splitlines()]
    assert [g["response"] for g in pool] == [g["response"] for g in static]
    assert len({g["response"] for g in static}) > 1


def test_eval_command_rejects_a_non_model_dir(aime_slice, tmp_path):
    with pytest.raises(SystemExit, match="neither a HF model directory"):
        run_eval(tmp_path, aime_slice, tmp_path / "out")


def test_eval_command_with_vllm_gives_the_jax_samplers_greedy_generations(aime_slice, qwen3_tokenizer_dir,
                                                                          tmp_path, capsys):
    """`eval --engine vllm` (vLLM's CPU build here) on the same weights: the same greedy generations and
    metrics as the JAX sampler's (fp32: in bf16 the two engines' roundings differ)."""
    pytest.importorskip("vllm")
    from unittest import mock

    from mathgrpo.testing.tiny import make_tiny_qwen3

    model = tmp_path / "model"  # head_dim 32: the smallest vLLM's CPU attention supports
    make_tiny_qwen3(model, vocab_size=151936, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                    num_attention_heads=2, num_key_value_heads=1, head_dim=32, initializer_range=0.2)
    assert hf.copy_tokenizer(qwen3_tokenizer_dir, model)
    with mock.patch.dict(os.environ):  # the command sets vLLM's environment
        run_eval(model, aime_slice, tmp_path / "vllm", "--engine", "vllm", "--temperature", "0", "--enforce-eager",
                 "--compute-dtype", "float32")
    run_eval(model, aime_slice, tmp_path / "jax", "--temperature", "0", "--compute-dtype", "float32")
    capsys.readouterr()

    def generations(out):
        return [{k: g[k] for k in ("response", "response_length", "finish_reason", "score")}
                for g in map(json.loads, (out / "generations.jsonl").read_text().splitlines())]

    assert generations(tmp_path / "vllm") == generations(tmp_path / "jax")
    assert json.loads((tmp_path / "vllm" / "metrics.json").read_text()) == \
        json.loads((tmp_path / "jax" / "metrics.json").read_text())
    assert json.loads((tmp_path / "vllm" / "run.json").read_text())["args"]["engine"] == "vllm"
