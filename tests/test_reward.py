"""The recipe's ttrl_math reward, its time bounds, and verl's math_dapo `Answer:` grader.

Expected scores are what the reference grader (thunlp/OPD ttrl_math = verl entropy_math, fast=False)
returns; every case was also run through a verbatim copy of that code, and the comment names the
stage of its ladder that decides: mathd (Hendrycks string equality), sympy (PRM800K normalise +
simplify), math-verify (parse + verify), or extraction. Ground truths marked `data` are taken
from the recipe's validation / MATH-500 parquet files and checked to be there.
"""

import os
import signal
import time

import pyarrow.parquet as pq
import pytest

from mathgrpo.reward.graders import (
    GradeTask,
    _math_verify_shortcut,
    _plan_sympy_check,
    dapo_reward,
    dapo_score,
    select_grader,
)
from mathgrpo.reward.pool import RewardPool, RewardWorkerError, compute_score, math_reward, score_batch

VALIDATION_FILES = ("aime24", "aime25", "amc23", "math500")


def boxed(answer: str) -> str:
    return f"Reasoning... so the answer is $\\boxed{{{answer}}}$."


# (family, response, ground truth, expected score, ground truth is from the data)
CASES = [
    # Integers with leading zeros (AIME24 writes "025"): PRM800K turns float("025") into "25".
    ("leading_zero", boxed("25"), "025", 1.0, True),  # sympy stage: normalised "25" == "25"
    ("leading_zero", boxed("025"), "025", 1.0, True),  # mathd: identical strings
    ("leading_zero", boxed("73"), "073", 1.0, True),
    ("leading_zero", boxed("52"), "025", 0.0, True),  # two different integers
    # AMC23 writes integers as "142.0".
    ("dot_zero", boxed("142"), "142.0", 1.0, True),  # sympy stage: "142.0" → "142"
    ("dot_zero", boxed("142.00"), "142.0", 1.0, True),
    ("dot_zero", boxed("-4"), "-4.0", 1.0, True),
    ("dot_zero", boxed("0"), "0.0", 1.0, True),
    ("dot_zero", boxed("143"), "142.0", 0.0, True),
    # Fractions vs decimals.
    ("fraction_decimal", boxed("0.5"), "\\frac{1}{2}", 1.0, True),  # mathd maps "0.5" to \frac{1}{2}
    ("fraction_decimal", boxed("1.5"), "\\frac{3}{2}", 1.0, True),  # sympy: (3/2)-(1.5) simplifies to 0
    ("fraction_decimal", boxed("3/2"), "\\frac{3}{2}", 1.0, True),  # mathd: 3/2 → \frac{3}{2}
    # sympy refuses unreduced fractions (6/4 vs 3/2 compared as strings); math-verify: 6/4 = 3/2
    ("fraction_decimal", boxed("\\frac{6}{4}"), "\\frac{3}{2}", 1.0, True),
    ("fraction_decimal", boxed("0.0000672"), ".0000672", 1.0, True),  # mathd: leading "." gets a 0
    ("fraction_decimal", boxed("1.25"), "\\frac{5}{4}", 1.0, False),  # sympy: 5/4 - 1.25 = 0
    ("fraction_decimal", boxed("1.2"), "\\frac{5}{4}", 0.0, False),
    ("fraction_decimal", boxed("0.333"), "\\frac{1}{3}", 0.0, True),  # math-verify: 0.333 ≠ 0.333333 (6 places)
    # \dfrac / \tfrac / shorthand \frac.
    ("dfrac", boxed("\\frac{17}{50}"), "\\dfrac{17}{50}", 1.0, True),  # mathd: dfrac → frac
    ("dfrac", boxed("\\dfrac{17}{50}"), "\\frac{17}{50}", 1.0, False),
    ("dfrac", boxed("\\frac{5}{9}"), "\\frac 59", 1.0, True),  # mathd: "\frac59" → \frac{5}{9}
    ("dfrac", boxed("\\tfrac{4}{3}"), "\\frac43", 1.0, True),
    ("dfrac", boxed("\\frac{9}{19}"), "\\frac9{19}", 1.0, True),
    # Units.
    ("units", boxed("5.4"), "5.4 \\text{ cents}", 1.0, True),  # mathd: trailing \text{...} removed
    ("units", boxed("864"), "864 \\mbox{ inches}^2", 1.0, True),  # math-verify drops the \mbox unit: 864
    ("units", boxed("15"), "15\\mbox{ cm}^2", 1.0, True),  # math-verify, likewise
    ("units", boxed("32348"), "\\$32,\\!348", 1.0, True),  # sympy: "\$" and ",\!" removed
    ("units", boxed("18.90"), "\\$18.90", 1.0, True),
    ("units", boxed("10 \\text{ cm}"), "10", 1.0, False),
    ("units", boxed("12 \\text{ inches}"), "12", 1.0, False),
    # Degrees (AIME25 has "336^\circ").
    ("degrees", boxed("336"), "336^\\circ", 1.0, True),  # mathd: "^\circ" removed
    ("degrees", boxed("336^{\\circ}"), "336^\\circ", 1.0, True),
    ("degrees", boxed("90"), "90^\\circ", 1.0, True),
    ("degrees", boxed("24"), "336^\\circ", 0.0, True),
    # \text{} answers.
    ("text", boxed("\\text{Evelyn}"), "\\text{Evelyn}", 1.0, True),
    ("text", boxed("Evelyn"), "\\text{Evelyn}", 1.0, True),  # mathd: enclosing \text{} removed
    ("text", boxed("C"), "\\text{(C)}", 1.0, True),  # sympy: "(c)" is a 1-tuple of "c"; c - c = 0
    ("text", boxed("(D)"), "\\text{(C)}", 0.0, True),
    ("text", boxed("\\text{ellipse}"), "\\text{ellipse}", 1.0, True),
    # Tuples.
    ("tuple", boxed("(6, 31, -1)"), "(6,31,-1)", 1.0, True),  # mathd: spaces removed
    ("tuple", boxed("(6,31,1)"), "(6,31,-1)", 0.0, True),
    ("tuple", boxed("[6,31,-1]"), "(6,31,-1)", 1.0, True),  # sympy: brackets differ → no; math-verify: same Tuple
    ("tuple", boxed("(3, \\pi/2)"), "\\left( 3, \\frac{\\pi}{2} \\right)", 1.0, True),  # sympy: elementwise
    ("tuple", boxed("-2, 1"), "1,-2", 1.0, True),  # math-verify compares the unbracketed lists as sets
    # Intervals.
    ("interval", boxed("(3,4]"), "(3,4]", 1.0, True),
    ("interval", boxed("[3,4]"), "(3,4]", 0.0, True),  # sympy: first bracket differs; math-verify: different Interval
    ("interval", boxed("(-\\infty, 0]"), "(-\\infty, 0]", 1.0, True),
    ("interval", boxed("(-\\infty,0)"), "(-\\infty, 0]", 0.0, True),
    ("interval", boxed("(0,9) \\cup (9,36)"), "(0,9) \\cup (9,36)", 1.0, True),
    # Complex numbers.
    ("complex", boxed("6-5i"), "6 - 5i", 1.0, True),  # mathd: spaces removed
    ("complex", boxed("-5i+6"), "6 - 5i", 1.0, True),  # sympy: (6-5i)-(-5i+6) = 0
    ("complex", boxed("6+5i"), "6 - 5i", 0.0, True),
    ("complex", boxed("2i+1"), "1+2i", 1.0, True),
    # Several boxes: the last one counts.
    ("several_boxes", "\\boxed{1} is wrong, it is \\boxed{204}", "204", 1.0, True),
    ("several_boxes", "\\boxed{204} is wrong, it is \\boxed{1}", "204", 0.0, True),
    ("several_boxes", "\\boxed{\\boxed{204}}", "204", 1.0, True),  # rfind lands on the inner box
    # Unbalanced braces.
    ("unbalanced", "\\boxed{204", "204", 0.0, True),  # never closed: no answer
    ("unbalanced", "\\boxed{{204}", "204", 0.0, True),
    ("unbalanced", "\\boxed{20}4}", "204", 0.0, True),  # the box closes after "20"
    ("unbalanced", "\\boxed{204}}", "204", 1.0, True),  # an extra "}" after the box is ignored
    ("unbalanced", "\\boxed 204", "204", 0.0, True),  # no brace: remove_boxed rejects it
    # No box at all, and \fbox (the fallback is never reached: extraction needs "\boxed").
    ("no_box", "The answer is 204.", "204", 0.0, True),
    ("no_box", "", "204", 0.0, True),
    ("fbox", "The answer is \\fbox{204}.", "204", 0.0, True),
    # A ground truth that is itself boxed (the offline-eval AIME24 file) is extracted first.
    ("boxed_ground_truth", boxed("204"), "\\boxed{204}", 1.0, False),
    ("boxed_ground_truth", boxed("205"), "\\boxed{204}", 0.0, False),
    # Expressions.
    ("symbolic", boxed("3x + x^3 - 6"), "x^3+3x-6", 1.0, True),  # sympy: difference simplifies to 0
    ("symbolic", boxed("x^3+3x-5"), "x^3+3x-6", 0.0, True),
    ("symbolic", boxed("-q+p"), "p - q", 1.0, True),
    ("symbolic", boxed("\\sqrt{117}"), "3\\sqrt{13}", 1.0, True),
    ("symbolic", boxed("\\frac{\\sqrt{3}}{3}"), "\\frac{1}{\\sqrt{3}}", 1.0, False),
    (  # mathd: spaces removed
        "matrix",
        boxed("\\begin{pmatrix}-1\\\\2\\end{pmatrix}"),
        "\\begin{pmatrix} -1 \\\\ 2 \\end{pmatrix}",
        1.0,
        False,
    ),
    # Bases and integers.
    ("base", boxed("52_8"), "52_8", 1.0, True),
    ("base", boxed("42"), "52_8", 0.0, True),
    ("integer", boxed("204"), "204", 1.0, True),
    ("integer", boxed("205"), "204", 0.0, True),  # integers compared exactly
    ("integer", boxed("204.5"), "204", 0.0, True),  # an integer ground truth needs an integer answer
    ("integer", boxed("\\frac{408}{2}"), "204", 1.0, True),  # sympy refuses (not an int); math-verify: 204
    ("integer", boxed("x = 204"), "204", 1.0, True),  # mathd drops a short "x ="
    ("integer", boxed("10080"), "10,\\!080", 1.0, True),  # sympy: ",\!" removed
    ("integer", boxed("10,080"), "10,\\!080", 1.0, True),  # mathd: "\!" removed
    ("integer", boxed("32\\%"), "32", 1.0, False),  # mathd: "\%" removed
]


