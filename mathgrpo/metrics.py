"""Training metrics with verl's names and formulas, and where they go: JSONL, TensorBoard, stdout, PNG.

Computations (pure numpy; recipe_spec §2.8), each reproducing a verl function:
- `data_metrics`       `verl/trainer/ppo/metric_utils.py::compute_data_metrics`: critic/score|rewards|
                       advantages|returns/{mean,max,min}, response_length[_non_aborted]/{mean,max,min,
                       clip_ratio}, response/aborted_ratio, prompt_length/{mean,max,min,clip_ratio}.
- `timing_metrics`     `compute_timing_metrics`: timing_s/*, timing_per_token_ms/* (gen ÷ response
                       tokens; ref, values, adv, update_critic, update_actor ÷ prompt + response tokens).
- `throughput_metrics` `compute_throughout_metrics`: perf/{total_num_tokens,time_per_step,throughput}.
- `mfu`                `verl/utils/flops_counter.py` (qwen2/qwen3 estimate) as used for perf/mfu/actor.
- `memory_metrics`     perf/max_memory_{allocated,reserved}_gb, perf/cpu_memory_used_gb (GiB, as verl).
- `reduce_metrics`     `verl/utils/metric`: max if "max" is in the key, else min if "min", else mean.

Sinks: `MetricsLogger` (metrics.jsonl, samples.jsonl, a TensorBoard event file written by hand, a
one-line progress display), `read_metrics_jsonl`, `plot_curves` (a PNG rasterized with numpy).

Departures from verl:
- Inputs are per-response arrays, not padded token tensors. A response's advantage is broadcast
  over its tokens, so advantage/return statistics weight each response by its length (verl's
  masked_select over response tokens). Arithmetic is float64 (verl: float32 torch).
- verl takes max_response_length / max_prompt_length from the padded tensor widths; here they are
  passed in (the config values, which are those widths when batches are padded to the maximum).
- critic/returns equal critic/advantages (GRPO has no critic); critic/true_reward (a fork-only
  key) and critic/values are not emitted.
- perf/cpu_memory_used_gb is this process's peak RSS; verl logs psutil's node-wide used memory.
- perf/max_memory_reserved_gb reads XLA's allocator pool (peak_pool_bytes), torch's counterpart.
"""

from __future__ import annotations

import fnmatch
import json
import math
import os
import resource
import socket
import struct
import sys
import time
import zlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

GIB = 1024**3

# ---------------------------------------------------------------------------------------------------
# Per-step computations.


