"""Metrics: verl's formulas on hand-derived batches, and each sink read back by its own library's reader.

References: the data metrics are also recomputed the way verl computes them (padded token tensors,
masked_select over the response mask); MFU numbers are derived below from the Qwen3-4B shapes. The
TensorBoard scalars are read by TensorBoard's EventAccumulator, the W&B offline run by W&B's own
`Record` protobuf, the curves PNG by Pillow (matplotlib's image dependency).
"""

import glob
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from mathgrpo.config import load_model_config
from mathgrpo.tracking import flops, plots, sinks, verl_metrics

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "models"


# ---------------------------------------------------------------------------------------------------
# Data, timing, throughput metrics.


def test_data_metrics_hand_batch():
    # Four responses; the second is aborted (length 0), the fourth hits max_response_length=10.
    result = verl_metrics.data_metrics(
        scores=[1.0, 0.0, 0.0, 1.0],
        advantages=[0.5, -3.0, -1.5, 1.5],
        response_lengths=[4, 0, 6, 10],
        prompt_lengths=[3, 8, 8, 5],
        max_response_length=10,
        max_prompt_length=8,
    )
    expected = {
        # Scores over the non-aborted responses 0, 2, 3: [1, 0, 1].
        "critic/score/mean": 2 / 3, "critic/score/max": 1.0, "critic/score/min": 0.0,
        "critic/rewards/mean": 2 / 3, "critic/rewards/max": 1.0, "critic/rewards/min": 0.0,
        # Token-weighted: (0.5·4 + (−3)·0 + (−1.5)·6 + 1.5·10) / (4 + 0 + 6 + 10) = 8 / 20 = 0.4.
        # The aborted response has no tokens, so its −3 is neither in the mean nor the min.
        "critic/advantages/mean": 0.4, "critic/advantages/max": 1.5, "critic/advantages/min": -1.5,
        "critic/returns/mean": 0.4, "critic/returns/max": 1.5, "critic/returns/min": -1.5,
        # Lengths (4 + 0 + 6 + 10) / 4 = 5; one of four equals 10.
        "response_length/mean": 5.0, "response_length/max": 10.0, "response_length/min": 0.0,
        "response_length/clip_ratio": 0.25,
        # Without the aborted one: 20 / 3, one of three clipped.
        "response_length_non_aborted/mean": 20 / 3, "response_length_non_aborted/max": 10.0,
        "response_length_non_aborted/min": 4.0, "response_length_non_aborted/clip_ratio": 1 / 3,
        "response/aborted_ratio": 0.25,
        # Prompts (3 + 8 + 8 + 5) / 4 = 6; two of four equal max_prompt_length=8.
        "prompt_length/mean": 6.0, "prompt_length/max": 8.0, "prompt_length/min": 3.0,
        "prompt_length/clip_ratio": 0.5,
    }
    assert result.keys() == expected.keys()
    for key, value in expected.items():
        assert result[key] == pytest.approx(value, abs=1e-12), key
        assert type(result[key]) is float, key


def test_data_metrics_separate_rewards():
    result = verl_metrics.data_metrics(scores=[1.0, 0.0], rewards=[0.5, -0.25], advantages=[1.0, -1.0],
                                  response_lengths=[3, 1], prompt_lengths=[2, 2], max_response_length=8,
                                  max_prompt_length=4)
    assert result["critic/score/mean"] == 0.5
    assert (result["critic/rewards/mean"], result["critic/rewards/max"], result["critic/rewards/min"]) == (
        0.125, 0.5, -0.25)
    assert result["critic/advantages/mean"] == pytest.approx((3 - 1) / 4)  # token-weighted, 4 tokens