@pytest.fixture(scope="module")
def data_ground_truths(recipe_data) -> dict[str, list[str]]:
    """Ground truths of the validation files and MATH-500 (conftest's `recipe_data`: data/ in the repository)."""
    truths = {}
    for name in VALIDATION_FILES:
        table = pq.read_table(recipe_data / f"{name}.parquet", columns=["reward_model"])
        truths[name] = [row["ground_truth"] for row in table.column("reward_model").to_pylist()]
    return truths


@pytest.fixture(scope="module")
def pool():
    with RewardPool(num_workers=2, timeout_s=10.0) as reward_pool:
        yield reward_pool


class NoProcessPool:
    """Stands in for a pool where the test requires that no worker is ever asked."""

    def run(self, tasks, timeout_s=None):
        raise AssertionError(f"cheap path sent {len(tasks)} task(s) to a worker")


def test_case_ground_truths_come_from_the_data(data_ground_truths):
    everything = {truth for truths in data_ground_truths.values() for truth in truths}
    missing = [truth for _, _, truth, _, from_data in CASES if from_data and truth not in everything]
    assert not missing


def test_case_table(pool):
    scores, info = score_batch([case[1] for case in CASES], [case[2] for case in CASES], pool=pool)
    wrong = [
        (family, response, truth, expected, score)
        for (family, response, truth, expected, _), score in zip(CASES, scores)
        if score != expected
    ]
    assert not wrong
    assert info["timeouts"] == info["errors"] == info["refused"] == 0


