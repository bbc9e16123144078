"""Metrics: verl's formulas on hand-derived batches, and sinks read back by independent decoders.

References: the data metrics are also recomputed the way verl computes them (padded token tensors,
masked_select over the response mask); MFU numbers are derived below from the Qwen3-4B shapes;
CRC-32C is checked against published test vectors; the TensorBoard file is parsed by a TFRecord
reader and a generic protobuf wire-format decoder written here (and by google.protobuf when it is
importable); the PNG by a decoder written here (chunk CRCs, inflate, all five row filters).
"""

import json
import math
import struct
import zlib
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
    assert round(n_dense / 1e9, 3) == 4.411  # recipe_spec §2.8
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
# CRC-32C and the TensorBoard event file.


def test_crc32c_vectors():
    assert sinks.crc32c(b"123456789") == 0xE3069283  # the CRC catalogue's check value
    assert sinks.crc32c(b"") == 0
    assert sinks.crc32c(bytes(32)) == 0x8A9136AA  # RFC 3720 B.4
    assert sinks.crc32c(b"\xff" * 32) == 0x62A8AB43
    assert sinks.crc32c(bytes(range(32))) == 0x46DD794E


def unmask(masked: int) -> int:
    """TensorFlow's `crc32c::Unmask`: subtract the constant, rotate left by 15."""
    rotated = (masked - 0xA282EAD8) & 0xFFFFFFFF
    return ((rotated >> 17) | (rotated << 15)) & 0xFFFFFFFF


def read_tfrecords(path):
    data, records, offset = Path(path).read_bytes(), [], 0
    while offset < len(data):
        header = data[offset:offset + 8]
        (length,) = struct.unpack("<Q", header)
        (length_crc,) = struct.unpack("<I", data[offset + 8:offset + 12])
        assert unmask(length_crc) == sinks.crc32c(header)
        payload = data[offset + 12:offset + 12 + length]
        (payload_crc,) = struct.unpack("<I", data[offset + 12 + length:offset + 16 + length])
        assert unmask(payload_crc) == sinks.crc32c(payload)
        records.append(payload)
        offset += 16 + length
    assert offset == len(data)
    return records


def parse_protobuf(data: bytes) -> list[tuple[int, int, object]]:
    """Wire format → [(field, wire type, value)]: varints as int, fixed64/32 and length-delimited as bytes."""
    fields, offset = [], 0

    def varint():
        nonlocal offset
        value = shift = 0
        while True:
            byte = data[offset]
            offset += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if byte < 0x80:
                return value

    while offset < len(data):
        key = varint()
        field, wire = key >> 3, key & 7
        if wire == 0:
            value = varint()
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            value, offset = data[offset:offset + size], offset + size
        elif wire == 2:
            size = varint()
            value, offset = data[offset:offset + size], offset + size
        else:
            raise AssertionError(f"unexpected wire type {wire}")
        fields.append((field, wire, value))
    return fields


def decode_event(data: bytes) -> dict:
    event = {"scalars": {}}
    for field, wire, value in parse_protobuf(data):
        if (field, wire) == (1, 1):
            event["wall_time"] = struct.unpack("<d", value)[0]
        elif (field, wire) == (2, 0):
            event["step"] = value
        elif (field, wire) == (3, 2):
            event["file_version"] = value.decode()
        elif (field, wire) == (5, 2):
            for value_field, value_wire, summary_value in parse_protobuf(value):
                assert (value_field, value_wire) == (1, 2)  # repeated Summary.Value
                parts = {(f, w): v for f, w, v in parse_protobuf(summary_value)}
                event["scalars"][parts[(1, 2)].decode()] = struct.unpack("<f", parts[(2, 5)])[0]
        else:
            raise AssertionError(f"unexpected Event field {field}")
    return event


