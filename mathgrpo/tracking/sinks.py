"""Where metrics go: metrics.jsonl, samples.jsonl, TensorBoard event files, a progress line."""

from __future__ import annotations

import json
import math
import os
import socket
import struct
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np


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