def test_result_dict_matches_reference_fields(pool):
    # No answer: format_score 0 and an empty pred; wrong but boxed: format_score 1.
    no_answer = {"score": 0.0, "format_score": 0.0, "acc": False, "extracted_gt": "204", "pred": ""}
    assert compute_score("AIME24", "no box", "204", pool=pool) == no_answer
    wrong_answer = {"score": 0.0, "format_score": 1.0, "acc": False, "extracted_gt": "204", "pred": "20"}
    assert compute_score("AIME24", "\\boxed{20}4}", "204", pool=pool) == wrong_answer
    # extracted_gt is the ground truth as given, even when a boxed one is graded after extraction.
    assert compute_score("AIME24", "\\boxed{204}", "\\boxed{204}", pool=pool)["extracted_gt"] == "\\boxed{204}"


def test_every_validation_ground_truth_matches_itself(data_ground_truths):
    # mathd compares identical strings → 1.0 without any worker.
    truths = [truth for values in data_ground_truths.values() for truth in values]
    scores, info = score_batch([f"\\boxed{{{truth}}}" for truth in truths], truths, pool=NoProcessPool())
    assert scores == [1.0] * len(truths) and info["expensive"] == 0


def test_competition_integers_off_by_one_score_zero(data_ground_truths):
    # AIME / AMC answers are integers; gt + 1 is a different integer in every stage, decided
    # without a worker (two plain integers are compared directly).
    truths = data_ground_truths["aime24"] + data_ground_truths["amc23"] + data_ground_truths["aime25"]
    truths = [truth for truth in truths if truth.replace(".0", "").lstrip("-").isdigit()]
    responses = [f"\\boxed{{{int(float(truth)) + 1}}}" for truth in truths]
    scores, _ = score_batch(responses, truths, pool=NoProcessPool())
    assert len(truths) >= 140 and scores == [0.0] * len(truths)