def verl_data_metrics(token_level_scores, advantages, attention_mask, response_width):
    """verl compute_data_metrics on padded [S, P + R] tensors, written as verl writes it (numpy for torch)."""
    response_mask = attention_mask[:, -response_width:].astype(bool)
    prompt_mask = attention_mask[:, :-response_width].astype(bool)
    prompt_length = prompt_mask.sum(-1).astype(float)
    response_length = response_mask.sum(-1).astype(float)
    non_aborted = response_length != 0
    sequence_score = token_level_scores.sum(-1)[non_aborted]
    valid_adv = advantages[response_mask]  # torch.masked_select
    return {
        "critic/score/mean": sequence_score.mean(), "critic/score/max": sequence_score.max(),
        "critic/score/min": sequence_score.min(),
        "critic/advantages/mean": valid_adv.mean(), "critic/advantages/max": valid_adv.max(),
        "critic/advantages/min": valid_adv.min(),
        "response_length/mean": response_length.mean(),
        "response_length/clip_ratio": np.mean(response_length == response_width),
        "prompt_length/mean": prompt_length.mean(),
        "prompt_length/clip_ratio": np.mean(prompt_length == prompt_mask.shape[-1]),
    }


def test_data_metrics_match_verl_token_tensors():
    rng = np.random.default_rng(0)
    S, P, R = 24, 7, 12
    prompt_lengths = rng.integers(1, P + 1, S)
    response_lengths = rng.integers(0, R + 1, S)
    response_lengths[:3] = [R, 0, R]
    scores = rng.integers(0, 2, S).astype(float)
    advantages = rng.normal(size=S)
    # Left-padded prompts, right-padded responses; the score sits on the last response token.
    attention_mask = np.zeros((S, P + R), int)
    token_scores = np.zeros((S, R))
    for i in range(S):
        attention_mask[i, P - prompt_lengths[i]:P + response_lengths[i]] = 1
        token_scores[i, max(response_lengths[i] - 1, 0)] = scores[i]
    token_advantages = advantages[:, None] * attention_mask[:, P:]  # GRPO: broadcast, masked
    reference = verl_data_metrics(token_scores, token_advantages, attention_mask, R)
    ours = verl_metrics.data_metrics(scores=scores, advantages=advantages, response_lengths=response_lengths,
                                prompt_lengths=prompt_lengths, max_response_length=R, max_prompt_length=P)
    # verl's aborted rows still carry a score in this construction only if the score is non-zero;
    # the reference skips them just as ours does.
    for key, value in reference.items():
        assert ours[key] == pytest.approx(value, rel=1e-12, abs=1e-12), key


def test_data_metrics_errors():
    kwargs = dict(max_response_length=4, max_prompt_length=4)
    with pytest.raises(ValueError, match="advantages has 1 values but scores has 2"):
        verl_metrics.data_metrics(scores=[1, 0], advantages=[1], response_lengths=[1, 1], prompt_lengths=[1, 1],
                             **kwargs)
    with pytest.raises(ValueError, match="every response is empty"):
        verl_metrics.data_metrics(scores=[1, 0], advantages=[1, 1], response_lengths=[0, 0], prompt_lengths=[1, 1],
                             **kwargs)


def test_timing_metrics():
    timings = {"gen": 2.0, "reward": 0.5, "update_actor": 3.0, "adv": 0.04, "step": 6.0}
    result = verl_metrics.timing_metrics(timings, response_tokens=1000, total_tokens=4000)
    assert {k: result[f"timing_s/{k}"] for k in timings} == timings
    per_token = {k: v for k, v in result.items() if k.startswith("timing_per_token_ms/")}
    # gen: 2 s · 1000 / 1000 response tokens = 2 ms; update_actor: 3000 ms / 4000 = 0.75; adv: 40 / 4000.
    assert per_token == pytest.approx({"timing_per_token_ms/gen": 2.0, "timing_per_token_ms/update_actor": 0.75,
                                       "timing_per_token_ms/adv": 0.01})


def test_throughput_metrics():
    # 4000 tokens in a 2 s step on 8 devices: 4000 / 16 = 250 tokens/s/device.
    assert verl_metrics.throughput_metrics(total_tokens=4000, step_time=2.0, n_devices=8) == {
        "perf/total_num_tokens": 4000.0, "perf/time_per_step": 2.0, "perf/throughput": 250.0}


