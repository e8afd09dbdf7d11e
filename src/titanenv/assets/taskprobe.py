"""The inside of ``titanenv doctor --check-tasks``: :func:`~titanenv.assets.lmeval.check_tasks` in a child.

Run as ``python -m titanenv.assets.taskprobe REQUEST.json RESULTS.json`` by
:func:`titanenv.assets.doctor.check_tasks_offline`, with the offline environment set and inside
``unshare -n`` where permitted. The socket guard is on: a connection any task tries is reported
as a failure of its own (``network``), since on a compute node it would hang or fail.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path

from titanenv import atomic, offline
from titanenv.assets import lmeval  # imports no lm-eval, datasets or evaluate: they come under the guard
from titanenv.assets.files import redacted

NETWORK = "(network)"
"""The name of the extra failure that lists attempted connections."""


def main(argv: list[str]) -> int:
    """``taskprobe REQUEST.json RESULTS.json``; REQUEST has ``names`` and ``include_path``.

    RESULTS is a list of :class:`~titanenv.assets.lmeval.TaskCheck` fields, or ``{"error": MESSAGE}``
    for an unknown task name or a missing offline flag. Exit 0: the parent judges.
    """
    attempts = offline.guard_sockets()
    request = json.loads(Path(argv[0]).read_text())
    try:
        checks = lmeval.check_tasks(request["names"], [Path(p) for p in request["include_path"]])
    except (ValueError, RuntimeError) as e:  # AssetListError is a ValueError: a mistake the user fixes
        atomic.write_json(argv[1], redacted({"error": str(e)}))
        return 0
    rows = [asdict(c) for c in checks]
    if attempts:
        tried = ", ".join(sorted(set(attempts)))
        rows.append(asdict(lmeval.TaskCheck(NETWORK, False, f"a task tried to reach {tried}", "")))
    atomic.write_json(argv[1], redacted(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