def test_cheap_paths_spawn_no_process():
    pool = NoProcessPool()
    assert math_reward("The answer is 204", "204", pool=pool) == 0.0  # no box
    assert math_reward("\\boxed{204}", "204", pool=pool) == 1.0  # string-equal
    assert math_reward("\\boxed{25}", "025", pool=pool) == 1.0  # PRM800K normalisation
    assert math_reward("\\boxed{205}", "204", pool=pool) == 0.0  # two integers


def test_math_reward_without_pool_uses_a_single_use_worker():
    assert math_reward("\\boxed{\\frac{408}{2}}", "204") == 1.0  # needs math-verify


def test_shortcuts_agree_with_sympy_and_math_verify():
    # The parent decides two plain integers itself; this checks that against the real libraries.
    import sympy
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    extraction = (LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig())

    def reference_math_verify(given, truth):
        options = dict(extraction_config=extraction, fallback_mode="no_fallback", extraction_mode=["first_match"])
        return verify(parse(f"${truth}$", **options), parse(f"${given}$", **options))

    integer_pairs = [("204", "205"), ("-3", "3"), ("142.0", "143"), ("0042", "41"), ("7", "7.0")]
    for given, truth in integer_pairs + [("999999999999999", "999999999999998")]:
        assert _math_verify_shortcut(given, truth) == reference_math_verify(given, truth), (given, truth)
    for given, truth in [("12", "13"), ("-5", "5"), ("0", "0")]:
        plan = _plan_sympy_check(f"({given},1)", f"({truth},1)")  # elementwise, both canonical integers
        assert plan is (sympy.simplify(sympy.Integer(truth) - sympy.Integer(given)) == 0)


@pytest.mark.parametrize(
    "name, response, truth",
    [
        ("1 MB without a box", "x" * 1_000_000, "204"),
        ("1 MB inside a box", "\\boxed{" + "9" * 1_000_000 + "}", "204"),
        ("1 MB unbalanced box", "\\boxed{" + "{" * 1_000_000, "204"),
        ("10,000-deep nested braces", "\\boxed{" + "{" * 10_000 + "1" + "}" * 10_000 + "}", "2"),
        ("500-deep nesting within the size limit", "\\boxed{" + "{" * 500 + "1" + "}" * 500 + "}", "2"),
        ("power tower", "\\boxed{9^{9^{9^{9}}}}", "5"),
        ("unbraced power tower", "\\boxed{9^9^9^9}", "5"),
        ("python power tower", "\\boxed{9**9**9**9}", "5"),
        ("huge factorial", "\\boxed{100000000!}", "5"),
        ("factorial of a power", "\\boxed{(10^{10})!}", "5"),
        ("huge exponent", "\\boxed{10^{99999999}}", "5"),
        ("many boxes", "\\boxed{1}" * 100_000, "2"),
    ],
)
def test_adversarial_inputs_are_bounded(pool, name, response, truth):
    timeout_s = 2.0
    start = time.monotonic()
    scores, info = score_batch([response], [truth], timeout_s=timeout_s, pool=pool)
    assert scores == [0.0], name
    assert time.monotonic() - start < timeout_s + 5.0, name