# ---------------------------------------------------------------------------------------------------
# MFU.


def test_mfu_qwen3_4b():
    model = load_model_config(CONFIGS / "qwen3_4b_base.yaml")
    # D=2560, F=9728, L=36, N=32, K=8, H=128, V=151936:
    #   MLP 3·2560·9728 = 74,711,040; attention projections 2560·(4096 + 1024 + 1024 + 4096) = 26,214,400;
    #   per layer 100,925,440, × 36 = 3,633,315,840; embedding + head 2·151936·2560 = 777,912,320.
    n_dense = 4_411_228_160
    assert flops.dense_parameters(model) == n_dense
    assert round(n_dense / 1e9, 3) == 4.411  # docs/recipe.md §2.8
    # Attention coefficient 12·128·32·36 = 1,769,472 ≈ 1.769e6: a one-token sequence adds it once.
    assert flops.flops_per_step(model, [1]) - 6 * n_dense == 1_769_472
    # Two sequences of 1000 and 3000 tokens, 8 devices, 10 s, 989 TFLOP/s each:
    #   6·4,411,228,160·4000 = 105,869,475,840,000; 1,769,472·(1000² + 3000²) = 17,694,720,000,000;
    #   total 123,564,195,840,000 FLOPs → / 10 s / 989e12 / 8 = 0.00156173...
    value = flops.mfu(model, sequence_lengths=[1000, 3000], seconds=10.0, n_devices=8, peak_flops=989e12)
    assert value == pytest.approx(123_564_195_840_000 / 10 / 989e12 / 8, rel=1e-12)
    assert value == pytest.approx(0.0015617, rel=1e-4)
    two_epochs = flops.mfu(model, sequence_lengths=[1000, 3000], seconds=10.0, n_devices=8, peak_flops=989e12,
                             ppo_epochs=2)
    assert two_epochs == pytest.approx(2 * value)
    # The usual MFU accounting drops the embedding table (a gather) and halves the causal square:
    #   weights 4,411,228,160 − 151936·2560 = 4,022,272,000; attention 6·128·32·36 = 884,736 per token².
    #   6·4,022,272,000·4000 = 96,534,528,000,000; 884,736·(1000² + 3000²) = 8,847,360,000,000.
    assert flops.model_flops_per_step(model, [1000, 3000]) == 96_534_528_000_000 + 8_847_360_000_000


# ---------------------------------------------------------------------------------------------------
# Memory and reduction.


class FakeDevice:
    def __init__(self, stats):
        self.stats = stats

    def memory_stats(self):
        return self.stats


def test_memory_metrics():
    gib = 1024**3
    result = verl_metrics.memory_metrics(FakeDevice({"bytes_in_use": 1, "peak_bytes_in_use": 3 * gib // 2,
                                                "pool_bytes": gib, "peak_pool_bytes": 5 * gib}))
    assert result["perf/max_memory_allocated_gb"] == 1.5 and result["perf/max_memory_reserved_gb"] == 5.0
    cpu_only = verl_metrics.memory_metrics(FakeDevice(None))
    assert set(cpu_only) == {"perf/cpu_memory_used_gb"}
    # This process has imported numpy and JAX: its peak RSS is well above 10 MiB and below 1 TiB.
    assert 0.01 < cpu_only["perf/cpu_memory_used_gb"] < 1024
    real = verl_metrics.memory_metrics()  # the first local JAX device (CPU here)
    assert "perf/cpu_memory_used_gb" in real


