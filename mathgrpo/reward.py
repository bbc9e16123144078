"""The recipe's math reward, bounded in time, and verl's math_dapo `Answer:` grader.

What the recipe trained on (recipe_spec §1.2) is thunlp/OPD
`verl/utils/reward_score/ttrl_math/__init__.py::reward_func` with its `math_utils.py` (a copy of
verl `recipe/entropy/reward_score/entropy_math/__init__.py`, called with fast=False):

    answer  = content of the last `\\boxed{...}` (none → score 0, format_score 0)
    correct = mathd(answer, gt)          Hendrycks `_strip_string` string equality
           or sympy(answer, gt)          PRM800K: normalise, split tuples, simplify(gt - answer) == 0
           or math_verify(answer, gt)    verify(parse(gt), parse(answer)), 1 s timeouts
    score   = 1.0 if correct else 0.0    (binary: no -1, no format or length term)

`math_reward` / `compute_score` / `score_batch` reproduce it; `dapo_reward` reproduces verl
`verl/utils/reward_score/math_dapo.py::compute_score` (last 300 characters, last `Answer: ...`
line, Minerva normalisation, ±1.0). `select_grader` routes like verl's `default_compute_score`.

How the time is bounded. The string stages run in the calling process (they are microseconds).
Only the sympy and math-verify stages, which can hang inside C code where no signal reaches
(`9^{9^{9^{9}}}` asks for a number of 10^(3.7·10^8) digits), go to `RewardPool` worker
processes, one task at a time each, with a hard per-task deadline: a late task scores 0, is
counted in `info["timeouts"]`, and its worker is killed and replaced. Inside a worker the
reference's own soft limits still apply (5 s alarm around each sympy comparison, math-verify's
1 s parse/verify timeouts), so a slow comparison fails the same way it did in the recipe.

Departures from the reference, all in cases that do not occur in the recipe's data:
- An answer or ground truth longer than `MAX_ANSWER_CHARS` is refused (score 0) before any
  grading; its `pred` is truncated to that length.
- Before the sympy / math-verify stage, answers that look explosive are refused (score 0):
  power towers (`a^{b^{c}}`, `a^b^c`, including legitimate small ones such as `2^{2^{3}}`),
  exponents whose integer literals multiply past 10^6, factorials of more than 10^4 or of a
  power, and bracket nesting deeper than `MAX_NESTING_DEPTH`.
- A task that exceeds the hard deadline (default `DEFAULT_TIMEOUT_S`) scores 0 even where the
  reference, with unbounded time, might have finished and said "correct".
- Two plain integers (up to 15 digits) are compared directly instead of through sympy /
  math-verify; the result is the same (tested), only faster.
- `"auto"` routing sends data sources that verl would grade with its Hendrycks `math_reward`, and
  unknown ones (where verl raises), to the ttrl_math grader.
- A response that is not a string has no answer; an exception anywhere in the string stages
  gives score 0 with status "error" instead of propagating (verl would crash the step).
- pylatexenc's malformed-macro warnings and math-verify's "Timeout during parsing" warnings are
  muted: one per odd answer would flood a training log.

Not a departure: the `\\fbox` fallback of `last_boxed_only_string` is kept but, as in the
reference, never reached: a response without `\\boxed` has no answer (score 0).
"""

import logging
import multiprocessing
import multiprocessing.connection
import os
import re
import signal
import sys
import time
import types
from collections import deque
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from mathgrpo.reward_normalize import (
    extract_boxed_answer,
    is_fraction_string,
    is_repetitive,
    looks_explosive,
    mathd_normalize_answer,
    normalize_final_answer,
    prm_normalize,
    should_allow_eval,
    split_tuple,
    string_is_int,
)

MAX_ANSWER_CHARS = 1024  # the longest MATH-500 answer has 159 characters
DEFAULT_TIMEOUT_S = 10.0  # ≥ the reference's own limits: 5 s sympy + 3 × 1 s math-verify
DEFAULT_WORKER_MEMORY_BYTES = 8 * 2**30
SYMPY_SOFT_TIMEOUT_S = 5.0  # the reference's `timeout_ours(5)` on are_equal_under_sympy
MATH_VERIFY_TIMEOUT_S = 1  # the reference's parsing_timeout / timeout_seconds
GRADERS = ("ttrl_math", "math_dapo", "auto")
DAPO_DATA_SOURCES = ("math_dapo", "math", "math_dapo_reasoning")