def test_deep_nesting_still_matches_when_strings_agree():
    # 500 braces around "1": PRM800K drops every brace → "1" == "1", decided before any worker.
    assert math_reward("\\boxed{" + "{" * 500 + "1" + "}" * 500 + "}", "1", pool=NoProcessPool()) == 1.0


def test_hung_worker_is_killed_counted_and_replaced():
    # 9**9**9**9 never finishes; the hard deadline (1.5 s) fires before the soft 5 s sympy alarm.
    hanging = GradeTask("9**9**9**9", "5", (("5", "9**9**9**9"),), False)
    with RewardPool(num_workers=1, timeout_s=1.5) as reward_pool:
        start = time.monotonic()
        assert reward_pool.run([hanging]) == [(False, "timeout")]
        assert time.monotonic() - start < 1.5 + 5.0
        # The replacement worker grades the next task: (0.5) - (1/2) simplifies to 0.
        assert reward_pool.run([GradeTask("1/2", "0.5", (("0.5", "1/2"),), False)]) == [(True, "ok")]


def test_batch_counts_timeouts(pool):
    # binomial(10^7, 5·10^6) takes seconds inside math-verify; 0.3 s kills it. The other answer
    # (math-verify: 1/3 ≈ 0.3333333333 at 6 decimals) is graded normally in the same batch.
    responses = ["\\boxed{\\binom{10^{7}}{5000000}}", "\\boxed{\\frac{1}{3}}", "\\boxed{7}"]
    scores, info = score_batch(responses, ["5", "0.3333333333", "7"], timeout_s=0.3, pool=pool)
    assert scores == [0.0, 1.0, 1.0]
    assert info["timeouts"] == 1 and info["status"] == ["timeout", "ok", "ok"]


def test_never_raises_on_odd_inputs(pool):
    scores, info = score_batch([None, "\\boxed{204}", "\\boxed{}"], [204, 204.0, ""], pool=pool)
    assert scores == [0.0, 1.0, 1.0]  # None has no box; str(204.0) = "204.0" ≈ 204; "" == ""
    with pytest.raises(ValueError):
        score_batch(["a"], ["b", "c"])


# ------------------------------------------------------------------------------------------------
# verl math_dapo: last 300 characters, last "Answer:" line, Minerva normalisation, ±1.


@pytest.mark.parametrize(
    "response, truth, expected",
    [
        ("work\nAnswer: 204", "204", 1.0),
        ("work\nAnswer: 205", "204", -1.0),
        ("work, no final line", "204", -1.0),  # "[INVALID]"
        ("Answer: 1\nmore work\nAnswer: 204", "204", 1.0),  # the last match wins
        ("Answer: 204\nmore work\nAnswer: 1", "204", -1.0),
        ("answer : 204", "204", 1.0),  # case-insensitive, spaces around ":"
        ("Answer: 204\n" + "." * 300, "204", -1.0),  # outside the last 300 characters
        ("Answer: $\\boxed{204}$", "204", 1.0),  # $…$ and \boxed{…} unwrapped
        ("Answer: 1,000", "1000", 1.0),  # thousands commas dropped
        ("Answer: x = 5", "5", 1.0),  # only the right of "=" is kept
        ("Answer: 336^\\circ", "336^\\circ", 1.0),
        ("Answer: \\frac12", "\\frac{1}{2}", 1.0),  # \fracab → \frac{a}{b}
        ("Answer: 10 dollars", "10", 1.0),
        ("Answer: 0.5", "\\frac{1}{2}", -1.0),  # no numeric equivalence in this grader
        ("The answer is \\boxed{204}", "204", -1.0),  # a box alone is not an Answer: line
    ],
)
def test_dapo_reward(response, truth, expected):
    assert dapo_reward(response, truth) == expected