def test_reduce_metrics():
    rows = [{"actor/pg_loss": 1.0, "rollout_corr/rollout_is_max": 2.0, "response_length/min": 5.0,
             "global_seqlen/minmax_diff": 3.0},
            {"actor/pg_loss": 2.0, "rollout_corr/rollout_is_max": 7.0, "response_length/min": 4.0,
             "global_seqlen/minmax_diff": 1.0},
            {"actor/pg_loss": 6.0}]
    assert verl_metrics.reduce_metrics(rows) == {
        "actor/pg_loss": 3.0,  # mean of 1, 2, 6
        "rollout_corr/rollout_is_max": 7.0,
        "response_length/min": 4.0,
        "global_seqlen/minmax_diff": 3.0,  # "max" is tested before "min", as verl does
    }
    assert verl_metrics.reduce_metrics({"a/max": [1, 9], "b": [1, 2]}) == {"a/max": 9.0, "b": 1.5}


# ---------------------------------------------------------------------------------------------------
# JSONL, samples, progress line.


def test_jsonl_round_trip_and_progress(tmp_path, capsys):
    logger = sinks.MetricsLogger(tmp_path, total_steps=10)
    logger.log(1, {"critic/score/mean": np.float32(0.5), "response_length/mean": 812, "x": float("nan"),
                   "y": float("inf"), "timing_s/step": 4.0},
               samples=[{"prompt": "1+1?", "response": "\\boxed{2}", "score": np.float64(1.0)}])
    logger.log(2, {"critic/score/mean": 0.75, "timing_s/step": 6.0})
    logger.close()
    rows = sinks.read_metrics_jsonl(tmp_path / "metrics.jsonl")
    assert rows == [{"step": 1, "critic/score/mean": 0.5, "response_length/mean": 812.0, "x": None, "y": None,
                     "timing_s/step": 4.0},
                    {"step": 2, "critic/score/mean": 0.75, "timing_s/step": 6.0}]
    samples = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert samples == [{"step": 1, "prompt": "1+1?", "response": "\\boxed{2}", "score": 1.0}]
    lines = capsys.readouterr().out.splitlines()
    # Step 1: 4 s/step, 9 steps left → 36 s. Step 2: mean(4, 6) = 5 s/step, 8 left → 40 s.
    assert lines == ["step 1/10 | critic/score/mean 0.5 | response_length/mean 812 | 4.0 s/step | eta 0:00:36",
                     "step 2/10 | critic/score/mean 0.75 | 5.0 s/step | eta 0:00:40"]
    # A resumed run appends to the same files.
    with sinks.MetricsLogger(tmp_path) as again:
        again.log(3, {"critic/score/mean": 1.0})
    assert [row["step"] for row in sinks.read_metrics_jsonl(tmp_path / "metrics.jsonl")] == [1, 2, 3]
    with pytest.raises(TypeError, match="'bad'"), sinks.MetricsLogger(tmp_path / "other") as other:
        other.log(1, {"bad": "text"})


def test_progress_line_eta():
    logger = sinks.MetricsLogger("unused", enabled=False, total_steps=279)
    logger._step_times = [35.2]
    line = logger.progress_line(12, {"actor/grad_norm": 0.1234, "critic/score/mean": 0.41,
                                     "response_length/mean": 812.4, "timing_s/step": 35.2})
    # 267 steps left × 35.2 s = 9398.4 s = 2 h 36 min 38 s.
    assert line == ("step 12/279 | critic/score/mean 0.41 | response_length/mean 812 | actor/grad_norm 0.123 | "
                    "35.2 s/step | eta 2:36:38")


def test_disabled_logger_writes_nothing(tmp_path, capsys):
    logger = sinks.MetricsLogger(tmp_path / "run", enabled=False, total_steps=3)
    logger.log(1, {"critic/score/mean": 1.0}, samples=[{"a": 1}])
    logger.close()
    assert not (tmp_path / "run").exists() and capsys.readouterr().out == ""


# ---------------------------------------------------------------------------------------------------
# Sinks chosen by name (verl's trainer.logger).


