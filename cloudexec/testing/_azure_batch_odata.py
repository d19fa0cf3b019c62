"""A small OData ``$filter`` evaluator for the local Azure Batch service.

Supports what Batch list calls are used with in practice: comparisons
(``eq ne gt ge lt le``) between a property path and a literal, ``and``,
``or``, ``not``, parentheses and ``startswith(path, 'prefix')``. Paths use
the REST names and ``/`` for nesting (``executionInfo/exitCode``). Literals
are ``'strings'`` (``''`` escapes a quote), integers, decimals, ``true``,
``false``, ``null`` and ``datetime'2024-01-01T00:00:00Z'``. String
comparisons ignore case, as Batch treats its enum values.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Callable
from typing import Any

__all__ = ["FilterError", "compile_filter", "select_fields"]

Predicate = Callable[[dict[str, Any]], bool]

_TOKEN_RE = re.compile(
    r"""\s*(?:
        (?P<datetime>datetime'[^']*')
      | (?P<string>'(?:[^']|'')*')
      | (?P<number>-?\d+(?:\.\d+)?)
      | (?P<name>[A-Za-z_][A-Za-z0-9_]*(?:/[A-Za-z_][A-Za-z0-9_]*)*)
      | (?P<punct>[(),])
    )""",
    re.VERBOSE | re.IGNORECASE,
)
_COMPARATORS: dict[str, Callable[[Any, Any], bool]] = {
    "eq": lambda a, b: a == b,
    "ne": lambda a, b: a != b,
    "gt": lambda a, b: a > b,
    "ge": lambda a, b: a >= b,
    "lt": lambda a, b: a < b,
    "le": lambda a, b: a <= b,
}


class FilterError(ValueError):
    """The ``$filter`` text could not be parsed."""


class _Literal:
    def __init__(self, value: Any) -> None:
        self.value = value


def _parse_time(text: str) -> dt.datetime | None:
    try:
        value = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    # Azure bodies carry up to 7 fractional digits; fromisoformat takes 6.
    return value if value.tzinfo else value.replace(tzinfo=dt.timezone.utc)


def _lookup(obj: dict[str, Any], path: str) -> Any:
    value: Any = obj
    for part in path.split("/"):
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value


def _normalise(value: Any, like: Any) -> Any:
    """Bring a property value to the literal's type so the two compare."""
    if isinstance(like, dt.datetime) and isinstance(value, str):
        return _parse_time(re.sub(r"(\.\d{6})\d+", r"\1", value))
    if isinstance(value, str):
        return value.casefold()
    return value


def _compare(op: str, value: Any, literal: Any) -> bool:
    literal = literal.casefold() if isinstance(literal, str) else literal
    value = _normalise(value, literal)
    if value is None or literal is None:
        return _COMPARATORS[op](value, literal) if op in ("eq", "ne") else False
    if isinstance(value, bool) != isinstance(literal, bool):
        return op == "ne"
    try:
        return _COMPARATORS[op](value, literal)
    except TypeError:
        return op == "ne"