def test_dapo_score_fields():
    assert dapo_score("Answer: 7 units", "7") == {"score": 1.0, "acc": True, "pred": "7"}
    assert dapo_score("nothing", "7") == {"score": -1.0, "acc": False, "pred": "[INVALID]"}


def test_grader_selection():
    # The recipe grades everything with ttrl_math, whatever the data source says.
    assert select_grader("math_dapo") == "ttrl_math"
    # "auto" routes as verl's default_compute_score: math_dapo / math / math_dapo_reasoning / aime*.
    dapo_sources = ("math_dapo", "math", "math_dapo_reasoning", "aime2024")
    assert [select_grader(source, "auto") for source in dapo_sources] == ["math_dapo"] * 4
    assert [select_grader(source, "auto") for source in ("AIME24", "AMC23", "lighteval/MATH")] == ["ttrl_math"] * 3
    with pytest.raises(ValueError):
        select_grader("math", "minerva")


def test_compute_score_dispatch():
    pool = NoProcessPool()
    assert compute_score("math_dapo", "\\boxed{7}", "7", pool=pool)["score"] == 1.0  # ttrl_math by default
    # "auto" sends math_dapo to the Answer: grader, and a bare box has no "Answer:" line.
    assert compute_score("math_dapo", "\\boxed{7}", "7", grader="auto", pool=pool)["score"] == -1.0
    dapo_result = {"score": 1.0, "acc": True, "pred": "7"}
    assert compute_score("math_dapo", "Answer: 7", "7", grader="math_dapo", pool=pool) == dapo_result


# ------------------------------------------------------------------------------------------------
# Workers that cannot run raise; a script without a main guard is graded like one with it.

SCRIPT = """
import sys
sys.path.insert(0, {repo!r})
from mathgrpo.reward.pool import score_batch
print("script body ran", flush=True)
responses = [r"\\\\boxed{{\\\\frac{{4}}{{2}}}}", r"\\\\boxed{{0.5}}", r"\\\\boxed{{3}}"]
scores, info = score_batch(responses, ["2", "1/2", "4"])
print("scores", scores, info["status"], flush=True)
"""


@pytest.mark.parametrize("guarded", [False, True])
def test_a_script_without_a_main_guard_gets_the_same_rewards(tmp_path, guarded):
    import subprocess
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    body = SCRIPT.format(repo=repo)
    if guarded:
        body = "if __name__ == '__main__':\n" + "\n".join("    " + line for line in body.strip().splitlines())
    script = tmp_path / "grade.py"
    script.write_text(body)
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300,
                            cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    # \\frac{4}{2} = 2 and 0.5 = 1/2 need math-verify / sympy in a worker; 3 != 4 is decided in the parent.
    assert "scores [1.0, 1.0, 0.0] ['ok', 'ok', 'ok']" in result.stdout, result.stdout + result.stderr[-2000:]
    assert result.stdout.count("script body ran") == 1  # the workers did not run the script again


def test_workers_that_cannot_start_raise():
    task = GradeTask("1/2", "0.5", (("0.5", "1/2"),), False)
    # No worker can import and warm up sympy / math-verify in a millisecond: each is stopped unready.
    with RewardPool(num_workers=1, startup_timeout_s=0.001) as reward_pool:
        with pytest.raises(RewardWorkerError, match=r"failed to start \d+ times \(last exit code none: not ready"):
            reward_pool.run([task])


def test_a_worker_killed_while_grading_raises():
    import threading

    hanging = GradeTask("9**9**9**9", "5", (("5", "9**9**9**9"),), False)
    with RewardPool(num_workers=1, timeout_s=60.0) as reward_pool:
        assert reward_pool.run([GradeTask("1/2", "0.5", (("0.5", "1/2"),), False)]) == [(True, "ok")]
        pid = reward_pool._workers[0].process.pid
        killer = threading.Timer(1.0, os.kill, (pid, signal.SIGKILL))
        killer.start()
        try:
            with pytest.raises(RewardWorkerError, match=r"died \(exit code -9\) while grading answer 0"):
                reward_pool.run([hanging])
        finally:
            killer.cancel()