def test_make_logger_fans_out_to_the_chosen_sinks(tmp_path, capsys):
    with sinks.make_logger(["jsonl"], tmp_path / "jsonl", total_steps=2) as logger:
        logger.log(1, {"critic/score/mean": 0.5}, samples=[{"prompt": "p"}])
    assert sorted(p.name for p in (tmp_path / "jsonl").iterdir()) == ["metrics.jsonl", "samples.jsonl"]
    assert sinks.read_metrics_jsonl(tmp_path / "jsonl" / "metrics.jsonl") == [{"step": 1, "critic/score/mean": 0.5}]
    assert capsys.readouterr().out == ""  # no console sink, no progress line
    with sinks.make_logger(["console"], tmp_path / "console", total_steps=2) as logger:
        logger.log(1, {"critic/score/mean": 0.5, "timing_s/step": 3.0})
    assert not (tmp_path / "console").exists()
    assert capsys.readouterr().out == "step 1/2 | critic/score/mean 0.5 | 3.0 s/step | eta 0:00:03\n"
    with sinks.make_logger(("tensorboard",), tmp_path / "tb") as logger:
        logger.log(1, {"critic/score/mean": 0.5})
    assert [p.name for p in (tmp_path / "tb").iterdir()] == ["tensorboard"]
    assert tensorboard_scalars(tmp_path / "tb" / "tensorboard")["critic/score/mean"][0][:2] == (1, 0.5)
    # The default sinks are the offline three, as trainer.logger's default.
    assert sinks.MetricsLogger(tmp_path, enabled=False).sinks == sinks.DEFAULT_SINKS == (
        "console", "jsonl", "tensorboard")


def test_make_logger_rejects_unknown_and_repeated_sinks(tmp_path):
    with pytest.raises(ValueError, match=r"'swanlab'.*'console', 'jsonl', 'tensorboard', 'wandb'"):
        sinks.make_logger(["console", "swanlab"], tmp_path)
    with pytest.raises(ValueError, match="twice"):
        sinks.make_logger(["jsonl", "jsonl"], tmp_path)
    assert not any(tmp_path.iterdir())