def event_message_class():
    """tensorflow Event / Summary with their real field numbers, built with google.protobuf."""
    descriptor_pb2 = pytest.importorskip("google.protobuf.descriptor_pb2")
    from google.protobuf import descriptor_pool, message_factory

    F = descriptor_pb2.FieldDescriptorProto
    file = descriptor_pb2.FileDescriptorProto(name="mathgrpo_test_event.proto", package="mathgrpo_test")

    def message(name, fields):
        proto = file.message_type.add(name=name)
        for field_name, number, kind, label, type_name in fields:
            proto.field.add(name=field_name, number=number, type=kind, label=label, type_name=type_name)

    message("Value", [("tag", 1, F.TYPE_STRING, F.LABEL_OPTIONAL, None),
                      ("simple_value", 2, F.TYPE_FLOAT, F.LABEL_OPTIONAL, None)])
    message("Summary", [("value", 1, F.TYPE_MESSAGE, F.LABEL_REPEATED, ".mathgrpo_test.Value")])
    message("Event", [("wall_time", 1, F.TYPE_DOUBLE, F.LABEL_OPTIONAL, None),
                      ("step", 2, F.TYPE_INT64, F.LABEL_OPTIONAL, None),
                      ("file_version", 3, F.TYPE_STRING, F.LABEL_OPTIONAL, None),
                      ("summary", 5, F.TYPE_MESSAGE, F.LABEL_OPTIONAL, ".mathgrpo_test.Summary")])
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("mathgrpo_test.Event"))


def test_varint_encoding():
    # Protobuf's documented example: 150 → 96 01; 300 → AC 02; −1 as int64 → ten bytes.
    assert sinks._varint(150) == b"\x96\x01" and sinks._varint(300) == b"\xac\x02"
    assert sinks._varint(-1) == b"\xff" * 9 + b"\x01"


def test_tensorboard_event_file(tmp_path, capsys):
    steps = {1: {"critic/score/mean": 0.25, "actor/grad_norm": 1.5},
             2: {"critic/score/mean": 0.5, "actor/grad_norm": float("nan"), "val-core/AIME24/acc/mean@16": 0.1},
             300: {"critic/score/mean": 0.75, "perf/huge": 1e39}}  # beyond float32 → +inf
    with sinks.MetricsLogger(tmp_path, total_steps=300) as logger:
        for step, values in steps.items():
            logger.log(step, values)
    files = list((tmp_path / "tensorboard").iterdir())
    assert len(files) == 1 and files[0].name.startswith("events.out.tfevents.")
    events = [decode_event(record) for record in read_tfrecords(files[0])]
    assert events[0]["file_version"] == "brain.Event:2" and events[0]["scalars"] == {}
    assert [event["step"] for event in events[1:]] == [1, 2, 300]
    for event, values in zip(events[1:], steps.values()):
        assert event["wall_time"] > 1.6e9  # seconds since the epoch
        assert event["scalars"].keys() == values.keys()
        for tag, value in values.items():
            got = event["scalars"][tag]
            expected = math.inf if value > 3.5e38 else np.float32(value)
            assert (math.isnan(got) and math.isnan(value)) or got == expected, tag
    Event = event_message_class()
    parsed = [Event.FromString(record) for record in read_tfrecords(files[0])]
    assert parsed[0].file_version == "brain.Event:2"
    assert [(v.tag, v.simple_value) for v in parsed[1].summary.value] == [("critic/score/mean", 0.25),
                                                                        ("actor/grad_norm", 1.5)]
    assert parsed[3].step == 300 and parsed[3].summary.value[0].simple_value == 0.75
    capsys.readouterr()


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
# PNG curves.