_CANONICAL_INTEGER = re.compile(r"^(0|-?[1-9][0-9]*)$")
_PLAIN_INTEGER = re.compile(r"^-?[0-9]{1,15}(\.0+)?$")
_DAPO_ANSWER = re.compile(r"(?i)Answer\s*:\s*([^\n]+)")


@dataclass(frozen=True)
class GradeTask:
    """The expensive part of one ttrl_math grading, shipped to a worker.

    sympy_pairs: (ground-truth element, answer element) pairs that must all be equal under sympy
    for the PRM800K check to pass, or None when that check already failed in the parent.
    """

    given: str
    ground_truth: str
    sympy_pairs: tuple[tuple[str, str], ...] | None
    run_math_verify: bool


# ----------------------------------------------------------------------------------------------
# Cheap stage (parent process).


def _plan_sympy_check(given: str, ground_truth: str) -> bool | tuple[tuple[str, str], ...]:
    """PRM800K `grade_answer_sympy` up to the sympy calls: a verdict, or the pairs sympy must decide."""
    truth_normalized, given_normalized = prm_normalize(ground_truth), prm_normalize(given)
    if truth_normalized == given_normalized:
        return True
    if len(given_normalized) == 0:
        return False
    truth_elements, given_elements = split_tuple(truth_normalized), split_tuple(given_normalized)
    if len(truth_elements) > 1 and (
        truth_normalized[0] != given_normalized[0] or truth_normalized[-1] != given_normalized[-1]
    ):
        return False  # "(1,2)" is not "[1,2]"
    if len(truth_elements) != len(given_elements):
        return False
    deferred = []
    for truth_element, given_element in zip(truth_elements, given_elements, strict=True):
        if is_fraction_string(truth_element) and is_fraction_string(given_element):
            equal = truth_element == given_element  # unreduced fractions must match exactly
        elif string_is_int(truth_element) != string_is_int(given_element):
            equal = False  # an integer answer must be an integer: no simplify
        elif _CANONICAL_INTEGER.match(truth_element) and _CANONICAL_INTEGER.match(given_element):
            equal = truth_element == given_element  # what simplify(a - b) == 0 says for two ints
        else:
            deferred.append((truth_element, given_element))
            continue
        if not equal:
            return False
    return tuple(deferred) if deferred else True


def _math_verify_shortcut(given: str, ground_truth: str) -> bool | None:
    """math-verify's verdict on two plain integers ("204", "-3", "142.0"), else None (unknown)."""
    given, ground_truth = given.strip(), ground_truth.strip()
    if _PLAIN_INTEGER.match(given) and _PLAIN_INTEGER.match(ground_truth):
        return int(float(given)) == int(float(ground_truth))
    return None


def _result(score: float, format_score: float, ground_truth: str, pred: str) -> dict:
    """The reference's result dict (`compute_score` of ttrl_math, validation flavour with `pred`)."""
    return {
        "score": score,
        "format_score": format_score,
        "acc": score > 0,
        "extracted_gt": ground_truth,
        "pred": pred,
    }


def _prepare_ttrl_math(response: str, ground_truth: str) -> tuple[dict, GradeTask | None, str]:
    """Grade as far as strings allow: (result, task for a worker or None, status)."""
    given = extract_boxed_answer(response)
    if given is None:
        return _result(0.0, 0.0, ground_truth, ""), None, "ok"
    truth = extract_boxed_answer(ground_truth) if "\\boxed" in ground_truth else ground_truth
    if truth is None:
        return _result(0.0, 1.0, ground_truth, given[:MAX_ANSWER_CHARS]), None, "ok"
    if len(given) > MAX_ANSWER_CHARS or len(truth) > MAX_ANSWER_CHARS:
        return _result(0.0, 1.0, ground_truth, given[:MAX_ANSWER_CHARS]), None, "refused"
    correct = _result(1.0, 1.0, ground_truth, given)
    wrong = _result(0.0, 1.0, ground_truth, given)
    if mathd_normalize_answer(truth) == mathd_normalize_answer(given):
        return correct, None, "ok"
    sympy_plan = _plan_sympy_check(given, truth)
    if sympy_plan is True:
        return correct, None, "ok"
    math_verify_verdict = _math_verify_shortcut(given, truth)
    if math_verify_verdict is not None and sympy_plan is False:
        return (correct if math_verify_verdict else wrong), None, "ok"
    if math_verify_verdict is True:
        return correct, None, "ok"
    pairs = sympy_plan if isinstance(sympy_plan, tuple) else None
    pair_texts = [text for pair in pairs or () for text in pair]
    if any(looks_explosive(text) for text in (given, truth, *pair_texts)):
        return wrong, None, "refused"
    return wrong, GradeTask(given, truth, pairs, math_verify_verdict is None), "ok"


