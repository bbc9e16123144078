"""The recipe's math reward, bounded in time, and verl's math_dapo `Answer:` grader.

What the recipe trained on (docs/recipe.md §1.2) is thunlp/OPD
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

from __future__ import annotations

import re
import signal
from contextlib import contextmanager
from dataclasses import dataclass

from mathgrpo.reward.normalize import (
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
