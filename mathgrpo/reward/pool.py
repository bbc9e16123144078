"""Grading workers with hard per-task deadlines (`RewardPool`), and batch scoring through them."""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import time
import types
from collections import deque
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from mathgrpo.reward.graders import (
    DEFAULT_TIMEOUT_S,
    DEFAULT_WORKER_MEMORY_BYTES,
    GRADERS,
    GradeTask,
    _math_verify_equal,
    _prepare_ttrl_math,
    _result,
    _sympy_equal,
    dapo_score,
    run_expensive_grade,
    select_grader,
)

_READY = "ready"


def _worker_main(connection, memory_limit_bytes: int | None) -> None:
    """Worker loop: grade (index, task) messages until None or a closed pipe."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    logging.getLogger("math_verify").setLevel(logging.ERROR)  # one "Timeout during parsing" per slow answer
    if memory_limit_bytes:
        try:
            import resource

            resource.setrlimit(resource.RLIMIT_AS, (memory_limit_bytes, memory_limit_bytes))
        except (ImportError, ValueError, OSError):
            pass
    # Import and warm up before announcing readiness, so no task's deadline pays for it.
    _sympy_equal("0.5", "1/2")
    _math_verify_equal("\\frac{1}{2}", "0.5")
    connection.send(_READY)
    while True:
        try:
            message = connection.recv()
        except (EOFError, OSError):
            return
        if message is None:
            return
        index, task = message
        try:
            correct = bool(run_expensive_grade(task))
        except BaseException:  # noqa: BLE001 — nothing may kill the loop (math-verify raises BaseException)
            correct = False
        signal.setitimer(signal.ITIMER_REAL, 0)
        connection.send((index, correct))


class RewardWorkerError(RuntimeError):
    """The grading workers cannot run (they fail to start, or one died while grading for a reason other
    than its deadline): raised rather than scoring the answers 0, which would look like a bad policy."""


@contextmanager
def _main_module_hidden():
    """Starts children without the caller's main module. multiprocessing's non-fork start methods make
    each child re-import the parent's `__main__` (so that functions pickled by name resolve): a script
    without an `if __name__ == "__main__":` guard would run again in every worker, which then fails to
    start. The workers need nothing from it (their target lives in this module)."""
    main = sys.modules.get("__main__")
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        sys.modules["__main__"] = main


def default_num_workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))


@dataclass
class _Worker:
    process: multiprocessing.process.BaseProcess
    connection: multiprocessing.connection.Connection
    started_at: float
    ready: bool = False


class RewardPool:
    """Persistent worker processes that run `GradeTask`s, each under a hard deadline.

    Workers come from the "forkserver" context: a clean single-threaded server process (never the
    JAX trainer itself, whose threads make a plain fork unsafe) forks each worker with sympy and
    math-verify already imported, so replacing a killed worker costs milliseconds. Use from one
    thread; close it (or use `with`) to stop the workers. Workers start without the caller's main
    module (`_main_module_hidden`), so a script needs no `if __name__ == "__main__":` guard.
    """

    def __init__(
        self,
        num_workers: int | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        *,
        memory_limit_bytes: int | None = DEFAULT_WORKER_MEMORY_BYTES,
        startup_timeout_s: float = 120.0,
    ):
        if timeout_s <= 0:
            raise ValueError(f"RewardPool timeout_s must be > 0, got {timeout_s}")
        self.num_workers = num_workers or default_num_workers()
        self.timeout_s = timeout_s
        self.memory_limit_bytes = memory_limit_bytes
        self.startup_timeout_s = startup_timeout_s
        self._context = multiprocessing.get_context("forkserver")
        # Only takes effect if this process has not started its fork server yet.
        self._context.set_forkserver_preload(["sympy", "math_verify", "mathgrpo.reward"])
        self._workers: list[_Worker | None] = [None] * self.num_workers

    def __enter__(self) -> "RewardPool":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def _start_worker(self, slot: int) -> None:
        parent_end, child_end = self._context.Pipe(duplex=True)
        process = self._context.Process(
            target=_worker_main, args=(child_end, self.memory_limit_bytes), daemon=True, name=f"reward-worker-{slot}"
        )
        with _main_module_hidden():
            process.start()
        child_end.close()
        self._workers[slot] = _Worker(process, parent_end, time.monotonic())

    def _stop_worker(self, slot: int) -> None:
        worker = self._workers[slot]
        self._workers[slot] = None
        if worker is None:
            return
        worker.process.kill()
        worker.process.join(timeout=5)
        worker.connection.close()

    def close(self) -> None:
        """Ask idle workers to exit, then kill whatever is left."""
        for slot, worker in enumerate(self._workers):
            if worker is None:
                continue
            try:
                worker.connection.send(None)
                worker.process.join(timeout=1)
            except (OSError, ValueError):
                pass
            self._stop_worker(slot)

    def run(self, tasks: Sequence[GradeTask], timeout_s: float | None = None) -> list[tuple[bool, str]]:
        """(correct, status) per task; status is "ok" or "timeout" (killed at the deadline, scored 0 as in
        the recipe). Raises RewardWorkerError when the workers cannot start or one dies while grading."""
        timeout_s = timeout_s or self.timeout_s
        results: list[tuple[bool, str] | None] = [None] * len(tasks)
        pending = deque(range(len(tasks)))
        running: dict[int, tuple[int, float]] = {}  # slot → (task index, deadline)
        slots = range(min(self.num_workers, len(tasks)))
        failed_starts, last_exit = 0, None
        while pending or running:
            if failed_starts > 2 * len(slots) + 2:  # workers cannot start at all: give up loudly
                raise RewardWorkerError(f"reward workers failed to start {failed_starts} times (last exit code "
                                        f"{last_exit}); no answer that needs sympy / math-verify can be graded")
            for slot in slots:
                worker = self._workers[slot]
                if worker is None or not worker.process.is_alive() and slot not in running:
                    if pending:
                        if worker is not None:
                            self._stop_worker(slot)
                        try:
                            self._start_worker(slot)
                        except Exception as error:  # fork server or process start failed
                            failed_starts, last_exit = failed_starts + 1, repr(error)
                    continue
                if worker.ready and slot not in running and pending:
                    index = pending.popleft()
                    try:
                        worker.connection.send((index, tasks[index]))
                    except (OSError, ValueError):
                        pending.appendleft(index)
                        self._stop_worker(slot)
                        continue
                    running[slot] = (index, time.monotonic() + timeout_s)
            active = {slot: self._workers[slot] for slot in slots if self._workers[slot] is not None}
            if not active:
                continue
            deadlines = [deadline for _, deadline in running.values()]
            deadlines += [w.started_at + self.startup_timeout_s for w in active.values() if not w.ready]
            wait_s = max(0.0, min(deadlines) - time.monotonic()) if deadlines else 0.0
            by_connection = {id(worker.connection): slot for slot, worker in active.items()}
            connections = [worker.connection for worker in active.values()]
            for connection in multiprocessing.connection.wait(connections, timeout=wait_s):
                slot = by_connection[id(connection)]
                try:
                    message = connection.recv()
                except (EOFError, OSError):  # the worker died (segfault, killed, failed start)
                    process = self._workers[slot].process
                    process.join(timeout=5)
                    if slot in running:
                        index = running.pop(slot)[0]
                        self._stop_worker(slot)
                        raise RewardWorkerError(
                            f"reward worker {slot} died (exit code {process.exitcode}) while grading answer {index} "
                            f"({tasks[index].given[:80]!r}); a worker dies only at its deadline") from None
                    if not self._workers[slot].ready:
                        failed_starts, last_exit = failed_starts + 1, process.exitcode
                    self._stop_worker(slot)
                    continue
                if message == _READY:
                    self._workers[slot].ready = True
                    continue
                index, correct = message
                running.pop(slot, None)
                results[index] = (bool(correct), "ok")
            now = time.monotonic()
            for slot, (index, deadline) in list(running.items()):
                if now >= deadline:
                    running.pop(slot)
                    results[index] = (False, "timeout")
                    self._stop_worker(slot)
            for slot, worker in active.items():
                late = now >= worker.started_at + self.startup_timeout_s
                if self._workers[slot] is worker and not worker.ready and late:
                    failed_starts, last_exit = failed_starts + 1, f"none: not ready after {self.startup_timeout_s} s"
                    self._stop_worker(slot)
        return results


def score_batch(
    responses: Sequence[str],
    ground_truths: Sequence[str],
    data_sources: Sequence[str] | None = None,
    *,
    grader: str = "ttrl_math",
    timeout_s: float = DEFAULT_TIMEOUT_S,
    num_workers: int | None = None,
    pool: RewardPool | None = None,
) -> tuple[list[float], dict]:
    """Score many responses; string checks here, sympy / math-verify in `pool` (a temporary one if None).

    Returns (scores, info): info["details"] holds each response's result dict (ttrl_math: score,
    format_score, acc, extracted_gt, pred; math_dapo: score, acc, pred), info["acc"] / ["pred"]
    the per-response lists, info["status"] "ok" | "refused" | "timeout" | "error" per response,
    and counts "timeouts", "errors", "refused", "expensive" (tasks that went to a worker).
    """
    if grader not in GRADERS:
        raise ValueError(f"grader must be one of {GRADERS}, got {grader!r}")
    if len(responses) != len(ground_truths):
        raise ValueError(f"{len(responses)} responses but {len(ground_truths)} ground truths")
    if data_sources is None:
        data_sources = [""] * len(responses)
    elif len(data_sources) != len(responses):
        raise ValueError(f"{len(responses)} responses but {len(data_sources)} data sources")
    details, statuses, task_owners, tasks = [], [], [], []
    for index, (response, ground_truth, data_source) in enumerate(zip(responses, ground_truths, data_sources)):
        response = response if isinstance(response, str) else ""
        ground_truth = str(ground_truth)
        try:
            if select_grader(data_source, grader) == "math_dapo":
                details.append(dapo_score(response, ground_truth))
                statuses.append("ok")
                continue
            result, task, status = _prepare_ttrl_math(response, ground_truth)
        except Exception:  # never let one odd response stop a training step
            result, task, status = _result(0.0, 0.0, ground_truth, ""), None, "error"
        details.append(result)
        statuses.append(status)
        if task is not None:
            task_owners.append(index)
            tasks.append(task)
    if tasks:
        own_pool = pool is None
        pool = pool or RewardPool(num_workers or min(default_num_workers(), len(tasks)), timeout_s)
        try:
            outcomes = pool.run(tasks, timeout_s)
        finally:
            if own_pool:
                pool.close()
        for index, (correct, status) in zip(task_owners, outcomes):
            statuses[index] = status
            if correct:
                details[index] = _result(1.0, 1.0, details[index]["extracted_gt"], details[index]["pred"])
    info = {
        "details": details,
        "acc": [detail["acc"] for detail in details],
        "pred": [detail["pred"] for detail in details],
        "status": statuses,
        "timeouts": statuses.count("timeout"),
        "errors": statuses.count("error"),
        "refused": statuses.count("refused"),
        "expensive": len(tasks),
    }
    return [float(detail["score"]) for detail in details], info


def compute_score(
    data_source: str,
    response: str,
    ground_truth: str,
    *,
    grader: str = "ttrl_math",
    timeout_s: float = DEFAULT_TIMEOUT_S,
    pool: RewardPool | None = None,
) -> dict:
    """One response's result dict, graded as `select_grader(data_source, grader)` says."""
    _, info = score_batch([response], [ground_truth], [data_source], grader=grader, timeout_s=timeout_s, pool=pool)
    return info["details"][0]


def math_reward(
    response: str, ground_truth: str, *, timeout_s: float = DEFAULT_TIMEOUT_S, pool: RewardPool | None = None
) -> float:
    """The recipe's reward (ttrl_math): 1.0 if the last boxed answer equals the ground truth, else 0.0.

    Bounded: string checks run here; sympy / math-verify run in `pool`, or in a single-use worker
    process when no pool is given, killed after `timeout_s`.
    """
    return float(compute_score("", response, ground_truth, timeout_s=timeout_s, pool=pool)["score"])