def decode_png(path):
    """→ (RGB array [H, W, 3], {tEXt keyword: text}); checks the signature and every chunk CRC."""
    data = Path(path).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    offset, idat, text, header = 8, b"", {}, None
    kinds = []
    while offset < len(data):
        (length,) = struct.unpack(">I", data[offset:offset + 4])
        kind, body = data[offset + 4:offset + 8], data[offset + 8:offset + 8 + length]
        (crc,) = struct.unpack(">I", data[offset + 8 + length:offset + 12 + length])
        assert crc == zlib.crc32(kind + body), kind
        kinds.append(kind)
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat += body
        elif kind == b"tEXt":
            keyword, value = body.split(b"\0", 1)
            text[keyword.decode("latin-1")] = value.decode("latin-1")
        offset += 12 + length
    assert kinds[0] == b"IHDR" and kinds[-1] == b"IEND"
    width, height, depth, color_type, compression, filtering, interlace = header
    assert (depth, color_type, compression, filtering, interlace) == (8, 2, 0, 0, 0)
    raw = np.frombuffer(zlib.decompress(idat), np.uint8).reshape(height, 1 + 3 * width)
    pixels = np.zeros((height, 3 * width), np.int32)
    for y in range(height):  # undo the row filters (None, Sub, Up, Average, Paeth), bpp = 3
        kind, row, previous = raw[y, 0], raw[y, 1:].astype(np.int32), pixels[y - 1] if y else np.zeros(3 * width)
        out = pixels[y]
        if kind in (0, 2):  # None / Up need no left neighbour: vectorized
            out[:] = (row + (previous if kind == 2 else 0)) & 0xFF
            continue
        for x in range(3 * width):
            a = out[x - 3] if x >= 3 else 0
            b, c = previous[x], previous[x - 3] if x >= 3 else 0
            if kind == 0:
                predictor = 0
            elif kind == 1:
                predictor = a
            elif kind == 2:
                predictor = b
            elif kind == 3:
                predictor = (a + b) // 2
            else:
                p = a + b - c
                predictor = min((abs(p - a), 0, a), (abs(p - b), 1, b), (abs(p - c), 2, c))[2]
            out[x] = (row[x] + predictor) & 0xFF
    return pixels.reshape(height, width, 3).astype(np.uint8), text


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
    image, text = decode_png(path)
    keys = ["critic/score/mean", "response_length/mean", "actor/entropy", "val-core/AIME24/acc/mean@16"]
    assert [panel["key"] for panel in panels] == keys  # grad_norm absent; best@16 is not a mean@ curve
    assert panels[0]["y_range"][1] < 1.0  # the re-logged step 20 (0.9) replaced the first one (1.0)
    assert text["Comment"].split("\n") == keys
    assert image.shape == (2 * plots.PANEL_HEIGHT, 2 * plots.PANEL_WIDTH, 3)
    line = np.all(image == plots.LINE_COLOR, axis=-1)
    background = np.all(image == plots.BACKGROUND, axis=-1)
    inside = np.zeros_like(line)
    for panel in panels:
        left, top, right, bottom = panel["box"]
        inside[top:bottom + 1, left:right + 1] = True
        (first, last), (low, high) = panel["x_range"], panel["y_range"]
        data = {row["step"]: row[panel["key"]] for row in rows if row.get(panel["key"]) is not None}
        assert low < min(data.values()) and high > max(data.values())
        for step, value in data.items():
            x = round(left + (step - first) / (last - first) * (right - left))
            y = round(bottom - (value - low) / (high - low) * (bottom - top))
            assert line[y, x], (panel["key"], step)
            # No segment is steeper than 45°, so the column through a point holds only that point's pixel.
            column = np.flatnonzero(line[top:bottom + 1, x]) + top
            assert column.min() >= y - 1 and column.max() <= y + 1, (panel["key"], step)
    # The score rises from bottom-left to top-right: the box's top-left and bottom-right corners stay empty.
    left, top, right, bottom = panels[0]["box"]
    assert background[top:top + 40, left:left + 80].all() and background[bottom - 40:bottom, right - 80:right].all()
    # Entropy has a gap at step 7: nothing drawn strictly between steps 6 and 8.
    left, top, right, bottom = panels[2]["box"]
    (first, last) = panels[2]["x_range"]
    x6, x8 = (round(left + (s - first) / (last - first) * (right - left)) for s in (6, 8))
    assert not line[top:bottom + 1, x6 + 1:x8].any()
    assert not (line & ~inside).any()  # the curves stay inside their boxes
    # The title starts at (4, 5) of the first panel with a "C" in the 5x7 font.
    letter_c = [".###.", "#...#", "#....", "#....", "#....", "#...#", ".###."]
    drawn = np.all(image[5:12, 4:9] == plots.AXES_COLOR, axis=-1)
    assert ["".join("#" if bit else "." for bit in row) for row in drawn] == letter_c


def test_plot_curves_without_data(tmp_path):
    with pytest.raises(ValueError, match="no finite values"):
        plots.plot_curves([{"step": 1, "other": 1.0}], tmp_path / "empty.png")
