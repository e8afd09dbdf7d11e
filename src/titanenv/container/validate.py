"""Check an Apptainer definition the way Apptainer 1.4/1.5 parses it, and name the line at fault.

Apptainer reports most mistakes late (after pulling a 20 GB base) or not at all (an extra
``%files`` field is silently dropped). The rules here follow its parser
(``pkg/build/types/parser/deffile.go``), its build-argument templating
(``internal/pkg/build/args``) and its bootstrap agents (``internal/pkg/build/conveyorPacker.go``):

- stages start at ``Bootstrap:`` lines; a header holds ``Key: value`` lines with known keywords;
- the bootstrap agent is known, and image agents have a ``From:``;
- a line whose first word starts with ``%`` opens a section, which must be a known one (app
  sections need an app name) -- also inside a script, where Apptainer would end the script;
- ``%files`` lines are ``src [dst]``; ``%arguments`` lines are ``KEY=VALUE``;
- every ``{{ VAR }}`` is defined in ``%arguments`` or given as a build argument (Apptainer skips
  a ``{{ VAR }}`` that follows a ``#`` on its line, so that is reported as a warning);
- script sections pass ``bash -n``.

Standard library only (``bash`` for the syntax check).
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["APP_SECTIONS", "AGENTS", "HEADER_KEYWORDS", "SECTIONS", "Problem", "check_file", "expand", "validate"]

HEADER_KEYWORDS = frozenset(
    {
        "bootstrap",
        "from",
        "includecmd",
        "mirrorurl",
        "updateurl",
        "osversion",
        "include",
        "library",
        "registry",
        "namespace",
        "stage",
        "product",
        "user",
        "regcode",
        "productpgp",
        "registerurl",
        "modules",
        "otherurl&n",
        "fingerprints",
        "confurl",
        "setopt",
    }
)
SECTIONS = frozenset(
    {"help", "setup", "files", "labels", "environment", "pre", "post", "runscript", "test", "startscript", "arguments"}
)
APP_SECTIONS = frozenset({"appinstall", "applabels", "appfiles", "appenv", "apptest", "apphelp", "apprun", "appstart"})
SCRIPT_SECTIONS = frozenset(
    {
        "setup",
        "pre",
        "post",
        "environment",
        "runscript",
        "test",
        "startscript",
        "appinstall",
        "appenv",
        "apptest",
        "apprun",
        "appstart",
    }
)
IMAGE_AGENTS = frozenset(
    {"docker", "docker-archive", "docker-daemon", "oci", "oci-archive", "localimage", "library", "oras", "shub"}
)
AGENTS = IMAGE_AGENTS | {"busybox", "debootstrap", "arch", "yum", "zypper", "scratch"}
_BUILD_ARG = re.compile(r"{{\s*(\w+)\s*}}")
_COMMENTED = re.compile(r"\s*[#][^!]\s*.*")  # Apptainer's commentLineRegexp, searched before each {{ VAR }}
# Apptainer's fileSplitter: fields split at spaces, except inside quotes or a {{ VAR }}.
_FILE_FIELD = re.compile(r"""([^\s"']*{{\s*\w+\s*}}*[^\s{}"']*)+|([^\s"']+|"([^"]*)"|'([^']*))""")
_BASH_LINE = re.compile(r"line (\d+): (.*)")


@dataclass(frozen=True)
class Problem:
    """One finding: the 1-based line, what is wrong and how to fix it."""

    line: int
    message: str
    severity: str = "error"

    def format(self, path: str | Path) -> str:
        return f"{path}:{self.line}: {self.severity}: {self.message}"


@dataclass
class Section:
    name: str
    args: str
    line: int
    body: list[str] = field(default_factory=list)


@dataclass
class Stage:
    start: int
    header: list[tuple[int, str]] = field(default_factory=list)
    sections: list[Section] = field(default_factory=list)

    def arguments(self) -> dict[str, str]:
        """The ``%arguments`` defaults, as Apptainer reads them."""
        values: dict[str, str] = {}
        for s in self.sections:
            if s.name == "arguments":
                for line in s.body:
                    text = line.strip()
                    if text and not text.startswith("#") and "=" in text:
                        key, _, value = text.partition("=")
                        values[key.strip()] = value.strip()
        return values