def test_wandb_sink_needs_the_package(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    with pytest.raises(ImportError, match="pip install wandb"):
        sinks.make_logger(["jsonl", "wandb"], tmp_path / "run")
    assert not (tmp_path / "run" / sinks.WANDB_RUN_ID_FILE).exists()
    # Only process 0 builds sinks: the others never import wandb.
    sinks.make_logger(["wandb"], tmp_path / "other", enabled=False).log(1, {"x": 1.0})
    assert not (tmp_path / "other").exists()


# ---------------------------------------------------------------------------------------------------
# TensorBoard (tensorboardX), read by TensorBoard's EventAccumulator.


def tensorboard_scalars(log_dir) -> dict[str, list[tuple[int, float, float]]]:
    """{tag: [(step, value, wall_time)]} as TensorBoard loads the event files of log_dir."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})  # 0: keep every event
    accumulator.Reload()
    return {tag: [(e.step, e.value, e.wall_time) for e in accumulator.Scalars(tag)]
            for tag in accumulator.Tags()["scalars"]}


def test_tensorboard_scalars(tmp_path, capsys):
    steps = {1: {"critic/score/mean": 0.25, "actor/grad_norm": 1.5},
             2: {"critic/score/mean": 0.5, "actor/grad_norm": float("nan"), "val-core/AIME24/acc/mean@16": 0.1},
             300: {"critic/score/mean": 0.75, "perf/huge": 1e39, "perf/count": np.int64(7)}}  # 1e39: float32 inf
    with sinks.MetricsLogger(tmp_path, total_steps=300) as logger:
        for step, values in steps.items():
            logger.log(step, values)
    files = list((tmp_path / "tensorboard").iterdir())
    assert len(files) == 1 and files[0].name.startswith("events.out.tfevents.")
    scalars = tensorboard_scalars(tmp_path / "tensorboard")
    expected: dict[str, list[tuple[int, float]]] = {}
    for step, values in steps.items():
        for tag, value in values.items():
            expected.setdefault(tag, []).append((step, math.inf if value > 3.5e38 else float(np.float32(value))))
    assert scalars.keys() == expected.keys()
    for tag, events in scalars.items():
        assert [step for step, _, _ in events] == [step for step, _ in expected[tag]], tag
        for (_, got, wall_time), (_, value) in zip(events, expected[tag]):
            assert (math.isnan(got) and math.isnan(value)) or got == value, tag
            assert wall_time > 1.6e9  # seconds since the epoch
    # A resumed run writes a second file in the same directory; TensorBoard reads both as one run.
    with sinks.MetricsLogger(tmp_path, total_steps=301) as again:
        again.log(301, {"critic/score/mean": 1.0})
    assert len(list((tmp_path / "tensorboard").iterdir())) == 2
    assert [(s, v) for s, v, _ in tensorboard_scalars(tmp_path / "tensorboard")["critic/score/mean"]] == [
        (1, 0.25), (2, 0.5), (300, 0.75), (301, 1.0)]
    capsys.readouterr()


# ---------------------------------------------------------------------------------------------------
# Weights & Biases, offline: W&B's transaction log read back with W&B's own protobuf messages.


def wandb_records(path) -> list:
    """The `Record` messages of a W&B transaction log (run-<id>.wandb): a 7-byte ':W&B' header, then
    LevelDB's log framing (32 KiB blocks of chunks with a 7-byte header: crc, length, type)."""
    from wandb.proto import wandb_internal_pb2

    data, block = Path(path).read_bytes(), 32768
    assert data[:4] == b":W&B"
    records, offset, pending = [], 7, b""
    while offset + 7 <= len(data):
        if block - offset % block < 7:  # a block's tail too short for a header is padding
            offset += block - offset % block
            continue
        length, kind = int.from_bytes(data[offset + 4:offset + 6], "little"), data[offset + 6]
        if offset + 7 + length > len(data):  # a chunk still being written
            break
        pending += data[offset + 7:offset + 7 + length]
        offset += 7 + length
        if kind in (1, 4):  # a whole record, or the last chunk of one
            records.append(wandb_internal_pb2.Record.FromString(pending))
            pending = b""
    return records


def wandb_history(run_dir, run_id, n_runs) -> tuple[list, dict[int, dict]]:
    """(run records, {step: {key: value}}) of run_id's n_runs offline run directories under run_dir/wandb
    (offline-run-<time>-<id>, with a -1, -2... suffix when a second one starts within the same second).

    `run.finish()` returns before wandb-core has written the log out, so this waits (10 s at most) for
    each log's `exit` record.
    """
    deadline = time.monotonic() + 10
    while True:
        paths = sorted(glob.glob(str(run_dir / "wandb" / "offline-run-*" / f"run-{run_id}.wandb")))
        logs = [wandb_records(path) for path in paths]
        finished = [bool(log) and log[-1].WhichOneof("record_type") == "exit" for log in logs]
        if (len(logs) == n_runs and all(finished)) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    runs, history = [], {}
    for record in (record for log in logs for record in log):
        if record.WhichOneof("record_type") == "run":
            runs.append(record.run)
        elif record.WhichOneof("record_type") == "history":
            row = history.setdefault(record.history.step.num, {})
            for item in record.history.item:  # a key, or the path of a nested one (a table's fields)
                *parents, name = [item.key] if item.key else item.nested_key
                node = row
                for parent in parents:
                    node = node.setdefault(parent, {})
                node[name] = json.loads(item.value_json)
    return runs, history


def test_wandb_offline_run(tmp_path, monkeypatch, capsys):
    pytest.importorskip("wandb")
    for name, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DIR": tmp_path / "wandb_dir",
                        "WANDB_CONFIG_DIR": tmp_path / "wandb_config", "WANDB_CACHE_DIR": tmp_path / "wandb_cache",
                        "WANDB_DATA_DIR": tmp_path / "wandb_data"}.items():
        monkeypatch.setenv(name, str(value))
    run_dir = tmp_path / "run"
    config = {"trainer": {"logger": ["console", "wandb"], "project_name": "OnPolicyDistillation"}}
    names = dict(project_name="OnPolicyDistillation", experiment_name="grpo_test", config=config)
    with sinks.make_logger(["console", "wandb"], run_dir, total_steps=3, **names) as logger:
        logger.log(1, {"critic/score/mean": 0.25, "actor/grad_norm": float("nan")},
                   samples=[{"prompt": "1+1?", "response": "\\boxed{2}", "score": np.float32(1.0)}])
        logger.log(2, {"critic/score/mean": 0.5, "actor/grad_norm": 1.5})
    assert "step 2/3 | critic/score/mean 0.5 | actor/grad_norm 1.5" in capsys.readouterr().out
    run_id = (run_dir / sinks.WANDB_RUN_ID_FILE).read_text().strip()
    runs, history = wandb_history(run_dir, run_id, 1)
    assert [(run.run_id, run.project, run.display_name) for run in runs] == [
        (run_id, "OnPolicyDistillation", "grpo_test")]
    assert json.loads({item.key: item.value_json for item in runs[0].config.update}["trainer"]) == config["trainer"]
    assert history[2]["critic/score/mean"] == 0.5 and history[2]["actor/grad_norm"] == 1.5
    assert history[1]["critic/score/mean"] == 0.25 and math.isnan(history[1]["actor/grad_norm"])
    # The samples table: a file of the offline run, referenced from step 1's history row.
    table_path = history[1]["samples"]["path"]
    [table_file] = glob.glob(str(run_dir / "wandb" / "offline-run-*" / "files" / table_path))
    table = json.loads(Path(table_file).read_text())
    assert table["columns"] == ["step", "prompt", "response", "score"]
    assert table["data"] == [[1, "1+1?", "\\boxed{2}", 1.0]]
    # A resumed training run (same run_dir) continues the same W&B run id.
    with sinks.make_logger(["wandb"], run_dir, **names) as again:
        again.log(3, {"critic/score/mean": 0.75})
    assert (run_dir / sinks.WANDB_RUN_ID_FILE).read_text().strip() == run_id
    runs, history = wandb_history(run_dir, run_id, 2)
    assert [run.run_id for run in runs] == [run_id, run_id] and history[3]["critic/score/mean"] == 0.75


