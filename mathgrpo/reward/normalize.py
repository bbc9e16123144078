"""String-level pieces of the math graders: answer extraction and answer normalisation.

Over ~500 lines on purpose: each function follows its reference (Hendrycks MATH, PRM800K, Minerva) line
by line so that it can be checked against the source, and they belong together.

Everything here is cheap, pure Python (`re` and `pylatexenc`, no sympy) and runs in the process
that scores a batch; `graders.py` composes these pieces and sends only the sympy / math-verify
work to worker processes.

What each piece reproduces, and from where:
- `last_boxed_only_string`, `remove_boxed`, `extract_boxed_answer`: Hendrycks MATH helpers as
  copied into the recipe's grader (thunlp/OPD `verl/utils/reward_score/ttrl_math/math_utils.py`,
  itself from verl `recipe/entropy/reward_score/entropy_math/__init__.py`).
- `mathd_normalize_answer` / `strip_string`: Hendrycks `_strip_string` with the MathQA unit list,
  as in that same file.
- `prm_normalize`, `split_tuple`, `is_fraction_string`, `string_is_int`, `should_allow_eval`:
  the PRM800K grader (`grader.py`) as copied into that file.
- `is_repetitive`: the suffix-array "repeatness" test of that file.
- `normalize_final_answer`: Minerva's normaliser as in verl `verl/utils/reward_score/math_dapo.py`.

Each function keeps the reference's quirks on purpose (single letters such as "a" or "m" are
stripped as units, a failed step returns the input unchanged, ...), because the reward the policy
was trained on is defined by them. The one change is speed: regexes are compiled once and a
literal unit is only searched for when it occurs in the string, which gives identical results.
"""

import logging
import re
from itertools import islice, zip_longest

from pylatexenc import latex2text

# ----------------------------------------------------------------------------------------------
# Boxed-answer extraction.

_BRACE = re.compile(r"[{}]")


def last_boxed_only_string(text: str) -> str | None:
    """The last `\\boxed...{...}` (or, when there is no `\\boxed`, `\\fbox...`) with its braces.

    Brace matching starts at the command, so `\\boxed 5 ... {x}` returns `\\boxed 5 ... {x}`, which
    `remove_boxed` then rejects; an unbalanced box gives None. Same scan as the reference, done on
    the braces only so a long response costs little.
    """
    start = text.rfind("\\boxed")
    if start < 0:
        start = text.rfind("\\fbox")
        if start < 0:
            return None
    open_braces = 0
    for match in _BRACE.finditer(text, start):
        if match.group() == "{":
            open_braces += 1
        else:
            open_braces -= 1
            if open_braces == 0:
                return text[start : match.end()]
    return None


def remove_boxed(boxed: str | None) -> str | None:
    """Content of `\\boxed{...}`; None for anything else (including `\\fbox{...}`, as in the reference)."""
    prefix = "\\boxed{"
    if boxed is None or not boxed.startswith(prefix) or not boxed.endswith("}"):
        return None
    return boxed[len(prefix) : -1]


def extract_boxed_answer(text: str) -> str | None:
    """The recipe's `extract_answer`: only text containing `\\boxed` has an answer at all.

    Because `\\boxed` must occur, the `\\fbox` fallback of `last_boxed_only_string` is never used
    here: a response that only has `\\fbox{5}` has no answer (score 0), exactly like the reference.
    """
    if "\\boxed" not in text:
        return None
    return remove_boxed(last_boxed_only_string(text))


# ----------------------------------------------------------------------------------------------
# Hendrycks `_strip_string` (the "mathd" string check).