def check_file(path: str | Path, build_args: dict[str, str] | None = None) -> list[Problem]:
    """Validate the definition at ``path``; see :func:`validate`."""
    return validate(Path(path).read_text(), build_args)


def validate(text: str, build_args: dict[str, str] | None = None) -> list[Problem]:
    """All problems of definition ``text``, in line order.

    Args:
        build_args: values given with ``--build-arg``; they take precedence over ``%arguments``.
    """
    build_args = build_args or {}
    problems: list[Problem] = []
    stages = _split(text)
    if not any(s.header for s in stages):
        problems.append(Problem(1, "no header: the definition must start with 'Bootstrap: AGENT' (and 'From: IMAGE')"))
    for stage in stages:
        defined = {**stage.arguments(), **build_args}
        problems += _check_header(stage, defined)
        problems += _check_sections(stage, defined)
        problems += _check_build_args(text, stage, defined)
    return sorted(problems, key=lambda p: (p.line, p.severity))


def expand(text: str, build_args: dict[str, str] | None = None) -> str:
    """``text`` with every ``{{ VAR }}`` replaced by its build argument, else its ``%arguments`` default."""
    defined = {k: v for s in _split(text) for k, v in s.arguments().items()}
    return _substitute(text, {**defined, **(build_args or {})})


def _split(text: str) -> list[Stage]:
    """Stages (split at ``Bootstrap:`` lines, as Apptainer does), each with header and sections."""
    lines = text.splitlines()
    starts = [i for i, line in enumerate(lines) if re.match(r"(?i)bootstrap:", line)]
    bounds = ([0] if not starts or starts[0] != 0 else []) + starts + [len(lines)]
    stages = []
    for lo, hi in zip(bounds, bounds[1:], strict=False):
        stage = Stage(lo + 1)
        for i in range(lo, hi):
            words = lines[i].split()
            if words and words[0].startswith("%"):
                name = words[0][1:].lower()
                stage.sections.append(Section(name, " ".join(words[1:]), i + 1))
            elif stage.sections:
                stage.sections[-1].body.append(lines[i])
            else:
                stage.header.append((i + 1, lines[i]))
        if stage.header and all(not t.strip() or t.strip().startswith("#") for _, t in stage.header):
            stage.header = []
        if stage.header or stage.sections:
            stages.append(stage)
    return stages


def _check_header(stage: Stage, defined: dict[str, str]) -> list[Problem]:
    problems: list[Problem] = []
    keys: dict[str, tuple[int, str]] = {}
    cont: tuple[int, str, str] | None = None  # a value continued with a trailing backslash
    for n, raw in stage.header:
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        line = line.split("#", 1)[0]
        if cont:
            key, value, n = cont[1], cont[2] + line.strip(), cont[0]
            cont = None
        elif ":" not in line:
            problems.append(Problem(n, f"header line {line.strip()!r} is not 'Keyword: value'"))
            continue
        else:
            key, _, value = line.partition(":")
            key, value = key.strip().lower(), value.strip()
        if value.endswith("\\"):
            cont = (n, key, value[:-1])
            continue
        if key not in HEADER_KEYWORDS and re.sub(r"\d+$", "&n", key) not in HEADER_KEYWORDS:
            problems.append(
                Problem(
                    n,
                    f"unknown header keyword {key!r}; Apptainer knows "
                    + ", ".join(sorted(k.replace("&n", "N") for k in HEADER_KEYWORDS)),
                )
            )
            continue
        keys[key] = (n, _substitute(value, defined))
    if not stage.header:
        return problems
    if "bootstrap" not in keys:
        problems.append(Problem(stage.start, "no 'Bootstrap:' line in this header"))
        return problems
    n, agent = keys["bootstrap"]
    if agent not in AGENTS:
        problems.append(
            Problem(n, f"unknown bootstrap agent {agent!r}; use one of {', '.join(sorted(AGENTS))} (lower case)")
        )
    elif agent in IMAGE_AGENTS and not keys.get("from", (0, ""))[1]:
        problems.append(Problem(n, f"'Bootstrap: {agent}' needs a 'From:' line naming the image"))
    return problems