# ---------------------------------------------------------------------------------------------------
# PNG curves (matplotlib), read back by Pillow.


def read_png(path) -> tuple[np.ndarray, dict[str, str]]:
    """→ (RGB array [H, W, 3], the PNG's text chunks); Pillow checks the chunk CRCs as it decodes."""
    from PIL import Image

    with Image.open(path) as image:
        assert image.format == "PNG"
        image.load()
        return np.asarray(image.convert("RGB")), dict(image.text)


def bluish(image: np.ndarray) -> np.ndarray:
    """Pixels of the curves' blue (#1f77b4, antialiased into white): blue well above red. The axes, grid,
    ticks and labels are black or grey (red ≈ blue)."""
    rgb = image.astype(np.int32)
    return rgb[..., 2] - rgb[..., 0] > 50


def test_plot_curves_png(tmp_path):
    rows = []
    for step in range(1, 21):
        row = {"step": step, "critic/score/mean": step / 20, "response_length/mean": 1000 - 10 * step,
               "actor/entropy": None if step == 7 else 0.5, "actor/grad_norm_unplotted": 1.0}
        if step % 10 == 0:
            row["val-core/AIME24/acc/mean@16"] = step / 100
            row["val-core/AIME24/acc/best@16/mean"] = 0.9
        rows.append(row)
    rows.append({"step": 20, "critic/score/mean": 0.9})  # a resumed run re-logs step 20: the last row wins
    path = tmp_path / "curves.png"
    panels = plots.plot_curves(rows, path)
    image, text = read_png(path)
    keys = ["critic/score/mean", "response_length/mean", "actor/entropy", "val-core/AIME24/acc/mean@16"]
    assert [panel["key"] for panel in panels] == keys  # grad_norm absent; best@16 is not a mean@ curve
    assert text["Comment"].split("\n") == keys and text["Software"].startswith("Matplotlib")
    assert image.shape == (2 * plots.PANEL_HEIGHT, 2 * plots.PANEL_WIDTH, 3)  # 2 x 2 panels
    assert not (tmp_path / "curves.png.tmp").exists()
    line = bluish(image)
    inside = np.zeros_like(line)
    for panel in panels:
        left, top, right, bottom = (round(v) for v in panel["box"])
        inside[top:bottom + 1, left:right + 1] = True
        (first, last), (low, high) = panel["x_range"], panel["y_range"]
        data = {row["step"]: row[panel["key"]] for row in rows if row.get(panel["key"]) is not None}
        assert first < min(data) and last > max(data) and low < min(data.values()) and high > max(data.values())
        for step, value in data.items():  # the curve passes through every logged point
            x = round(left + (step - first) / (last - first) * (right - left))
            y = round(bottom - (value - low) / (high - low) * (bottom - top))
            assert line[y - 2:y + 3, x - 2:x + 3].any(), (panel["key"], step)
    assert panels[0]["y_range"][1] < 1.0  # the re-logged step 20 (0.9) replaced the first one (1.0)
    assert line.sum() > 4 * 300 and not (line & ~inside).any()  # the curves, inside their axes
    # The score rises from bottom-left to top-right: the axes' top-left and bottom-right corners stay empty.
    left, top, right, bottom = (round(v) for v in panels[0]["box"])
    assert not line[top:top + 60, left:left + 120].any() and not line[bottom - 60:bottom, right - 120:right].any()
    # Entropy has a gap at step 7: nothing drawn strictly between steps 6 and 8 (a margin for the line's ends).
    left, top, right, bottom = (round(v) for v in panels[2]["box"])
    first, last = panels[2]["x_range"]
    x6, x8 = (round(left + (s - first) / (last - first) * (right - left)) for s in (6, 8))
    assert line[top:bottom, x6 - 4].any() and line[top:bottom, x8 + 4].any()
    assert not line[top:bottom + 1, x6 + 3:x8 - 2].any()


