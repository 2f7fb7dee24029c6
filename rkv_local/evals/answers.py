r"""Final-answer extraction and comparison for GSM8K, MATH-500 and AIME.

``extract_answer`` takes, in order: the last ``\boxed{...}`` (or ``\fbox{...}``, nested braces
allowed), the text after the last ``####``, the phrase "the (final) answer is ...", and for numeric
tasks the last number in the text. ``normalize`` strips LaTeX decoration (``$``, ``\left``/
``\right``, ``\text{}``, ``\dfrac``, spacing commands, degrees, percent, units in ``\text``,
thousands separators, a leading ``x =``). ``is_equivalent`` compares normalised strings, then
numbers (fractions, decimals, leading zeros, thousands separators) with a relative tolerance of
1e-6.
"""
from __future__ import annotations

import re
from fractions import Fraction
from typing import Optional

__all__ = ["extract_answer", "extract_boxed", "gold_answer", "is_equivalent", "normalize", "to_number"]

_NUMBER = r"-?\d+(?:,\d{3}(?!\d))*(?:\.\d+)?|-?\.\d+"
_NUMBER_RE = re.compile(_NUMBER)


def extract_boxed(text: str) -> Optional[str]:
    r"""Content of the last ``\boxed{...}``/``\fbox{...}`` (or ``\boxed 5``); None if there is none."""
    best = None
    for match in re.finditer(r"\\(?:boxed|fbox)\s*", text):
        start = match.end()
        if start < len(text) and text[start] == "{":
            depth, i = 0, start
            while i < len(text):
                c = text[i]
                if c == "{":
                    depth += 1
                elif c == "}":
                    depth -= 1
                    if depth == 0:
                        break
                i += 1
            if depth == 0:
                best = text[start + 1:i]
        else:
            m = re.match(r"([^\s$]+)", text[start:])
            if m:
                best = m.group(1)
    return best


def extract_answer(text: str, task: str = "math") -> Optional[str]:
    """The model's final answer in ``text``; None when nothing looks like one."""
    if not text:
        return None
    boxed = extract_boxed(text)
    if boxed is not None and boxed.strip():
        return boxed.strip()
    if "####" in text:
        tail = text.rsplit("####", 1)[1].strip()
        if tail:
            return tail.splitlines()[0].strip()
    phrase = None
    for m in re.finditer(r"(?:final answer|the answer)\s*(?:is|:|=)\s*:?\s*(.+)", text, flags=re.IGNORECASE):
        phrase = m.group(1)
    if phrase is not None:
        phrase = phrase.strip().splitlines()[0] if phrase.strip() else ""
        phrase = re.sub(r"\*\*", "", phrase).strip()
        if task in ("gsm8k", "aime"):
            numbers = _NUMBER_RE.findall(phrase)
            if numbers:
                return numbers[0]
        elif phrase:
            return phrase.rstrip(".").strip().strip("$").strip()
    numbers = _NUMBER_RE.findall(text)
    if numbers:
        return numbers[-1].rstrip(".")
    return None


def gold_answer(row: dict, task: str) -> str:
    """The reference answer of a data row (GSM8K: the text after ``####``)."""
    answer = str(row.get("answer", ""))
    if task == "gsm8k" and "####" in answer:
        answer = answer.rsplit("####", 1)[1]
    return answer.strip()


def _strip_command(s: str, command: str) -> str:
    r"""``\command{x}`` -> ``x`` (nested braces allowed), for every occurrence."""
    pattern = "\\" + command
    while True:
        i = s.find(pattern + "{")
        if i < 0:
            return s
        j = i + len(pattern)
        depth, k = 0, j
        while k < len(s):
            if s[k] == "{":
                depth += 1
            elif s[k] == "}":
                depth -= 1
                if depth == 0:
                    break
            k += 1
        if depth != 0:
            return s
        s = s[:i] + s[j + 1:k] + s[k + 1:]


def normalize(answer: Optional[str]) -> str:
    """A canonical string form of an answer, for comparison."""
    if answer is None:
        return ""
    s = str(answer).strip()
    s = s.replace("\n", " ")
    # \boxed inside the answer (a gold MATH solution, or a doubled box)
    inner = extract_boxed(s)
    if inner is not None:
        s = inner
    s = s.replace("$", "")
    for cmd in ("text", "textbf", "mathrm", "mathbf", "mbox", "textit", "operatorname"):
        s = _strip_command(s, cmd)
    s = re.sub(r"\\(?:left|right|big|Big|bigg|Bigg)(?![a-zA-Z])", "", s)
    s = s.replace("\\displaystyle", "")
    s = re.sub(r"\\[dt]frac", r"\\frac", s)
    s = re.sub(r"\\(?:!|,|;|:|quad|qquad)", "", s)
    s = s.replace("\\ ", "").replace("~", "")
    s = re.sub(r"\^\s*\{?\s*\\circ\s*\}?", "", s)
    s = s.replace("\\degree", "").replace("°", "")
    s = s.replace("\\%", "").replace("%", "")
    # units and words that trail a number: "18 dollars", "5 cm", "12 apples"
    if re.fullmatch(rf"\s*(?:{_NUMBER})\s+[a-zA-Z]{{2,}}[a-zA-Z .]*", s):
        s = _NUMBER_RE.match(s.strip()).group(0)
    # a leading "x =" / "y=" (single variable)
    s = re.sub(r"^\s*[a-zA-Z]\s*=\s*", "", s)
    s = s.replace(" ", "")
    # \frac12 -> \frac{1}{2}, \sqrt2 -> \sqrt{2}
    s = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\frac\{([^{}]*)\}(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\sqrt(\d+)", r"\\sqrt{\1}", s)
    # thousands separators in a plain number
    if re.fullmatch(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?", s):
        s = s.replace(",", "")
    s = s.rstrip(".")
    if re.fullmatch(r"-?\d+\.\d*?0+", s):
        s = s.rstrip("0").rstrip(".")
    if re.fullmatch(r"-?0+\d+", s):
        s = str(int(s))
    if s.startswith("+"):
        s = s[1:]
    return s


def to_number(answer: Optional[str]) -> Optional[Fraction]:
    r"""The value of a numeric answer (``12``, ``1,234``, ``-0.5``, ``3/4``, ``\frac{3}{4}``,
    ``-\frac34``, ``025``); None otherwise."""
    s = normalize(answer)
    if not s:
        return None
    sign = 1
    if s.startswith("-"):
        sign, s = -1, s[1:]
    m = re.fullmatch(r"\\frac\{(-?[\d.]+)\}\{(-?[\d.]+)\}", s) or re.fullmatch(r"(-?[\d.]+)/(-?[\d.]+)", s)
    try:
        if m:
            den = Fraction(m.group(2))
            return None if den == 0 else sign * Fraction(m.group(1)) / den
        if re.fullmatch(r"\d+(?:\.\d+)?|\.\d+", s):
            return sign * Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None
    return None


def is_equivalent(prediction: Optional[str], gold: Optional[str]) -> bool:
    """Whether a predicted answer matches the reference."""
    if prediction is None or gold is None:
        return False
    a, b = normalize(prediction), normalize(gold)
    if not a or not b:
        return False
    if a == b:
        return True
    x, y = to_number(a), to_number(b)
    if x is not None and y is not None:
        return abs(x - y) <= Fraction(1, 10**6) * max(1, abs(y))
    return False