# Units mainly from MathQA, in the reference's order (order matters: removal is sequential).
_MATHQA_UNITS = [
    "east", "degree", "mph", "kmph", "ft", "m square", " m east", "sq m", "deg", "mile", "q .",
    "monkey", "prime", "ratio", "profit of rs", "rd", "o", "gm", "p . m", "lb", "tile", "per", "dm",
    "lt", "gain", "ab", "way", "west", "a .", "b .", "c .", "d .", "e .", "f .", "g .", "h .", "t",
    "a", "h", "no change", "men", "soldier", "pie", "bc", "excess", "st", "inches", "noon",
    "percent", "by", "gal", "kmh", "c", "acre", "rise", "a . m", "th", "π r 2", "sq", "mark", "l",
    "toy", "coin", "sq . m", "gallon", "° f", "profit", "minw", "yr", "women", "feet", "am", "pm",
    "hr", "cu cm", "square", "v â € ™", "are", "rupee", "rounds", "cubic", "cc", "mtr", "s", "ohm",
    "number", "kmph", "day", "hour", "minute", "min", "second", "man", "woman", "sec", "cube", "mt",
    "sq inch", "mp", "∏ cm ³", "hectare", "more", "sec", "unit", "cu . m", "cm 2", "rs .", "rs",
    "kg", "g", "month", "km", "m", "cm", "mm", "apple", "liter", "loss", "yard", "pure", "year",
    "increase", "decrease", "d", "less", "Surface", "litre", "pi sq m", "s .", "metre", "meter",
    "inch",
]  # fmt: skip
_MATHQA_UNITS = _MATHQA_UNITS + [unit + "s" for unit in _MATHQA_UNITS]
_REGEX_SPECIALS = set(".^$*+?{}[]\\|()")
# (literal to look for first, or None when the unit is itself a regex such as "q ." ; pattern).
# The reference builds the pattern without escaping, so "." there matches any character.
_UNIT_PATTERNS = [
    (None if _REGEX_SPECIALS & set(unit) else unit, re.compile(r"(^|\W)" + unit + r"($|\W)"))
    for unit in _MATHQA_UNITS
]
_TRAILING_TEXT = re.compile(r"\\text{.*?}$")
_ARRAY_BEGIN = re.compile(r"\\begin\{array\}\{.*?\}")
_ARRAY_END = re.compile(r"\\end\{array\}")
_ENCLOSING_TEXT = re.compile(r"^\\text\{(?P<text>.+?)\}$")


def _fix_fracs(string: str) -> str:
    r"""`\frac12` → `\frac{1}{2}`, `\frac1{72}` → `\frac{1}{72}`; raises IndexError on a bare trailing `\frac`."""
    pieces = string.split("\\frac")
    result = pieces[0]
    for piece in pieces[1:]:
        result += "\\frac"
        if piece[0] == "{":
            result += piece
        elif len(piece) < 2:
            return string
        elif piece[1] != "{":
            result += "{" + piece[0] + "}{" + piece[1] + "}" + piece[2:]
        else:
            result += "{" + piece[0] + "}" + piece[1] + piece[2:]
    return result


def _fix_a_slash_b(string: str) -> str:
    r"""`3/4` → `\frac{3}{4}` when both sides are plain integers written canonically."""
    parts = string.split("/")
    if len(parts) != 2:
        return string
    try:
        numerator, denominator = int(parts[0]), int(parts[1])
    except ValueError:
        return string
    if string != f"{numerator}/{denominator}":
        return string
    return "\\frac{" + str(numerator) + "}{" + str(denominator) + "}"


def _remove_right_units(string: str) -> str:
    r"""Drop a `\text{ unit}` tail; raises AssertionError when `\text{ ` occurs twice (reference behaviour)."""
    if "\\text{ " not in string:
        return string
    parts = string.split("\\text{ ")
    assert len(parts) == 2
    return parts[0]


def _fix_sqrt(string: str) -> str:
    r"""`\sqrt3` → `\sqrt{3}`; raises IndexError on a trailing `\sqrt` (reference behaviour)."""
    if "\\sqrt" not in string:
        return string
    parts = string.split("\\sqrt")
    result = parts[0]
    for part in parts[1:]:
        result += ("\\sqrt{" + part[0] + "}" + part[1:]) if part[0] != "{" else ("\\sqrt" + part)
    return result


