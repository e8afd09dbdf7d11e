"""Run a titanenv entry point with the plain ``python3`` of a fresh login node.

``env/set_up.sh`` and ``container/*.sh`` run before titanenv or its dependencies are installed,
so they call ``python3 src/titanenv/bootstrap.py MODULE ARGS...``, which puts ``src/`` on the path
and returns ``MODULE.main(ARGS)``. The modules it starts use the standard library only.
"""

import importlib
import sys
from pathlib import Path


def main() -> int:
    if sys.version_info < (3, 9):  # noqa: UP036 runs on the login node's python3
        sys.exit("titanenv: needs Python 3.9 or newer as python3 (on JSC: module load Python), or set TITANENV_PYTHON")
    # Running this file puts src/titanenv/ first on the path; src/ is what the imports need.
    sys.path[0] = str(Path(__file__).resolve().parents[1])
    module = importlib.import_module(sys.argv[1])
    return module.main(sys.argv[2:])


if __name__ == "__main__":
    sys.exit(main())
