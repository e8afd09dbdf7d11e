"""The one redaction rule for everything titanenv writes or logs: lockfiles, summaries, provenance, errors.

Redacted, each replaced by :data:`MARKER`:

- the value of a shell-style assignment whose name looks like a credential, to the end of the
  line (``export HF_TOKEN=...``, ``WANDB_API_KEY=...``: names with TOKEN, SECRET, PASSW,
  CREDENTIAL, AUTH, KEY or COOKIE);
- the values of ``HF_TOKEN`` and ``HUGGING_FACE_HUB_TOKEN`` in the environment (8 characters or
  more, so a short value cannot blank out ordinary text), wherever they appear;
- any Hugging Face token (``hf_`` and 20 or more letters and digits), whatever holds it.

Standard library only.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

__all__ = ["MARKER", "SECRET_NAME", "TOKEN_VARS", "redact", "redacted"]

MARKER = "<redacted>"
SECRET_NAME = re.compile(r"TOKEN|SECRET|PASSW|CREDENTIAL|AUTH|KEY|COOKIE", re.IGNORECASE)
"""A variable name that looks like a credential."""
TOKEN_VARS = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")
_ASSIGNMENT = re.compile(
    r"^(\s*(?:export\s+)?[A-Za-z_]*(?:TOKEN|SECRET|PASSW|CREDENTIAL|AUTH|KEY|COOKIE)[A-Za-z0-9_]*=).*$",
    re.IGNORECASE | re.MULTILINE,
)
_HF_TOKEN = re.compile(r"hf_[A-Za-z0-9]{20,}")


def redact(text: str, *, marker: str = MARKER, env: Mapping[str, str] | None = None) -> str:
    """``text`` with every secret the rule names replaced by ``marker``.

    Args:
        env: where the token variables are read (default: ``os.environ``).
        marker: the replacement text; :data:`MARKER` everywhere in titanenv.
    """
    env = os.environ if env is None else env
    text = _ASSIGNMENT.sub(lambda m: m.group(1) + marker, text)
    for var in TOKEN_VARS:
        value = env.get(var, "")
        if len(value) >= 8:
            text = text.replace(value, marker)
    return _HF_TOKEN.sub(marker, text)


def redacted(obj: Any, *, marker: str = MARKER) -> Any:
    """A copy of JSON-able ``obj`` with :func:`redact` applied to every string in it, keys included."""
    if isinstance(obj, str):
        return redact(obj, marker=marker)
    if isinstance(obj, Mapping):
        return {redacted(k, marker=marker): redacted(v, marker=marker) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [redacted(v, marker=marker) for v in obj]
    return obj
