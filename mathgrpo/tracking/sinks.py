"""Where metrics go, chosen by name as verl's `trainer.logger` list does.

- `console`: one progress line a step on stdout (the headline metrics, seconds a step, time left).
- `jsonl`: run_dir/metrics.jsonl (one row a step, non-finite values as null) and run_dir/samples.jsonl.
- `tensorboard`: event files under run_dir/tensorboard, written by tensorboardX, one scalar a metric.
- `wandb`: a Weights & Biases run (the `wandb` package, imported only when chosen). `WANDB_MODE`
  decides online or offline; its files go under run_dir/wandb and its run id is kept in
  run_dir/wandb_run_id, so a resumed training run continues the same W&B run.

`make_logger(kinds, run_dir, ...)` builds one `MetricsLogger` that fans each step out to the chosen
sinks. Only process 0 writes: a logger built with enabled=False touches no file, prints nothing and
imports no sink library. Files are appended to, so a resumed run continues them.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import secrets
import string
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from mathgrpo.config import DEFAULT_LOGGERS, LOGGERS, check_loggers

SINKS, DEFAULT_SINKS = LOGGERS, DEFAULT_LOGGERS
PROGRESS_KEYS = ("critic/score/mean", "response_length/mean", "actor/entropy", "actor/grad_norm")
WANDB_RUN_ID_FILE = "wandb_run_id"


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


class _JsonlSink:
    """run_dir/metrics.jsonl and run_dir/samples.jsonl, flushed every step."""

    def __init__(self, run_dir: str):
        self._metrics_file = open(os.path.join(run_dir, "metrics.jsonl"), "a", encoding="utf-8")
        self._samples_file = open(os.path.join(run_dir, "samples.jsonl"), "a", encoding="utf-8")

    def write(self, step: int, values: Mapping[str, float], samples: Sequence[Mapping[str, Any]], now: float):
        row = {"step": step, **{key: _finite_or_none(value) for key, value in values.items()}}
        self._metrics_file.write(json.dumps(row, allow_nan=False) + "\n")
        self._metrics_file.flush()
        for sample in samples:
            self._samples_file.write(json.dumps({"step": step, **sample}, default=_json_default) + "\n")
        self._samples_file.flush()

    def close(self):
        self._metrics_file.close()
        self._samples_file.close()


_TENSORBOARD_WRITERS = itertools.count()


class _TensorBoardSink:
    """tensorboardX event files under run_dir/tensorboard: one event a step with each metric a scalar.

    The scalars go in as a `Summary` through tensorboardX's `FileWriter` rather than `add_scalar`,
    which rewrites tags to TensorFlow node names ('val-core/AIME24/acc/mean@16' would become
    '..._16'); the tags stay verl's names, as torch's SummaryWriter in verl keeps them. NaN and ±inf
    are written as they are (TensorBoard stores and marks them: a NaN grad norm is worth seeing);
    values beyond float32 become ±inf.
    """

    def __init__(self, run_dir: str):
        from tensorboardX import FileWriter
        from tensorboardX.proto.summary_pb2 import Summary

        self._summary = Summary
        self.log_dir = os.path.join(run_dir, "tensorboard")
        # tensorboardX names a file by the second and the host and truncates it: the pid and a counter
        # keep a second writer in the same second (a quick resume) from clobbering the first.
        suffix = f".{os.getpid()}.{next(_TENSORBOARD_WRITERS)}"
        self._writer = FileWriter(self.log_dir, filename_suffix=suffix)

    def write(self, step: int, values: Mapping[str, float], samples: Sequence[Mapping[str, Any]], now: float):
        summary = self._summary(value=[self._summary.Value(tag=key, simple_value=value)
                                       for key, value in values.items()])
        self._writer.add_summary(summary, step, walltime=now)
        self._writer.flush()

    def close(self):
        self._writer.close()


class _WandbSink:
    """A W&B run: `wandb.init(project, name, dir=run_dir, config, id, resume="allow")`, `log(step=...)`.

    Samples go to a `samples` table at their step. The run id lives in run_dir/wandb_run_id, so a
    training run resumed in the same run_dir continues the same W&B run (offline runs with the id
    sync into one). W&B drops rows for steps at or below the last one it has.
    """

    def __init__(self, run_dir: str, project_name: str, experiment_name: str, config: Mapping[str, Any] | None):
        try:
            import wandb
        except ImportError as error:
            raise ImportError("the 'wandb' logger needs the wandb package: pip install wandb "
                              "(and `wandb login`, or WANDB_MODE=offline)") from error
        self._wandb = wandb
        id_path = os.path.join(run_dir, WANDB_RUN_ID_FILE)
        if os.path.exists(id_path):
            with open(id_path, encoding="utf-8") as handle:
                run_id = handle.read().strip()
        else:
            run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))  # as W&B's
            with open(id_path, "w", encoding="utf-8") as handle:
                handle.write(run_id + "\n")
        self.run = wandb.init(project=project_name, name=experiment_name, dir=run_dir,
                              config=dict(config) if config is not None else None, id=run_id, resume="allow",
                              mode=os.environ.get("WANDB_MODE"))  # None: W&B's own settings (online by default)

    def write(self, step: int, values: Mapping[str, float], samples: Sequence[Mapping[str, Any]], now: float):
        data: dict[str, Any] = dict(values)
        if samples:
            columns = list(dict.fromkeys(key for sample in samples for key in sample))
            rows = [[_table_cell(sample.get(column)) for column in columns] for sample in samples]
            data["samples"] = self._wandb.Table(columns=["step", *columns], data=[[step, *row] for row in rows])
        self.run.log(data, step=step)

    def close(self):
        self.run.finish()


def _table_cell(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    value = _json_default(value)
    return value if isinstance(value, (bool, int, float, str)) else json.dumps(value)


class MetricsLogger:
    """Per-step metrics to the chosen sinks (`SINKS`); the default is console + jsonl + tensorboard.

    `log(step, metrics, samples)` checks every metric is a number (TypeError naming the key) and that
    none is called 'step', then hands the float values to each sink.
    """

    def __init__(self, run_dir: str | os.PathLike, *, enabled: bool = True, total_steps: int | None = None,
                 sinks: Iterable[str] = DEFAULT_SINKS, project_name: str = "mathgrpo",
                 experiment_name: str = "qwen3_4b_base_grpo", config: Mapping[str, Any] | None = None):
        self.sinks = check_loggers(sinks, "logger")
        self.enabled, self.total_steps = enabled, total_steps
        self._step_times: list[float] = []
        self._last_log = time.time()
        self._writers: list[Any] = []
        if not enabled:
            return
        self.run_dir = os.fspath(run_dir)
        if set(self.sinks) - {"console"}:
            os.makedirs(self.run_dir, exist_ok=True)
        try:
            for kind in self.sinks:
                if kind == "jsonl":
                    self._writers.append(_JsonlSink(self.run_dir))
                elif kind == "tensorboard":
                    self._writers.append(_TensorBoardSink(self.run_dir))
                elif kind == "wandb":
                    self._writers.append(_WandbSink(self.run_dir, project_name, experiment_name, config))
        except BaseException:
            self.close()
            raise

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
        for writer in self._writers:
            writer.write(int(step), values, samples or (), now)
        step_time = values.get("timing_s/step", now - self._last_log)
        self._last_log = now
        self._step_times.append(step_time)
        if "console" in self.sinks:
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
        """Closes every sink (a W&B run is finished); later calls and `log` do nothing."""
        writers, self._writers, self.enabled = self._writers, [], False
        errors = []
        for writer in writers:  # every sink closes even when one fails
            try:
                writer.close()
            except Exception as error:
                errors.append(error)
        if errors:
            raise errors[0]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def make_logger(kinds: Iterable[str], run_dir: str | os.PathLike, *, enabled: bool = True,
                total_steps: int | None = None, project_name: str = "mathgrpo",
                experiment_name: str = "qwen3_4b_base_grpo", config: Mapping[str, Any] | None = None) -> MetricsLogger:
    """The logger for verl-style `trainer.logger` names, e.g. `make_logger(["console", "wandb"], run_dir)`.

    project_name / experiment_name (verl's trainer.project_name / trainer.experiment_name) and config
    (a plain dict, logged as the run's config) are used by wandb.
    """
    return MetricsLogger(run_dir, enabled=enabled, total_steps=total_steps, sinks=kinds, project_name=project_name,
                         experiment_name=experiment_name, config=config)


def read_metrics_jsonl(path: str | os.PathLike) -> list[dict]:
    """The rows of a metrics.jsonl as written (a resumed run may repeat steps; later rows are newer)."""
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]