def strip_string(string: str) -> str:
    """Hendrycks `_strip_string` with the MathQA units; may raise, like the reference."""
    string = string.replace("\n", "").replace("\\!", "").replace("\\\\", "\\")
    string = _ARRAY_BEGIN.sub(r"\\begin{pmatrix}", string)
    string = _ARRAY_END.sub(r"\\end{pmatrix}", string)
    string = string.replace("bmatrix", "pmatrix")
    string = string.replace("tfrac", "frac").replace("dfrac", "frac")
    string = string.replace("\\neq", "\\ne").replace("\\leq", "\\le").replace("\\geq", "\\ge")
    string = string.replace("\\left", "").replace("\\right", "")
    without_text = _TRAILING_TEXT.sub("", string).strip()
    if without_text != "" and without_text != string:
        string = without_text
    for _ in range(2):
        for literal, pattern in _UNIT_PATTERNS:
            if literal is not None and literal not in string:
                continue
            removed = pattern.sub(r"\1\2", string)
            if removed != "":
                string = removed
    string = string.replace("^{\\circ}", "").replace("^\\circ", "")
    string = string.replace("\\$", "")
    string = _remove_right_units(string)
    string = string.replace("\\%", "")
    string = string.replace(" .", " 0.").replace("{.", "{0.")
    if len(string) == 0:
        return string
    if string[0] == ".":
        string = "0" + string
    sides = string.split("=")
    if len(sides) == 2 and len(sides[0]) <= 2:
        string = sides[1]  # "k = 5" → "5"
    string = _fix_sqrt(string)
    string = string.replace(" ", "")
    string = _fix_fracs(string)
    if string == "0.5":
        string = "\\frac{1}{2}"
    return _fix_a_slash_b(string)


def mathd_normalize_answer(answer: str | None) -> str | None:
    r"""Strip an enclosing `\text{}` then `strip_string`; on any failure the (stripped) input itself."""
    if answer is None:
        return None
    answer = answer.strip()
    try:
        match = _ENCLOSING_TEXT.search(answer)
        if match is not None:
            answer = match.group("text").strip()
        return strip_string(answer)
    except Exception:
        return answer


# ----------------------------------------------------------------------------------------------
# PRM800K normalisation (the "sympy" check's string side).

_PRM_UNITS = [
    "degree", "cm", "centimeter", "meter", "mile", "second", "minute", "hour", "day", "week",
    "month", "year", "foot", "feet", "inch", "yard",
]  # fmt: skip
_PRM_UNIT_PATTERNS = [re.compile(unit + r"(es)?(s)? *(\^[0-9]+)?") for unit in _PRM_UNITS]
_PRM_ENCLOSING_TEXT = re.compile(r"^\\text\{(?P<text>.+?)\}$")
_PRM_CIRC = re.compile(r"\^ *\\circ")
_PRM_THIN_SPACE_COMMA = re.compile(r",\\! *")
_PRM_MINUS_SPACE = re.compile(r"- *")
_MIXED_NUMBER = re.compile(r"([0-9]) +([0-9])")
_PROPER_COMMA = re.compile(r"(\d)(,)(\d\d\d)($|\D)")
_FRACTION = re.compile(r"^-?[0-9]+.?/0*[1-9][0-9]*.?$")
_BAD_SUBSTRINGS = ("^{", "^(")  # sympy might hang on these: the PRM800K grader refuses them
_BAD_REGEXES = (re.compile(r"\^[0-9]+\^"), re.compile(r"\^[0-9][0-9]+"))
_TUPLE_CHARS = "()[]"