# ----------------------------------------------------------------------------------------------
# Expensive stage (worker process).


@contextmanager
def _soft_timeout(seconds: float):
    """SIGALRM-based limit, usable only on a main thread (which a worker's loop is)."""

    def raise_timeout(signum, frame):
        raise TimeoutError("reward soft timeout")

    previous = signal.signal(signal.SIGALRM, raise_timeout)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _sympy_equal(truth_element: str, given_element: str) -> bool:
    """PRM800K `are_equal_under_sympy`: simplify((truth) - (given)) == 0 within 5 s."""
    import sympy
    from sympy.parsing import sympy_parser

    expression = f"({truth_element})-({given_element})"
    if not should_allow_eval(expression):
        return False
    transformations = sympy_parser.standard_transformations + (sympy_parser.implicit_multiplication_application,)
    try:
        with _soft_timeout(SYMPY_SOFT_TIMEOUT_S):
            difference = sympy_parser.parse_expr(expression.replace("^", "**"), transformations=transformations)
            return bool(sympy.simplify(difference) == 0)
    except Exception:  # parse errors, TimeoutError: the reference swallows them all
        return False


def _math_verify_equal(given: str, ground_truth: str) -> bool:
    """The reference's `is_latex_equal`: refuse long repetitive strings, then math-verify."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    try:
        with _soft_timeout(1.0):  # the reference's outer `timeout(1)`, which covers this prefix
            if any(len(text) > 128 and is_repetitive(text) for text in (given, ground_truth)):
                return False
            if prm_normalize(ground_truth) == prm_normalize(given):
                return True
        given = given if "$" in given else f"${given}$"
        ground_truth = ground_truth if "$" in ground_truth else f"${ground_truth}$"
        extraction = (LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig())
        options = dict(extraction_config=extraction, fallback_mode="no_fallback", extraction_mode=["first_match"])
        gold = parse(ground_truth, parsing_timeout=MATH_VERIFY_TIMEOUT_S, **options)
        target = parse(given, parsing_timeout=MATH_VERIFY_TIMEOUT_S, **options)
        return bool(verify(gold, target, timeout_seconds=MATH_VERIFY_TIMEOUT_S))
    except Exception:
        return False


def run_expensive_grade(task: GradeTask) -> bool:
    """The sympy then math-verify checks of one answer; call in a worker (uses SIGALRM)."""
    if task.sympy_pairs is not None and all(_sympy_equal(truth, given) for truth, given in task.sympy_pairs):
        return True
    return task.run_math_verify and _math_verify_equal(task.given, task.ground_truth)


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


# ----------------------------------------------------------------------------------------------
# Worker pool with hard per-task deadlines.


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


# ----------------------------------------------------------------------------------------------
# Public graders.


def dapo_score(response: str, ground_truth: str) -> dict:
    """verl math_dapo `compute_score` (strict_box_verify=False): {"score": ±1.0, "acc", "pred"}."""
    matches = _DAPO_ANSWER.findall(response[-300:])  # the longest MATH-500 answer has 159 characters
    pred = normalize_final_answer(matches[-1] if matches else "[INVALID]")
    correct = pred == normalize_final_answer(ground_truth)
    return {"score": 1.0 if correct else -1.0, "acc": correct, "pred": pred}


def dapo_reward(response: str, ground_truth: str) -> float:
    return dapo_score(str(response), str(ground_truth))["score"]


def select_grader(data_source: str, grader: str = "ttrl_math") -> str:
    """Which grader scores a sample: the recipe grades everything with ttrl_math (its custom
    reward function); "auto" sends verl's `default_compute_score` math_dapo sources to math_dapo."""
    if grader not in GRADERS:
        raise ValueError(f"grader must be one of {GRADERS}, got {grader!r}")
    if grader != "auto":
        return grader
    source = str(data_source)
    return "math_dapo" if source in DAPO_DATA_SOURCES or source.startswith("aime") else "ttrl_math"


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
