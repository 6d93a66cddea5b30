"""A portable regular-expression subset: means the same in RE2, PCRE and Python.

Consul documents its regex fields (``PathRegex``, header and query ``Regex``)
with Envoy's engine, RE2. meshctl's proxies use PCRE (nginx's ``ngx.re``,
HAProxy's ``-m reg``). A pattern is accepted only when it stays inside the
subset the three engines read alike, so that it can neither mean something
else on nginx or HAProxy than on Envoy nor fail to compile there:

- literals: printable ASCII; the metacharacters ``.^$|?*+()[]{}\\`` only
  escaped with a backslash;
- ``.``, anchors ``^`` ``$``, alternation ``|``;
- groups ``( … )`` and ``(?: … )`` (no look-around, back-references,
  named groups or inline flags: they differ between engines or RE2 lacks them);
- character classes ``[ … ]`` / ``[^ … ]`` with ranges and escapes (no POSIX
  ``[:alpha:]`` classes, no nested ``[``);
- escapes ``\\d \\D \\w \\W \\s \\S \\b \\B``, ``\\t \\n \\r \\f`` and a
  backslash before any ASCII punctuation;
- quantifiers ``* + ?`` and ``{n}`` ``{n,}`` ``{n,m}`` (n, m ≤ 1000, RE2's
  limit), optionally lazy with one ``?`` (no possessive ``*+``: RE2 refuses it).

Only the grammar is checked here; no engine runs, so the check is pure and
cheap. The pattern is additionally compiled with Python's ``re`` as a second
opinion. ``regex_field`` is the check as compile() applies it to a field of
Consul's answers (intentions, discovery chains).
"""

from __future__ import annotations

import re
import warnings

from meshctl.errors import CompileError

MAX_LENGTH = 1024
MAX_REPEAT = 1000
_CLASS_ESCAPES = set("dDwWsS")
_ESCAPES = _CLASS_ESCAPES | set("bB")
_CONTROL_ESCAPES = set("tnrf")  # not \v: PCRE reads it as "any vertical space"
_CONTROL_CHARS = {"t": "\t", "n": "\n", "r": "\r", "f": "\f"}
_PUNCT = set("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~")


class RegexError(ValueError):
    """The pattern is outside the portable subset; the message says where and why."""


def check_regex(pattern: str) -> str:
    """Return ``pattern`` if it is in the portable subset, else raise RegexError."""
    if not isinstance(pattern, str):
        raise RegexError("must be a string")
    if not pattern:
        raise RegexError("must not be empty")
    if len(pattern) > MAX_LENGTH:
        raise RegexError(f"longer than {MAX_LENGTH} characters")
    for i, ch in enumerate(pattern):
        if not " " <= ch <= "~":
            raise RegexError(f"character {ch!r} at position {i}: only printable ASCII is allowed")
    _Parser(pattern).parse()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        try:
            re.compile(pattern)
        except (re.error, FutureWarning, DeprecationWarning) as exc:
            raise RegexError(str(exc)) from None
    return pattern


def regex_field(value: object, where: str) -> str:
    """The regex of the field ``where`` if it is in the portable subset; "" when unset.

    ``None`` and "" are unset. Raises CompileError naming ``where`` and saying
    why for anything else that is not a string in the subset.
    """
    if value is None or value == "":
        return ""
    text = repr(value)
    shown = text if len(text) <= 80 else text[:77] + "..."
    if not isinstance(value, str):
        raise CompileError(f"{where}: {shown} is not a string")
    try:
        return check_regex(value)
    except RegexError as exc:
        raise CompileError(f"{where}: {shown} is not a portable regex: {exc} (meshctl accepts "
                           "the subset of RE2 that nginx's and HAProxy's PCRE read the same way)"
                           ) from None


def anchored(pattern: str) -> str:
    """The full-match form of ``pattern`` (RE2/Envoy match the whole value)."""
    return f"^(?:{pattern})$"