def _check_sections(stage: Stage, defined: dict[str, str]) -> list[Problem]:
    problems: list[Problem] = []
    for s in stage.sections:
        if s.name in APP_SECTIONS:
            if not s.args.split():
                problems.append(Problem(s.line, f"%{s.name} needs an app name: '%{s.name} NAME'"))
        elif s.name not in SECTIONS:
            known = ", ".join(sorted(SECTIONS | APP_SECTIONS))
            problems.append(
                Problem(
                    s.line,
                    f"unknown section %{s.name} (a line whose first word starts with '%' "
                    f"opens a section, even inside a script); known: {known}",
                )
            )
            continue
        if s.name in ("files", "appfiles"):
            problems += _check_files(s)
        elif s.name == "arguments":
            problems += _check_arguments(s)
        if s.name in SCRIPT_SECTIONS:
            problems += _bash_syntax(s, defined)
    return problems


def _check_files(s: Section) -> list[Problem]:
    problems = []
    args = s.args.split()
    if s.name == "files" and args and (len(args) != 2 or args[0] != "from"):
        problems.append(Problem(s.line, f"%files takes no arguments or 'from STAGE', not {s.args!r}"))
    for i, line in enumerate(s.body, s.line + 1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        fields = [m.group(0) for m in _FILE_FIELD.finditer(text) if m.group(0)]
        if len(fields) > 2:
            problems.append(
                Problem(
                    i,
                    f"%files entries are 'src [dst]', this line has {len(fields)} fields "
                    "(Apptainer would drop the rest); quote paths with spaces",
                )
            )
    return problems


def _check_arguments(s: Section) -> list[Problem]:
    problems = []
    for i, line in enumerate(s.body, s.line + 1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        key = text.partition("=")[0].strip()
        if "=" not in text or not key:
            problems.append(Problem(i, f"%arguments lines are 'KEY=VALUE', not {text!r} (Apptainer would skip it)"))
        elif not re.fullmatch(r"\w+", key):
            problems.append(
                Problem(i, f"argument name {key!r} cannot be used as {{{{ {key} }}}}: use letters, digits, _")
            )
    return problems


def _check_build_args(text: str, stage: Stage, defined: dict[str, str]) -> list[Problem]:
    """Each ``{{ VAR }}`` of the stage is defined; mirrors Apptainer's replacement loop."""
    lines = text.splitlines(keepends=True)
    last = stage.sections[-1].line + len(stage.sections[-1].body) if stage.sections else stage.header[-1][0]
    problems = []
    for n in range(stage.start, last + 1):
        line = lines[n - 1]
        done = 0  # Apptainer looks for '#' between the previous replacement (or line start) and the match
        for m in _BUILD_ARG.finditer(line):
            if _COMMENTED.search(line[done : m.start()]):
                if not line.lstrip().startswith("#"):
                    problems.append(
                        Problem(n, f"{m.group(0)} follows a '#' on its line, so Apptainer leaves it as is", "warning")
                    )
                continue
            if m.group(1) not in defined:
                problems.append(
                    Problem(
                        n,
                        f"{m.group(0)} is not defined: add '{m.group(1)}=VALUE' to %arguments "
                        f"or pass --build-arg {m.group(1)}=VALUE",
                    )
                )
            done = m.end()
    return problems


def _bash_syntax(s: Section, defined: dict[str, str]) -> list[Problem]:
    script = _substitute("\n".join(s.body), defined) + "\n"
    if not script.strip():
        return []
    proc = subprocess.run(["bash", "-n"], input=script, capture_output=True, text=True)
    if proc.returncode == 0:
        return []
    problems: list[Problem] = []
    for err in proc.stderr.splitlines():
        m = _BASH_LINE.search(err)
        if m and m.group(2).startswith("`") and problems:  # bash echoes the offending line after the error
            last = problems.pop()
            problems.append(Problem(last.line, f"{last.message} in {m.group(2)}"))
        elif m:
            # bash counts an unclosed if/for/quote at the end of input: point at the section's last line instead
            last_line = s.line + max((i for i, line in enumerate(s.body, 1) if line.strip()), default=1)
            message = m.group(2) + (
                " (an if, loop, brace or quote opened in this section is not closed)"
                if "unexpected end of file" in m.group(2)
                else ""
            )
            problems.append(Problem(min(s.line + int(m.group(1)), last_line), f"bash -n in %{s.name}: {message}"))
    return problems or [Problem(s.line, f"bash -n in %{s.name}: {proc.stderr.strip()}")]


def _substitute(text: str, defined: dict[str, str]) -> str:
    return _BUILD_ARG.sub(lambda m: defined.get(m.group(1), m.group(0)), text)