def _vector(values: Any, name: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1 or array.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D array (one value per response), got shape {array.shape}")
    return array


def _stats(prefix: str, values: np.ndarray) -> dict[str, float]:
    return {f"{prefix}/mean": float(np.mean(values)), f"{prefix}/max": float(np.max(values)),
            f"{prefix}/min": float(np.min(values))}


def data_metrics(*, scores, advantages, response_lengths, prompt_lengths, max_response_length: int,
                 max_prompt_length: int, rewards=None) -> dict[str, float]:
    """verl's compute_data_metrics from per-response arrays [S] (S = prompts × n).

    scores: the sequence score (sum of token_level_scores); rewards: the sequence reward, equal to
    scores when no KL penalty is in the reward (the recipe); advantages: one per response.
    A response of length 0 is "aborted": score and reward statistics skip it, as in verl.
    """
    scores = _vector(scores, "scores")
    arrays = {"advantages": _vector(advantages, "advantages"),
              "response_lengths": _vector(response_lengths, "response_lengths"),
              "prompt_lengths": _vector(prompt_lengths, "prompt_lengths"),
              "rewards": scores if rewards is None else _vector(rewards, "rewards")}
    for name, array in arrays.items():
        if array.shape != scores.shape:
            raise ValueError(f"{name} has {array.size} values but scores has {scores.size}: one per response")
    advantages, response_lengths = arrays["advantages"], arrays["response_lengths"]
    prompt_lengths, rewards = arrays["prompt_lengths"], arrays["rewards"]
    live = response_lengths > 0
    if not live.any():
        raise ValueError("every response is empty (length 0); verl raises here too")
    # Token-weighted: response i contributes advantage_i once per response token.
    token_advantage_mean = float(np.sum(advantages * response_lengths) / np.sum(response_lengths))
    advantage_stats = {"mean": token_advantage_mean, "max": float(np.max(advantages[live])),
                       "min": float(np.min(advantages[live]))}
    live_lengths = response_lengths[live]
    return {
        **_stats("critic/score", scores[live]),
        **_stats("critic/rewards", rewards[live]),
        **{f"critic/advantages/{k}": v for k, v in advantage_stats.items()},
        **{f"critic/returns/{k}": v for k, v in advantage_stats.items()},  # GRPO: returns = advantages
        **_stats("response_length", response_lengths),
        "response_length/clip_ratio": float(np.mean(response_lengths == max_response_length)),
        **_stats("response_length_non_aborted", live_lengths),
        "response_length_non_aborted/clip_ratio": float(np.mean(live_lengths == max_response_length)),
        "response/aborted_ratio": float(np.mean(~live)),
        **_stats("prompt_length", prompt_lengths),
        "prompt_length/clip_ratio": float(np.mean(prompt_lengths == max_prompt_length)),
    }


# verl's compute_timing_metrics: which token count each per-token timing divides by.
_PER_RESPONSE_TOKEN = ("gen",)
_PER_TOKEN = ("ref", "values", "adv", "update_critic", "update_actor")


def timing_metrics(timings: Mapping[str, float], *, response_tokens: int, total_tokens: int) -> dict[str, float]:
    """timing_s/{name} for every timing; timing_per_token_ms/{name} for verl's stages that have one."""
    metrics = {f"timing_s/{name}": float(seconds) for name, seconds in timings.items()}
    for names, tokens in ((_PER_RESPONSE_TOKEN, response_tokens), (_PER_TOKEN, total_tokens)):
        for name in names:
            if name in timings and tokens > 0:
                metrics[f"timing_per_token_ms/{name}"] = float(timings[name]) * 1000.0 / tokens
    return metrics


def throughput_metrics(*, total_tokens: int, step_time: float, n_devices: int) -> dict[str, float]:
    """perf/throughput = prompt + response tokens of the step / (step wall time · devices)."""
    return {"perf/total_num_tokens": float(total_tokens), "perf/time_per_step": float(step_time),
            "perf/throughput": total_tokens / (step_time * n_devices)}


def dense_parameters(model) -> int:
    """verl's N_dense = (3·D·F + D·(q + k + v + o))·L + 2·V·D, q = o = N·H, k = v = K·H.

    The embedding and LM head are both counted, tied or not (verl does the same)."""
    D, F, L, V = model.hidden_size, model.intermediate_size, model.num_hidden_layers, model.vocab_size
    N, K, H = model.num_attention_heads, model.num_key_value_heads, model.head_dim
    return (3 * D * F + D * (N * H + 2 * K * H + N * H)) * L + 2 * V * D


def flops_per_step(model, sequence_lengths: Iterable[int]) -> float:
    """verl's forward + backward estimate: 6·N_dense·Σ tokens + 12·Σ seqlen²·H·N·L (full square)."""
    lengths = np.asarray(list(sequence_lengths), dtype=np.int64)
    attention = 12 * model.head_dim * model.num_attention_heads * model.num_hidden_layers
    return float(6 * dense_parameters(model) * int(lengths.sum()) + attention * int((lengths * lengths).sum()))


def model_flops_per_step(model, sequence_lengths: Iterable[int]) -> float:
    """The matmul FLOPs a forward + backward of the model must execute, the usual MFU accounting:
    6·(layer weights + LM head)·Σ tokens + 6·Σ seqlen²·H·N·L (causal: half the score square).

    Unlike verl's estimate it counts no FLOPs for the embedding lookup (a gather) and half the
    attention square; it counts the head on every token, also where a step skips it (prompts)."""
    lengths = np.asarray(list(sequence_lengths), dtype=np.int64)
    weights = dense_parameters(model) - model.vocab_size * model.hidden_size  # without the embedding table
    attention = 6 * model.head_dim * model.num_attention_heads * model.num_hidden_layers
    return float(6 * weights * int(lengths.sum()) + attention * int((lengths * lengths).sum()))


def mfu(model, *, sequence_lengths: Iterable[int], seconds: float, n_devices: int, peak_flops: float,
        ppo_epochs: int = 1) -> float:
    """perf/mfu/actor: est_flops · ppo_epochs / seconds / peak_flops / n_devices.

    sequence_lengths: prompt + response length of every sequence of the step (all devices);
    seconds: wall time of the actor update (all epochs); peak_flops: per device (989e12, H100)."""
    return flops_per_step(model, sequence_lengths) * ppo_epochs / seconds / peak_flops / n_devices


def memory_metrics(device=None) -> dict[str, float]:
    """Peak device memory from XLA's allocator (when the backend reports it) and peak process RSS, in GiB."""
    if device is None:
        import jax  # lazy: the computations above need no JAX

        device = jax.local_devices()[0]
    try:
        stats = device.memory_stats() or {}
    except Exception:  # some backends raise instead of returning None
        stats = {}
    metrics = {}
    allocated = stats.get("peak_bytes_in_use", stats.get("bytes_in_use"))
    reserved = next((stats[k] for k in ("peak_pool_bytes", "pool_bytes", "peak_bytes_reserved") if k in stats), None)
    if allocated is not None:
        metrics["perf/max_memory_allocated_gb"] = allocated / GIB
    if reserved is not None:
        metrics["perf/max_memory_reserved_gb"] = reserved / GIB
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    metrics["perf/cpu_memory_used_gb"] = peak_rss * (1 if sys.platform == "darwin" else 1024) / GIB
    return metrics


def reduce_metrics(metrics: Sequence[Mapping[str, float]] | Mapping[str, Sequence[float]]) -> dict[str, float]:
    """Reduce per-micro-batch (or per-rank) metrics: np.max if "max" in the key, np.min if "min", else mean.

    Takes a list of dicts (a key missing from some dicts is reduced over those that have it) or
    verl's own form, a dict of lists."""
    if isinstance(metrics, Mapping):
        collected = {key: list(values) for key, values in metrics.items()}
    else:
        collected = {}
        for row in metrics:
            for key, value in row.items():
                collected.setdefault(key, []).append(value)
    reduced = {}
    for key, values in collected.items():
        reduce = np.max if "max" in key else np.min if "min" in key else np.mean
        reduced[key] = float(reduce(values)) if values else math.nan
    return reduced


# ---------------------------------------------------------------------------------------------------
# TensorBoard event files: TFRecord framing (masked CRC-32C) around hand-encoded Event protobufs.


def _crc32c_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1  # Castagnoli, reflected
        table.append(crc)
    return table


_CRC32C_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC32C_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    """TFRecord's mask: rotate right by 15 bits and add a constant."""
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def tfrecord(data: bytes) -> bytes:
    """uint64 length, masked crc of the length, data, masked crc of the data (little-endian)."""
    length = struct.pack("<Q", len(data))
    return length + struct.pack("<I", masked_crc32c(length)) + data + struct.pack("<I", masked_crc32c(data))


def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # negative int64 → ten-byte two's complement, as protobuf does
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _length_delimited(field: int, payload: bytes) -> bytes:
    return _varint(field << 3 | 2) + _varint(len(payload)) + payload


def _float32(value: float) -> bytes:
    try:
        return struct.pack("<f", value)
    except OverflowError:  # beyond float32: TensorBoard gets ±inf rather than a lost step
        return struct.pack("<f", math.copysign(math.inf, value))


def event_bytes(wall_time: float, step: int, *, scalars: Mapping[str, float] | None = None,
                file_version: str | None = None) -> bytes:
    """A serialized tensorflow `Event`: wall_time=1 (double), step=2 (int64), file_version=3,
    summary=5 → Summary.value=1 → {tag=1 (string), simple_value=2 (float)}."""
    out = _varint(1 << 3 | 1) + struct.pack("<d", wall_time) + _varint(2 << 3 | 0) + _varint(step)
    if file_version is not None:
        out += _length_delimited(3, file_version.encode())
    if scalars:
        values = b"".join(
            _length_delimited(1, _length_delimited(1, tag.encode()) + _varint(2 << 3 | 5) + _float32(value))
            for tag, value in scalars.items())
        out += _length_delimited(5, values)
    return out


# ---------------------------------------------------------------------------------------------------
# The logger.

PROGRESS_KEYS = ("critic/score/mean", "response_length/mean", "actor/entropy", "actor/grad_norm")


def _json_default(value: Any) -> Any:
    if hasattr(value, "tolist"):  # numpy / JAX scalars and arrays
        return value.tolist()
    return str(value)


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def format_number(value: float) -> str:
    if not math.isfinite(value):
        return str(value)
    return f"{value:.0f}" if abs(value) >= 100 else f"{value:.3g}"


def format_duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


class MetricsLogger:
    """Per-step sink: run_dir/metrics.jsonl, run_dir/samples.jsonl, run_dir/tensorboard/, stdout.

    Only process 0 should write: the trainer passes enabled=(jax.process_index() == 0); a disabled
    logger touches no file and prints nothing. Files are appended to, so a resumed run continues them.
    """

    def __init__(self, run_dir: str | os.PathLike, *, enabled: bool = True, total_steps: int | None = None):
        self.enabled, self.total_steps = enabled, total_steps
        self._step_times: list[float] = []
        self._last_log = time.time()
        if not enabled:
            return
        self.run_dir = os.fspath(run_dir)
        os.makedirs(os.path.join(self.run_dir, "tensorboard"), exist_ok=True)
        self._metrics_file = open(os.path.join(self.run_dir, "metrics.jsonl"), "a", encoding="utf-8")
        self._samples_file = open(os.path.join(self.run_dir, "samples.jsonl"), "a", encoding="utf-8")
        name = f"events.out.tfevents.{int(self._last_log)}.{socket.gethostname()}"
        self.event_path = os.path.join(self.run_dir, "tensorboard", name)
        self._events_file = open(self.event_path, "ab")
        self._events_file.write(tfrecord(event_bytes(self._last_log, 0, file_version="brain.Event:2")))
        self._events_file.flush()

    def log(self, step: int, metrics: Mapping[str, float], samples: Sequence[Mapping[str, Any]] | None = None):
        if not self.enabled:
            return
        if "step" in metrics:
            raise ValueError("'step' is not a metric name: it is the row's key in metrics.jsonl")
        now = time.time()
        values = {}
        for key, value in metrics.items():
            try:
                values[key] = float(value)
            except (TypeError, ValueError):
                raise TypeError(f"metric {key!r} = {value!r} is not a number") from None
        row = {"step": int(step), **{key: _finite_or_none(value) for key, value in values.items()}}
        self._metrics_file.write(json.dumps(row, allow_nan=False) + "\n")
        self._metrics_file.flush()
        for sample in samples or ():
            self._samples_file.write(json.dumps({"step": int(step), **sample}, default=_json_default) + "\n")
        self._samples_file.flush()
        self._events_file.write(tfrecord(event_bytes(now, int(step), scalars=values)))
        self._events_file.flush()
        step_time = values.get("timing_s/step", now - self._last_log)
        self._last_log = now
        self._step_times.append(step_time)
        print(self.progress_line(int(step), values), flush=True)

    def progress_line(self, step: int, values: Mapping[str, float]) -> str:
        """`step 12/279 | critic/score/mean 0.41 | ... | 35.2 s/step | eta 2:31:10` (val-core/* when present)."""
        parts = [f"step {step}/{self.total_steps}" if self.total_steps else f"step {step}"]
        keys = [k for k in PROGRESS_KEYS if k in values] + sorted(k for k in values if k.startswith("val-core/"))
        parts += [f"{key} {format_number(values[key])}" for key in keys]
        if self._step_times:
            recent = float(np.mean(self._step_times[-10:]))  # the first step also pays compilation
            parts.append(f"{recent:.1f} s/step")
            if self.total_steps:
                parts.append(f"eta {format_duration(max(self.total_steps - step, 0) * recent)}")
        return " | ".join(parts)

    def close(self):
        if self.enabled:
            for handle in (self._metrics_file, self._samples_file, self._events_file):
                handle.close()
            self.enabled = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def read_metrics_jsonl(path: str | os.PathLike) -> list[dict]:
    """The rows of a metrics.jsonl as written (a resumed run may repeat steps; later rows are newer)."""
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


# ---------------------------------------------------------------------------------------------------
# Curves as a PNG: numpy raster, a 5x7 bitmap font, zlib + struct encoding.

# Each glyph: its character, then 7 rows of 5 bits (bit 4 = leftmost column) as 14 hex digits.
# Lowercase draws as uppercase; a character without a glyph draws as blank.
_FONT = {token[0]: bytes.fromhex(token[1:]) for token in """
    00E11131519110E 1040C040404040E 20E11010204081F 31F02040201110E 402060A121F0202 51F101E0101110E
    60608101E11110E 71F010204080808 80E11110E11110E 90E11110F01020C A0E1111111F1111 B1E11111E11111E
    C0E11101010110E D1C12111111121C E1F10101E10101F F1F10101E101010 G0E11101711110F H1111111F111111
    I0E04040404040E J0702020202120C K11121418141211 L1010101010101F M111B1515111111 N11111915131111
    O0E11111111110E P1E11111E101010 Q0E11111115120D R1E11111E141211 S0F10100E01011E T1F040404040404
    U1111111111110E V11111111110A04 W1111111515150A X11110A040A1111 Y1111110A040404 Z1F01020408101F
    /00010204081000 -0000001F000000 _0000000000001F .00000000000C0C +0004041F040400 :000C0C000C0C00
    @0E11010D15150E %18190204081303 ?0E110102040004 =00001F001F0000 (02040808080402 )08040202020408
    """.split()}
GLYPH_WIDTH, GLYPH_HEIGHT, GLYPH_ADVANCE = 5, 7, 6

DEFAULT_PLOT_KEYS = ("critic/score/mean", "response_length/mean", "actor/entropy", "actor/grad_norm",
                     "val-core/*/mean@*")
PANEL_WIDTH, PANEL_HEIGHT, PANEL_COLUMNS = 360, 220, 2
_MARGIN_LEFT, _MARGIN_RIGHT, _MARGIN_TOP, _MARGIN_BOTTOM = 60, 12, 20, 20
BACKGROUND, AXES_COLOR, LINE_COLOR = (255, 255, 255), (0, 0, 0), (31, 119, 180)


def glyph_bitmap(char: str) -> np.ndarray:
    """[7, 5] bool pixels of a character (blank when the font has none)."""
    rows = _FONT.get(char.upper(), bytes(GLYPH_HEIGHT))
    return np.array([[row >> (GLYPH_WIDTH - 1 - col) & 1 for col in range(GLYPH_WIDTH)] for row in rows], bool)


def draw_text(image: np.ndarray, x: int, y: int, text: str, color=AXES_COLOR) -> None:
    """Draws text with its top-left corner at (x, y), clipped to the image."""
    for index, char in enumerate(text):
        left = x + GLYPH_ADVANCE * index
        region = image[max(y, 0):y + GLYPH_HEIGHT, max(left, 0):left + GLYPH_WIDTH]
        bits = glyph_bitmap(char)[max(-y, 0):, max(-left, 0):][:region.shape[0], :region.shape[1]]
        region[bits] = color


def draw_line(image: np.ndarray, x0: int, y0: int, x1: int, y1: int, color=LINE_COLOR) -> None:
    """One pixel per step along the longer axis (a DDA line)."""
    count = max(abs(x1 - x0), abs(y1 - y0)) + 1
    xs = np.rint(np.linspace(x0, x1, count)).astype(int)
    ys = np.rint(np.linspace(y0, y1, count)).astype(int)
    image[ys, xs] = color


def write_png(path: str | os.PathLike, image: np.ndarray, text: Mapping[str, str] | None = None) -> None:
    """8-bit RGB PNG (filter 0 on every row), with tEXt chunks; written atomically."""
    height, width, _ = image.shape
    rows = np.concatenate([np.zeros((height, 1), np.uint8), image.astype(np.uint8).reshape(height, width * 3)], 1)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    for keyword, value in (text or {}).items():
        png += chunk(b"tEXt", keyword.encode("latin-1") + b"\0" + value.encode("latin-1", "replace"))
    png += chunk(b"IDAT", zlib.compress(rows.tobytes(), 6)) + chunk(b"IEND", b"")
    temporary = f"{os.fspath(path)}.tmp"
    with open(temporary, "wb") as handle:
        handle.write(png)
    os.replace(temporary, path)


def _series(rows: Sequence[Mapping[str, Any]], keys: Sequence[str]) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(key, steps, values) per matched key; a step logged twice (resumed run) keeps its last value."""
    present = list(dict.fromkeys(key for row in rows for key in row if key != "step"))
    matched = []
    for pattern in keys:
        matched += sorted(k for k in present if fnmatch.fnmatchcase(k, pattern)) if any(
            c in pattern for c in "*?[") else [pattern] if pattern in present else []
    series = []
    for key in dict.fromkeys(matched):
        by_step = {int(row["step"]): row[key] for row in rows if key in row}
        steps = np.array(sorted(by_step), dtype=np.float64)
        values = np.array([np.nan if by_step[s] is None else by_step[s] for s in sorted(by_step)], np.float64)
        if np.isfinite(values).any():
            series.append((key, steps, values))
    return series


def plot_curves(rows: Sequence[Mapping[str, Any]], path_png: str | os.PathLike,
                keys: Sequence[str] = DEFAULT_PLOT_KEYS) -> list[dict]:
    """One panel per curve (keys are names or fnmatch patterns), two panels a row, written as a PNG.

    Returns each panel's layout: `box` = (left, top, right, bottom) pixels, where step x_range[0]
    maps to left, x_range[1] to right, value y_range[1] to top and y_range[0] to bottom (rounded).
    """
    series = _series(rows, keys)
    if not series:
        raise ValueError(f"no finite values for any of {list(keys)} in {len(rows)} metric rows")
    columns = min(PANEL_COLUMNS, len(series))
    image = np.empty((math.ceil(len(series) / columns) * PANEL_HEIGHT, columns * PANEL_WIDTH, 3), np.uint8)
    image[:] = BACKGROUND
    panels = []
    for index, (key, steps, values) in enumerate(series):
        origin_x, origin_y = (index % columns) * PANEL_WIDTH, (index // columns) * PANEL_HEIGHT
        left, top = origin_x + _MARGIN_LEFT, origin_y + _MARGIN_TOP
        right, bottom = origin_x + PANEL_WIDTH - _MARGIN_RIGHT, origin_y + PANEL_HEIGHT - _MARGIN_BOTTOM
        finite = values[np.isfinite(values)]
        low, high = float(finite.min()), float(finite.max())
        pad = (high - low) * 0.05 if high > low else max(abs(low) * 0.05, 0.5)
        low, high = low - pad, high + pad
        first = float(steps[0])
        last = float(steps[-1]) if steps[-1] > first else first + 1  # one step: a point at the left
        xs = np.rint(left + (steps - first) / (last - first) * (right - left)).astype(int)
        ys = np.rint(bottom - (values - low) / (high - low) * (bottom - top))
        draw_line(image, left - 1, top, left - 1, bottom + 1, AXES_COLOR)
        draw_line(image, left - 1, bottom + 1, right, bottom + 1, AXES_COLOR)
        draw_text(image, origin_x + 4, origin_y + 5, key)
        draw_text(image, origin_x + 2, top, format_number(high)[:9])
        draw_text(image, origin_x + 2, bottom - GLYPH_HEIGHT, format_number(low)[:9])
        draw_text(image, left, bottom + 6, format_number(first))
        end_label = format_number(float(steps[-1]))
        draw_text(image, right - GLYPH_ADVANCE * len(end_label), bottom + 6, end_label)
        ok = np.isfinite(values)
        for i in range(len(values)):
            if not ok[i]:
                continue
            if i + 1 < len(values) and ok[i + 1]:
                draw_line(image, xs[i], int(ys[i]), xs[i + 1], int(ys[i + 1]))
            elif not (i > 0 and ok[i - 1]):  # an isolated point: a 3x3 dot
                image[int(ys[i]) - 1:int(ys[i]) + 2, xs[i] - 1:xs[i] + 2] = LINE_COLOR
        panels.append({"key": key, "box": (left, top, right, bottom), "x_range": (first, last),
                       "y_range": (low, high)})
    write_png(path_png, image, {"Title": "mathgrpo training curves", "Comment": "\n".join(s[0] for s in series)})
    return panels