def test_plot_curves_one_panel_and_lone_points(tmp_path):
    rows = [{"step": 1, "x": 2.0}, {"step": 2, "x": None}, {"step": 3, "x": 4.0}, {"step": 4, "x": float("inf")}]
    [panel] = plots.plot_curves(rows, tmp_path / "one.png", keys=["x"])
    image, _ = read_png(tmp_path / "one.png")
    assert image.shape == (plots.PANEL_HEIGHT, plots.PANEL_WIDTH, 3)
    # Steps 1 and 3 have no finite neighbour: each is a dot, and nothing joins them.
    left, top, right, bottom = (round(v) for v in panel["box"])
    (first, last), (low, high) = panel["x_range"], panel["y_range"]
    line = bluish(image)
    for step, value in ((1, 2.0), (3, 4.0)):
        x = round(left + (step - first) / (last - first) * (right - left))
        y = round(bottom - (value - low) / (high - low) * (bottom - top))
        assert line[y - 1:y + 2, x - 1:x + 2].all(), step
    x1, x3 = (round(left + (s - first) / (last - first) * (right - left)) for s in (1, 3))
    assert not line[top:bottom, x1 + 6:x3 - 5].any()


def test_plot_curves_without_data(tmp_path):
    with pytest.raises(ValueError, match="no finite values"):
        plots.plot_curves([{"step": 1, "other": 1.0}], tmp_path / "empty.png")
    with pytest.raises(ValueError, match="no finite values"):
        plots.plot_curves([{"step": 1, "critic/score/mean": None}], tmp_path / "empty.png")
    assert not any(tmp_path.iterdir())