def _is_float(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def _is_integer_valued(value: float) -> bool:
    try:
        return abs(value - int(round(value))) <= 1e-7
    except (OverflowError, ValueError):  # inf / nan
        return False


def strip_properly_formatted_commas(expr: str) -> str:
    """`1,000,000` → `1000000` but keep tuple commas such as `(1,2)`."""
    while True:
        next_expr = _PROPER_COMMA.sub(r"\1\3\4", expr)
        if next_expr == expr:
            return next_expr
        expr = next_expr


def string_is_int(text: str) -> bool:
    """PRM800K `_str_is_int`: a float within 1e-7 of an integer once thousands commas go."""
    try:
        return _is_integer_valued(float(strip_properly_formatted_commas(text)))
    except ValueError:
        return False


def is_fraction_string(expr: str) -> bool:
    """PRM800K `_is_frac` (`3/4`, `-10/6`): such pairs must match exactly (no reducing)."""
    return bool(_FRACTION.search(expr))


def _latex_to_text(expr: str) -> str:
    """PRM800K `_parse_latex`: pylatexenc to plain text, then sympy-friendly symbols."""
    expr = expr.replace("\\tfrac", "\\frac").replace("\\dfrac", "\\frac")
    expr = expr.replace("\\frac", " \\frac")  # play nice with mixed numbers
    # pylatexenc logs a warning for each malformed macro ("\\frac" without arguments...): muted
    # here, or a batch of model answers would flood the log.
    logger = logging.getLogger("pylatexenc.latex2text")
    was_disabled, logger.disabled = logger.disabled, True
    try:
        expr = latex2text.LatexNodes2Text().latex_to_text(expr)
    finally:
        logger.disabled = was_disabled
    for symbol, name in (("√", "sqrt"), ("π", "pi"), ("∞", "inf"), ("∪", "U"), ("·", "*"), ("×", "*")):
        expr = expr.replace(symbol, name)
    return expr.strip()


def prm_normalize(expr: str | None) -> str | None:
    """PRM800K `_normalize`: units, `$`, `%` and LaTeX go; integer-valued floats become ints."""
    if expr is None:
        return None
    match = _PRM_ENCLOSING_TEXT.search(expr)
    if match is not None:
        expr = match.group("text")
    expr = expr.replace("\\%", "%").replace("\\$", "$").replace("$", "").replace("%", "")
    expr = expr.replace(" or ", " , ").replace(" and ", " , ")
    expr = expr.replace("million", "*10^6").replace("billion", "*10^9").replace("trillion", "*10^12")
    for pattern in _PRM_UNIT_PATTERNS:
        expr = pattern.sub("", expr)
    expr = _PRM_CIRC.sub("", expr)
    if len(expr) > 0 and expr[0] == "{" and expr[-1] == "}":
        expr = expr[1:-1]
    expr = _PRM_THIN_SPACE_COMMA.sub("", expr)
    if _is_float(expr) and _is_integer_valued(float(expr)):
        expr = str(int(round(float(expr))))  # "025" → "25", "142.0" → "142"
    if "\\" in expr:
        try:
            expr = _latex_to_text(expr)
        except Exception:
            pass
    expr = _PRM_MINUS_SPACE.sub("-", expr)  # mixed numbers and negative signs
    expr = _MIXED_NUMBER.sub(r"\1+\2", expr)  # "7 3/4" → "7+3/4"
    expr = expr.replace(" ", "").replace("{", "").replace("}", "")
    expr = expr.lower()  # text answers are not case sensitive
    if string_is_int(expr):
        expr = str(int(float(expr.replace(",", ""))))
    return expr


def split_tuple(expr: str) -> list[str]:
    """Elements of a tuple or interval `(a,b]`; a lone expression is a one-element list."""
    expr = strip_properly_formatted_commas(expr)
    if len(expr) == 0:
        return []
    inner = expr[1:-1]
    if (
        len(expr) > 2
        and expr[0] in _TUPLE_CHARS
        and expr[-1] in _TUPLE_CHARS
        and all(char not in inner for char in _TUPLE_CHARS)
    ):
        return [element.strip() for element in inner.split(",")]
    return [expr]


def should_allow_eval(expr: str) -> bool:
    """PRM800K guard before sympy: ≤2 distinct letters and no exponent shapes that may hang."""
    letters = {char for char in expr.replace("sqrt", "").replace("frac", "") if char.isalpha()}
    if len(letters) > 2:
        return False
    if any(bad in expr for bad in _BAD_SUBSTRINGS):
        return False
    return not any(pattern.search(expr) for pattern in _BAD_REGEXES)


# ----------------------------------------------------------------------------------------------
# Repetition test (the math-verify stage refuses long repetitive strings).


def is_repetitive(text: str) -> bool:
    """True when the mean longest-common-prefix of the suffix array exceeds 0.2 of a pair's length.

    The reference's suffix array by prefix doubling and Kasai's LCP; runs only on strings of more
    than 128 characters, where degenerate repeats ("1111...") would make math-verify crawl.
    """

    def ranks(sequence):
        index = {value: rank for rank, value in enumerate(sorted(set(sequence)))}
        return [index[value] for value in sequence]

    codes = [ord(char) for char in text]
    length = len(codes)
    if length <= 1:
        return False
    line = ranks(codes)
    inverse_suffix, step = line, 1
    while step < length - 1:
        line = ranks(list(zip_longest(line, islice(line, step, None), fillvalue=-1)))
        inverse_suffix, step = line, step << 1
    suffix_array = [0] * length
    for position, rank in enumerate(inverse_suffix):
        suffix_array[rank] = position
    total_common, common = 0, 0
    for position in range(length):
        if inverse_suffix[position] == length - 1:
            common = 0
            continue
        other = suffix_array[inverse_suffix[position] + 1]
        while max(position, other) + common < length and codes[position + common] == codes[other + common]:
            common += 1
        total_common += common
        if common > 0:
            common -= 1
    return (total_common * 2 / (length * (length + 1))) > 0.2


# ----------------------------------------------------------------------------------------------
# Minerva normalisation (verl math_dapo).

_MINERVA_SUBSTITUTIONS = [
    ("an ", ""), ("a ", ""), (".$", "$"), ("\\$", ""), (r"\ ", ""), (" ", ""), ("mbox", "text"),
    (",\\text{and}", ","), ("\\text{and}", ","), ("\\text{m}", "\\text{}"),
]  # fmt: skip
_MINERVA_REMOVED = [
    "square", "ways", "integers", "dollars", "mph", "inches", "hours", "km", "units", "\\ldots",
    "sue", "points", "feet", "minutes", "digits", "cents", "degrees", "cm", "gm", "pounds", "meters",
    "meals", "edges", "students", "childrentickets", "multiples", "\\text{s}", "\\text{.}",
    "\\text{\ns}", "\\text{}^2", "\\text{}^3", "\\text{\n}", "\\text{}", r"\mathrm{th}", r"^\circ",
    r"^{\circ}", r"\;", r",\!", "{,}", '"', "\\dots",
]  # fmt: skip
_MINERVA_REGEX_REWRITES = [
    (re.compile(r"(.*?)(\$)(.*?)(\$)(.*)"), "$\\3$"),
    (re.compile(r"(\\text\{)(.*?)(\})"), "\\2"),
    (re.compile(r"(\\textbf\{)(.*?)(\})"), "\\2"),
    (re.compile(r"(\\overline\{)(.*?)(\})"), "\\2"),
    (re.compile(r"(\\boxed\{)(.*)(\})"), "\\2"),
    (re.compile(r"(frac)([^{])(.)"), "frac{\\2}{\\3}"),  # \fracab → \frac{a}{b}
    (re.compile(r"(sqrt)([^{])"), "sqrt{\\2}"),  # \sqrta → \sqrt{a}
]


def normalize_final_answer(final_answer: str) -> str:
    """Minerva (Lewkowycz et al. 2022, p. 18) normaliser exactly as verl's math_dapo applies it."""
    final_answer = final_answer.split("=")[-1]
    for before, after in _MINERVA_SUBSTITUTIONS:
        final_answer = final_answer.replace(before, after)
    for expression in _MINERVA_REMOVED:
        final_answer = final_answer.replace(expression, "")
    for pattern, replacement in _MINERVA_REGEX_REWRITES:
        final_answer = pattern.sub(replacement, final_answer)
    final_answer = final_answer.replace("$", "")
    if final_answer.replace(",", "").isdigit():
        final_answer = final_answer.replace(",", "")  # 100,000 → 100000
    return final_answer.strip()


# ----------------------------------------------------------------------------------------------
# Guard before sympy / math-verify (ours, not the reference's: see graders.py's docstring).

MAX_NESTING_DEPTH = 32
MAX_EXPONENT_PRODUCT = 10**6
MAX_FACTORIAL_ARGUMENT = 10**4
_DIGITS = re.compile(r"[0-9]+")
_COMMAND_NAME = re.compile(r"[A-Za-z]*")
_OPENERS, _CLOSERS = "{([", "})]"


def _nesting_depth(text: str) -> int:
    depth = deepest = 0
    for char in text:
        if char in _OPENERS:
            depth += 1
            deepest = max(deepest, depth)
        elif char in _CLOSERS:
            depth = max(depth - 1, 0)
    return deepest


def _group_end(text: str, start: int) -> int:
    """Index just past the bracket group opening at `start` (end of text if unbalanced)."""
    depth = 0
    for index in range(start, len(text)):
        if text[index] in _OPENERS:
            depth += 1
        elif text[index] in _CLOSERS:
            depth -= 1
            if depth == 0:
                return index + 1
    return len(text)


def _group_start(text: str, end: int) -> int:
    """Index of the opener matching the closer at `end` (0 if unbalanced)."""
    depth = 0
    for index in range(end, -1, -1):
        if text[index] in _CLOSERS:
            depth += 1
        elif text[index] in _OPENERS:
            depth -= 1
            if depth == 0:
                return index
    return 0


def _digit_product_exceeds(text: str, limit: int) -> bool:
    """Whether the integer literals in `text` multiply past `limit` (a bound on what they build)."""
    product = 1
    for digits in _DIGITS.findall(text):
        product *= max(int(digits) if len(digits) <= 18 else 10**18, 1)
        if product > limit:
            return True
    return False


def looks_explosive(text: str) -> bool:
    """True for inputs that can make sympy or math-verify compute for minutes in C code.

    Power towers, huge exponents, huge factorials and deep nesting; see the module docstring.
    Conservative by design: a refused answer scores 0, like a timeout would.
    """
    if _nesting_depth(text) > MAX_NESTING_DEPTH:
        return True
    text = text.replace("**", "^")
    for caret in (index for index, char in enumerate(text) if char == "^"):
        start = caret + 1
        while start < len(text) and text[start] == " ":
            start += 1
        if start >= len(text):
            continue
        if text[start] in _OPENERS:
            end = _group_end(text, start)
        elif text[start].isdigit():
            end = _DIGITS.match(text, start).end()
        elif text[start] == "\\":
            end = _COMMAND_NAME.match(text, start + 1).end()
        else:
            end = start + 1
        exponent = text[start:end]
        if "^" in exponent or "!" in exponent:
            return True  # a tower, or a factorial in an exponent
        if text[end:].lstrip(" ").startswith("^"):
            return True  # unbraced chain a^b^c
        if _digit_product_exceeds(exponent, MAX_EXPONENT_PRODUCT):
            return True
    for bang in (index for index, char in enumerate(text) if char == "!"):
        if bang > 0 and text[bang - 1] == "\\":
            continue  # "\!" is a LaTeX thin space
        end = bang - 1
        while end >= 0 and text[end] == " ":
            end -= 1
        if end < 0:
            continue
        if text[end].isdigit():
            start = end
            while start > 0 and text[start - 1].isdigit():
                start -= 1
            argument = text[start : end + 1]
            if len(argument) > 8 or int(argument) > MAX_FACTORIAL_ARGUMENT:
                return True
        elif text[end] in _CLOSERS:
            start = _group_start(text, end)
            argument = text[start : end + 1]
            if "^" in argument or "!" in argument or _digit_product_exceeds(argument, MAX_FACTORIAL_ARGUMENT):
                return True
        else:
            continue
        if start > 0 and text[:start].rstrip(" ").endswith("^"):
            return True  # the factorial applies to a whole power: (9^9)!
    return False
