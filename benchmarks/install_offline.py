"""Offline install of the full runtime dependency set from a wheelhouse: pip against uv, side by side.

What is timed is the step ``env/set_up.sh offline`` spends its time in: installing the lock's
selection (hash-checked, ``--no-index``, wheels only) into a fresh venv, with the very command
``titanenv.env.venv.install_command`` builds. Each round makes three fresh venvs and times, in
turn, pip, uv with an empty cache (a first install on a new machine) and uv with the cache the
previous uv run filled. Venv creation is not timed.

    python benchmarks/install_offline.py                    # fetch the wheelhouse first if needed
    python benchmarks/install_offline.py --wheelhouse DIR --rounds 3

The wheelhouse is made with ``env/set_up.sh download --extras train,eval --build-sdists`` for
this machine (network needed once); ``--extras`` changes the set.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from titanenv.env.lockfile import Lock, write_requirements  # noqa: E402
from titanenv.env.platforms import Platform  # noqa: E402
from titanenv.env.venv import LOCK_INSTALL, base_python, find_uv, install_command  # noqa: E402
from titanenv.env.wheelhouse import Wheelhouse  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--wheelhouse", type=Path, help="wheel folder (default: made under --work)")
    p.add_argument(
        "--extras", default="train,eval", help="extras of the set (default: train,eval = what the image adds)"
    )
    p.add_argument("--rounds", type=int, default=2, help="rounds of pip / uv cold / uv warm (default: 2)")
    p.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "titanenv-bench-install")
    args = p.parse_args()
    extras = [e for e in args.extras.split(",") if e]
    host = Platform.host()
    house = args.wheelhouse or args.work / "wheelhouse" / host.tag
    if not (house / "titanenv-wheelhouse.json").is_file():
        env = dict(os.environ, TITANENV_CONTAINER_RUNTIME="none", TITANENV_SCRATCH_DIR=str(args.work))
        subprocess.run(
            [
                str(ROOT / "env" / "set_up.sh"),
                "download",
                "--extras",
                ",".join(extras),
                "--build-sdists",
                "--wheelhouse",
                str(house),
            ],
            env=env,
            check=True,
        )
    lock = Lock.read(ROOT / "env" / "requirements.lock")
    reqs = lock.select(extras, host.marker_environment())
    missing = Wheelhouse(house).missing(reqs)
    if missing:
        sys.exit(f"wheelhouse {house} lacks {', '.join(r.pin for r in missing)}")
    uv = find_uv()
    if uv is None:
        sys.exit("uv is not installed (pip install uv; the pin is in pyproject.toml's dev extra)")
    reqfile = write_requirements(reqs, args.work / "requirements.txt", Wheelhouse(house).built_hashes())
    times: dict[str, list[float]] = {"pip": [], "uv (empty cache)": [], "uv (warm cache)": []}
    for _ in range(args.rounds):
        cache = args.work / "uv-cache"
        shutil.rmtree(cache, ignore_errors=True)
        for name, installer in (("pip", None), ("uv (empty cache)", uv), ("uv (warm cache)", uv)):
            times[name].append(_timed_install(args.work / "venv", installer, house, reqfile, cache))
    _report(times, len(reqs), sum(f.stat().st_size for f in house.glob("*.whl")), extras, uv)


def _timed_install(venv: Path, uv: list[str] | None, house: Path, reqfile: Path, cache: Path) -> float:
    shutil.rmtree(venv, ignore_errors=True)
    subprocess.run([base_python(), "-m", "venv", str(venv)], check=True)
    cmd = install_command(uv, venv / "bin" / "python", house, LOCK_INSTALL + [str(reqfile)])
    env = dict(os.environ, UV_CACHE_DIR=str(cache), PIP_NO_CACHE_DIR="1")
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stderr}")
    return elapsed


def _report(times: dict[str, list[float]], packages: int, size: int, extras: list[str], uv: list[str]) -> None:
    uv_version = subprocess.run([*uv, "--version"], capture_output=True, text=True).stdout.strip()
    pip_version = subprocess.run(
        [base_python(), "-m", "pip", "--version"], capture_output=True, text=True
    ).stdout.split()[1]
    median = {k: statistics.median(v) for k, v in times.items()}
    print(json.dumps({"times_s": times, "median_s": median}, indent=2))
    print(
        f"\n{packages} packages ({', '.join(extras)}; {size / 1e6:.0f} MB of wheels), pip {pip_version}, {uv_version}, "
        f"Python {platform.python_version()}, {os.cpu_count()} CPUs, "
        f"{datetime.date.today().isoformat()}\n"
    )
    print("| installer | median (s) | runs (s) | / pip |")
    print("| --- | --- | --- | --- |")
    for name, values in times.items():
        runs = ", ".join(f"{v:.1f}" for v in values)
        print(f"| {name} | {median[name]:.1f} | {runs} | {median[name] / median['pip']:.2f} |")


if __name__ == "__main__":
    main()
