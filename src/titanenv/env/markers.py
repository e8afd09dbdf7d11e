"""PEP 508 environment markers, evaluated for a target that need not be this machine.

``pip download --platform`` evaluates markers against the *running* interpreter, so a wheelhouse
for Python 3.12 on aarch64 built from a 3.9 login node would get the wrong packages. The lock's
markers are therefore evaluated here, for the target, before pip sees the requirements. Only the
standard library is used: the set-up runs before any dependency is installed.
"""

from __future__ import annotations

import re
from typing import Any

__all__ = ["MarkerError", "evaluate"]

VERSION_VARIABLES = {"python_version", "python_full_version", "implementation_version"}
_TOKEN = re.compile(
    r"""\s*(?:
      (?P<paren>[()])
    | (?P<op>===|==|!=|<=|>=|~=|<|>|not\s+in\b|in\b)
    | (?P<bool>and\b|or\b)
    | (?P<str>'[^']*'|"[^"]*")
    | (?P<var>[A-Za-z_][A-Za-z0-9_.]*)
    )""",
    re.X,
)


class MarkerError(ValueError):
    """A marker does not parse; the message quotes it."""


def evaluate(marker: str, environment: dict[str, str]) -> bool:
    """Whether ``marker`` (e.g. ``python_version < '3.12' and sys_platform == 'linux'``) holds.

    Args:
        marker: the marker text after ``;`` in a requirement.
        environment: marker variables (``python_version``, ``platform_machine``, ...) of the target.

    Raises:
        MarkerError: the marker is malformed or names an unknown variable.
    """
    tokens = _tokenize(marker)
    value, pos = _or(tokens, 0, environment, marker)
    if pos != len(tokens):
        raise MarkerError(f"unexpected {tokens[pos][1]!r} in marker {marker!r}")
    return value


def _tokenize(marker: str) -> list[tuple[str, str]]:
    tokens, pos = [], 0
    while pos < len(marker.rstrip()):
        m = _TOKEN.match(marker, pos)
        if not m:
            raise MarkerError(f"cannot parse marker {marker!r} at {marker[pos:]!r}")
        kind = m.lastgroup or ""
        tokens.append((kind, re.sub(r"\s+", " ", m.group(kind))))
        pos = m.end()
    return tokens


def _or(tokens, pos, env, text):
    value, pos = _and(tokens, pos, env, text)
    while pos < len(tokens) and tokens[pos] == ("bool", "or"):
        rhs, pos = _and(tokens, pos + 1, env, text)
        value = value or rhs
    return value, pos


def _and(tokens, pos, env, text):
    value, pos = _atom(tokens, pos, env, text)
    while pos < len(tokens) and tokens[pos] == ("bool", "and"):
        rhs, pos = _atom(tokens, pos + 1, env, text)
        value = value and rhs
    return value, pos


def _atom(tokens, pos, env, text):
    if pos < len(tokens) and tokens[pos] == ("paren", "("):
        value, pos = _or(tokens, pos + 1, env, text)
        if pos >= len(tokens) or tokens[pos] != ("paren", ")"):
            raise MarkerError(f"missing ')' in marker {text!r}")
        return value, pos + 1
    if pos + 3 > len(tokens) or tokens[pos + 1][0] != "op":
        raise MarkerError(f"expected 'VARIABLE OP VALUE' in marker {text!r}")
    (lk, lv), (_, op), (rk, rv) = tokens[pos : pos + 3]
    lhs, rhs = _value(lk, lv, env, text), _value(rk, rv, env, text)
    versions = (lk == "var" and lv in VERSION_VARIABLES) or (rk == "var" and rv in VERSION_VARIABLES)
    return _compare(lhs, op, rhs, versions), pos + 3


def _value(kind: str, token: str, env: dict[str, str], text: str) -> str:
    if kind == "str":
        return token[1:-1]
    if kind == "var":
        if token not in env:
            raise MarkerError(f"unknown marker variable {token!r} in {text!r}")
        return env[token]
    raise MarkerError(f"unexpected {token!r} in marker {text!r}")


def _compare(lhs: str, op: str, rhs: str, versions: bool) -> bool:
    if op == "in":
        return lhs in rhs
    if op == "not in":
        return lhs not in rhs
    if op == "===":
        return lhs == rhs
    a: Any  # release tuples, or the strings themselves
    b: Any
    if versions and _is_version(lhs) and _is_version(rhs):
        a, b = _release(lhs), _release(rhs)
        if op == "~=":
            return a >= b and a[: len(b) - 1] == b[: len(b) - 1]
        a, b = _pad(a, b)
    else:
        a, b = lhs, rhs
    return {"==": a == b, "!=": a != b, "<": a < b, "<=": a <= b, ">": a > b, ">=": a >= b}.get(op, False)


def _is_version(v: str) -> bool:
    return re.match(r"^\d+(\.\d+)*", v) is not None


def _release(v: str) -> tuple[int, ...]:
    m = re.match(r"^\d+(\.\d+)*", v)
    return tuple(int(p) for p in m.group(0).split(".")) if m else ()


def _pad(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    n = max(len(a), len(b))
    return a + (0,) * (n - len(a)), b + (0,) * (n - len(b))