class _Parser:
    def __init__(self, text: str) -> None:
        self.s = text
        self.i = 0

    def fail(self, why: str) -> RegexError:
        return RegexError(f"{why} at position {self.i}")

    def peek(self) -> str:
        return self.s[self.i] if self.i < len(self.s) else ""

    def parse(self) -> None:
        self.alternation(depth=0)
        if self.i != len(self.s):
            raise self.fail("unbalanced ')'")

    def alternation(self, depth: int) -> None:
        if depth > 32:
            raise self.fail("groups nested too deeply")
        self.sequence(depth)
        while self.peek() == "|":
            self.i += 1
            self.sequence(depth)

    def sequence(self, depth: int) -> None:
        while self.peek() not in ("", "|", ")"):
            repeatable = self.atom(depth)
            if self.peek() in ("*", "+", "?", "{"):
                if not repeatable:
                    raise self.fail("quantifier without something to repeat")
                self.quantifier()

    def atom(self, depth: int) -> bool:
        """Consume one atom; True if a quantifier may follow it."""
        ch = self.peek()
        if ch in ("^", "$"):
            self.i += 1
            return False
        if ch == ".":
            self.i += 1
            return True
        if ch == "(":
            self.i += 1
            if self.s.startswith("?:", self.i):
                self.i += 2
            elif self.peek() == "?":
                raise self.fail("only plain '(...)' and '(?:...)' groups are allowed")
            self.alternation(depth + 1)
            if self.peek() != ")":
                raise self.fail("missing ')'")
            self.i += 1
            return True
        if ch == "[":
            self.char_class()
            return True
        if ch == "\\":
            return self.escape(in_class=False)
        if ch in ("*", "+", "?", "{"):
            raise self.fail(f"{ch!r} with nothing to repeat")
        if ch in ("]", "}"):
            raise self.fail(f"unescaped {ch!r}")
        self.i += 1
        return True

    def escape(self, in_class: bool) -> bool:
        self.i += 1
        ch = self.peek()
        if not ch:
            raise self.fail("trailing backslash")
        self.i += 1
        if ch in _CLASS_ESCAPES or ch in _CONTROL_ESCAPES or ch in _PUNCT:
            return True
        if ch in _ESCAPES and not in_class:
            return False  # \b \B are assertions
        raise RegexError(f"escape '\\{ch}' at position {self.i - 2} is not portable "
                         "(allowed: \\d \\D \\w \\W \\s \\S \\b \\B \\t \\n \\r \\f "
                         "and a backslash before punctuation)")

    def char_class(self) -> None:
        start = self.i
        self.i += 1
        if self.peek() == "^":
            self.i += 1
        if self.peek() == "]":
            raise self.fail("empty character class (write '\\]' for a literal ']')")
        while True:
            ch = self.peek()
            if not ch:
                self.i = start
                raise self.fail("missing ']'")
            if ch == "]":
                self.i += 1
                return
            lo = self.class_item()
            if self.peek() == "-" and self.s[self.i + 1:self.i + 2] not in ("]", ""):
                self.i += 1
                hi = self.class_item()
                if lo is None or hi is None:
                    raise self.fail("a range cannot start or end with a class escape")
                if lo > hi:
                    raise self.fail(f"bad range {lo!r}-{hi!r}")

    def class_item(self) -> str | None:
        """Consume one class member; its character if it is a single one, else None."""
        ch = self.peek()
        if ch == "\\":
            nxt = self.s[self.i + 1:self.i + 2]
            self.escape(in_class=True)
            if nxt in _PUNCT:
                return nxt
            return _CONTROL_CHARS.get(nxt)
        if ch == "[":
            raise self.fail("'[' inside a character class must be escaped")
        self.i += 1
        return ch

    def quantifier(self) -> None:
        ch = self.peek()
        if ch == "{":
            m = re.compile(r"\{(\d{1,4})(,(\d{0,4}))?\}").match(self.s, self.i)
            if not m:
                raise self.fail("'{' must start a quantifier {n}, {n,} or {n,m} (escape it: '\\{')")
            lo = int(m.group(1))
            hi = int(m.group(3)) if m.group(3) else None
            if lo > MAX_REPEAT or (hi is not None and hi > MAX_REPEAT):
                raise self.fail(f"repeat count above {MAX_REPEAT}")
            if hi is not None and hi < lo:
                raise self.fail(f"bad repeat range {{{lo},{hi}}}")
            self.i = m.end()
        else:
            self.i += 1
        if self.peek() == "?":
            self.i += 1
        if self.peek() in ("*", "+", "?", "{"):
            raise self.fail("a quantifier cannot follow a quantifier")