class _Parser:
    def __init__(self, text: str) -> None:
        self.tokens: list[tuple[str, str]] = []
        pos = 0
        text = text.strip()
        while pos < len(text):
            match = _TOKEN_RE.match(text, pos)
            if match is None or match.end() == pos:
                raise FilterError(f"unexpected text at offset {pos}: {text[pos:pos + 20]!r}")
            kind = match.lastgroup or ""
            self.tokens.append((kind, match.group(kind)))
            pos = match.end()
            while pos < len(text) and text[pos].isspace():
                pos += 1
        self.pos = 0

    def peek(self) -> tuple[str, str] | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def take(self) -> tuple[str, str]:
        token = self.peek()
        if token is None:
            raise FilterError("unexpected end of filter")
        self.pos += 1
        return token

    def keyword(self, word: str) -> bool:
        token = self.peek()
        if token is not None and token[0] == "name" and token[1].lower() == word:
            self.pos += 1
            return True
        return False

    def expect(self, punct: str) -> None:
        kind, value = self.take()
        if kind != "punct" or value != punct:
            raise FilterError(f"expected {punct!r}, found {value!r}")

    def parse(self) -> Predicate:
        predicate = self.parse_or()
        leftover = self.peek()
        if leftover is not None:
            raise FilterError(f"unexpected {leftover[1]!r}")
        return predicate

    def parse_or(self) -> Predicate:
        left = self.parse_and()
        while self.keyword("or"):
            right = self.parse_and()
            left = (lambda a, b: lambda obj: a(obj) or b(obj))(left, right)
        return left

    def parse_and(self) -> Predicate:
        left = self.parse_not()
        while self.keyword("and"):
            right = self.parse_not()
            left = (lambda a, b: lambda obj: a(obj) and b(obj))(left, right)
        return left

    def parse_not(self) -> Predicate:
        if self.keyword("not"):
            inner = self.parse_not()
            return lambda obj: not inner(obj)
        return self.parse_primary()

    def parse_primary(self) -> Predicate:
        kind, value = self.take()
        if kind == "punct" and value == "(":
            inner = self.parse_or()
            self.expect(")")
            return inner
        if kind == "name" and value.lower() == "startswith":
            self.expect("(")
            path_kind, path = self.take()
            if path_kind != "name":
                raise FilterError("startswith expects a property name first")
            self.expect(",")
            prefix = self.literal(self.take())
            self.expect(")")
            if not isinstance(prefix, str):
                raise FilterError("startswith expects a string prefix")
            folded = prefix.casefold()
            return lambda obj: isinstance(_lookup(obj, path), str) and _lookup(obj, path).casefold().startswith(folded)
        if kind != "name":
            raise FilterError(f"expected a property name, found {value!r}")
        op_kind, op = self.take()
        if op_kind != "name" or op.lower() not in _COMPARATORS:
            raise FilterError(f"expected a comparison operator after {value!r}, found {op!r}")
        literal = self.literal(self.take())
        path, op = value, op.lower()
        return lambda obj: _compare(op, _lookup(obj, path), literal)

    @staticmethod
    def literal(token: tuple[str, str]) -> Any:
        kind, value = token
        if kind == "string":
            return value[1:-1].replace("''", "'")
        if kind == "number":
            return float(value) if "." in value else int(value)
        if kind == "datetime":
            parsed = _parse_time(value[len("datetime'"):-1])
            if parsed is None:
                raise FilterError(f"bad datetime literal {value!r}")
            return parsed
        if kind == "name" and value.lower() in ("true", "false"):
            return value.lower() == "true"
        if kind == "name" and value.lower() == "null":
            return None
        raise FilterError(f"expected a literal, found {value!r}")


def compile_filter(text: str) -> Predicate:
    """Compile an OData ``$filter`` expression into a predicate over REST JSON.

    Args:
        text: The ``$filter`` query parameter.

    Returns:
        A function taking a serialised entity and returning whether it matches.

    Raises:
        FilterError: The expression uses syntax this evaluator does not know.
    """
    return _Parser(text).parse()


def select_fields(entity: dict[str, Any], select: str | None) -> dict[str, Any]:
    """Apply an OData ``$select`` list (``id,state,executionInfo/exitCode``).

    Args:
        entity: The full serialised entity.
        select: The ``$select`` query parameter, or None for everything.

    Returns:
        The entity restricted to the selected properties.
    """
    if not select:
        return entity
    out: dict[str, Any] = {}
    for raw in select.split(","):
        parts = [p for p in raw.strip().split("/") if p]
        if not parts:
            continue
        src: Any = entity
        dst = out
        for i, part in enumerate(parts):
            if not isinstance(src, dict) or part not in src:
                break
            if i == len(parts) - 1:
                dst[part] = src[part]
            else:
                src = src[part]
                dst = dst.setdefault(part, {})
    return out
