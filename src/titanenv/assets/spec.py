"""The asset list: one TOML file naming everything a job needs from the Hub.

Example (``examples/assets.toml`` has a commented one)::

    metrics = ["accuracy"]                    # evaluate metrics
    nltk = ["punkt_tab"]                      # nltk data packages

    [experiment]                              # what the job touches: doctor checks it,
    tokenizer = "meta-llama/Llama-3.2-1B"     # fetch adds its Hub ids
    data = ["$TITANENV_DATA_DIR/corpus/train"]
    eval_tasks = ["hellaswag"]

    [[models]]
    repo = "meta-llama/Llama-3.2-1B"
    allow_patterns = ["*.json", "*.safetensors"]

    [[datasets]]
    repo = "allenai/c4"
    config = "en"
    split = "validation"

    [lm_eval]
    tasks = ["arc_easy", "ifeval"]

Every asset has a *key* (``model:org/name``, ``dataset:org/name?name=en&split=validation``,
``metric:accuracy``, ``nltk:punkt_tab``, ``task:hellaswag``): ``titanenv assets fetch --add KEY``
fetches one without a file, ``--only KEY`` picks one from a file, and ``titanenv doctor`` prints
the key of each missing asset in its fetch command.
"""

from __future__ import annotations

import hashlib
import json
import os
import tomllib
import typing
from pathlib import Path
from typing import Any, ClassVar, Literal
from urllib.parse import parse_qsl, urlencode

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

TOKENIZER_PATTERNS = [
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "vocab.txt", "added_tokens.json", "chat_template.jinja",
    "config.json", "generation_config.json",
]  # fmt: skip
"""Files a tokenizer-only download takes (``config.json`` too: ``AutoTokenizer`` reads it)."""


class AssetListError(ValueError):
    """The asset list (or an asset key) is invalid; the message names the file, field and fix."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _repo_id(value: str) -> str:
    if value.count("/") != 1 or value.startswith(("/", ".")) or not all(value.split("/")):
        raise ValueError(f"{value!r} is not a Hub repository id; write it as 'org/name'")
    return value


class HubModel(_Strict):
    """A model repository, downloaded whole (or by patterns) with ``snapshot_download``."""

    kind: ClassVar[str] = "model"
    repo: str
    """Hub repository id, ``org/name``."""
    revision: str = "main"
    """Branch, tag or commit; the lockfile records the commit it resolved to."""
    allow_patterns: list[str] | None = None
    """Only files matching one of these globs (``snapshot_download`` semantics); all when unset."""
    ignore_patterns: list[str] | None = None
    """Files matching one of these globs are skipped."""

    @field_validator("repo")
    @classmethod
    def _check_repo(cls, v: str) -> str:
        return _repo_id(v)

    @property
    def key(self) -> str:
        return f"{self.kind}:{self.repo}" + (f"@{self.revision}" if self.revision != "main" else "")

    @property
    def patterns(self) -> list[str] | None:
        return self.allow_patterns


class Tokenizer(HubModel):
    """A tokenizer: a model repository limited to :data:`TOKENIZER_PATTERNS` unless patterns are given."""

    kind: ClassVar[str] = "tokenizer"

    @property
    def patterns(self) -> list[str] | None:
        return self.allow_patterns if self.allow_patterns is not None else TOKENIZER_PATTERNS


class Dataset(_Strict):
    """A dataset loaded with ``datasets.load_dataset(repo, config, revision=..., **kwargs)``.

    Fetching runs that load online once, which writes the processed Arrow cache that an
    offline ``load_dataset`` with the same arguments reads.
    """

    kind: ClassVar[str] = "dataset"
    repo: str
    """``load_dataset``'s ``path``: a Hub dataset id, or a packaged builder (``json``, ``parquet``)
    with ``data_files``."""
    config: str | None = None
    """``load_dataset``'s ``name`` (the dataset configuration)."""
    split: str | None = None
    """Split the job reads; doctor loads this one (all splits are prepared either way)."""
    revision: str | None = None
    """Branch, tag or commit; the Hub default branch when unset."""
    kwargs: dict[str, Any] = Field(default_factory=dict)
    """Further ``load_dataset`` keyword arguments, e.g. lm-eval's ``dataset_kwargs``."""

    @property
    def key(self) -> str:
        query = {k: v for k, v in (("name", self.config), ("split", self.split), ("revision", self.revision)) if v}
        if self.kwargs:
            # Unique and short; the full arguments are in the lockfile.
            query["kwargs"] = hashlib.sha256(json.dumps(self.kwargs, sort_keys=True).encode()).hexdigest()[:8]
        return f"dataset:{self.repo}" + (f"?{urlencode(query)}" if query else "")

    def load_arguments(self) -> dict[str, Any]:
        """Keyword arguments for ``datasets.load_dataset`` (``split`` left out: all splits are prepared)."""
        args: dict[str, Any] = {"path": self.repo, "name": self.config, **self.kwargs}
        if self.revision:
            args["revision"] = self.revision
        return args


class Metric(_Strict):
    """An ``evaluate`` metric (a Hub Space), loaded once with ``evaluate.load(name)``."""

    kind: ClassVar[str] = "metric"
    name: str
    """``accuracy`` (canonical, Space ``evaluate-metric/accuracy``) or ``org/name`` (community)."""
    revision: str | None = None
    """Space revision; by default evaluate's own rule (tag ``v<evaluate version>``, else ``main``)."""

    @property
    def key(self) -> str:
        return f"metric:{self.name}" + (f"@{self.revision}" if self.revision else "")


class NltkData(_Strict):
    """An nltk data package (``punkt_tab``), downloaded into ``$NLTK_DATA`` (default ``$HF_HOME/nltk_data``)."""

    kind: ClassVar[str] = "nltk"
    name: str

    @property
    def key(self) -> str:
        return f"nltk:{self.name}"


class ExtraFile(_Strict):
    """One more file: from a Hub repository (``repo`` + ``filename``) or from a URL (``url`` + ``sha256``)."""

    kind: ClassVar[str] = "file"
    repo: str | None = None
    filename: str | None = None
    repo_type: Literal["model", "dataset", "space"] = "model"
    revision: str = "main"
    url: str | None = None
    sha256: str | None = None
    """Required with ``url``: a URL has no commit, so the expected content is pinned here."""
    dest: str | None = None
    """For ``url``: where under ``HF_HOME`` to store it; default ``titanenv/files/<file name>``."""

    @model_validator(mode="after")
    def _one_source(self) -> ExtraFile:
        if self.url:
            if self.repo or self.filename:
                raise ValueError("give either url (with sha256) or repo and filename, not both")
            if not self.sha256 or len(self.sha256) != 64:
                raise ValueError("a url needs sha256 = '<64 hex digits>' (its expected content)")
            if self.dest and (Path(self.dest).is_absolute() or ".." in Path(self.dest).parts):
                raise ValueError(f"dest {self.dest!r} must be a relative path inside HF_HOME")
        elif not (self.repo and self.filename):
            raise ValueError("give repo and filename (a file of a Hub repository), or url and sha256")
        else:
            _repo_id(self.repo)
        return self

    @property
    def key(self) -> str:
        if self.url:
            return f"file:{self.url}"
        return f"file:{self.repo_type}:{self.repo}/{self.filename}" + (
            f"@{self.revision}" if self.revision != "main" else ""
        )

    @property
    def destination(self) -> str:
        """Path under ``HF_HOME`` of a URL download."""
        return self.dest or f"titanenv/files/{Path(self.url or '').name or 'download'}"


Item = HubModel | Tokenizer | Dataset | Metric | NltkData | ExtraFile
"""One thing to fetch; each has ``kind`` and ``key``."""


class LmEval(_Strict):
    """lm-eval tasks, expanded by :mod:`titanenv.assets.lmeval` into datasets, metrics and nltk data."""

    tasks: list[str] = Field(default_factory=list)
    """Task, group or tag names (``mmlu``, ``ai2_arc``), paths to task YAML files, or ``"all"``:
    every leaf task lm-eval knows (its own and the ``include_path`` ones; thousands of datasets)."""
    task_file: Path | None = None
    """A file with one task name per line (``#`` comments), as the old ``--task-file``."""
    include_path: list[Path] = Field(default_factory=list)
    """Folders of custom task YAML files (lm-eval's ``--include_path``)."""

    @field_validator("task_file", "include_path", mode="after")
    @classmethod
    def _relative_to_file(cls, v: Any, info: ValidationInfo) -> Any:
        return _rebase(v, info)

    def all_tasks(self) -> list[str]:
        """``tasks`` plus the names in ``task_file``."""
        names = list(self.tasks)
        if self.task_file is not None:
            try:
                lines = self.task_file.read_text().splitlines()
            except OSError as e:
                raise AssetListError(f"lm_eval.task_file: cannot read {self.task_file} ({e.strerror})") from None
            names += [s for line in lines if (s := line.split("#", 1)[0].strip())]
        return names


class Experiment(_Strict):
    """What a job touches. ``titanenv doctor`` resolves all of it; ``fetch`` adds its Hub ids."""

    tokenizer: str | None = None
    """Hub id (``org/name``) or a ``tokenizer.json`` file or folder, as ``--tokenizer``."""
    model: str | None = None
    """Hub id or a local folder of a model the job loads (evaluation)."""
    data: list[str] = Field(default_factory=list)
    """Tokenized dataset prefixes (``PREFIX.bin``/``PREFIX.idx``); ``$VARS`` are expanded."""
    eval_tasks: list[str] = Field(default_factory=list)
    """lm-eval task names the job runs."""

    @field_validator("data", mode="after")
    @classmethod
    def _expand(cls, v: list[str], info: ValidationInfo) -> list[str]:
        return [str(_rebase(Path(os.path.expandvars(p)), info)) for p in v]


class AssetList(_Strict):
    """The whole asset list file."""

    models: list[HubModel] = Field(default_factory=list)
    tokenizers: list[Tokenizer] = Field(default_factory=list)
    datasets: list[Dataset] = Field(default_factory=list)
    metrics: list[Metric] = Field(default_factory=list)
    """Metric names, or tables with ``name`` and ``revision``."""
    nltk: list[NltkData] = Field(default_factory=list)
    """nltk package names, e.g. ``["punkt_tab"]``."""
    files: list[ExtraFile] = Field(default_factory=list)
    lm_eval: LmEval = Field(default_factory=LmEval)
    experiment: Experiment = Field(default_factory=Experiment)

    @field_validator("metrics", "nltk", mode="before")
    @classmethod
    def _names(cls, v: Any) -> Any:
        return [{"name": x} if isinstance(x, str) else x for x in v] if isinstance(v, list) else v


def _rebase(value: Any, info: ValidationInfo) -> Any:
    """Relative paths in the file are relative to the file's folder."""
    base = (info.context or {}).get("base")
    if base is None or value is None:
        return value
    if isinstance(value, list):
        return [_rebase(v, info) for v in value]
    return value if Path(value).is_absolute() else Path(base) / value


def load(path: str | os.PathLike) -> AssetList:
    """Read and validate an asset list file.

    Raises:
        AssetListError: the file is missing, not TOML, or a field is invalid; the message
            names the file and the field (``datasets[1].repo``).
    """
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except OSError as e:
        raise AssetListError(f"{path}: cannot read the asset list ({e.strerror})") from None
    except tomllib.TOMLDecodeError as e:
        raise AssetListError(f"{path}: not valid TOML ({e})") from None
    try:
        return AssetList.model_validate(data, context={"base": path.resolve().parent})
    except ValidationError as e:
        raise AssetListError(
            f"{path}: invalid asset list:\n  " + "\n  ".join(_describe(err) for err in e.errors())
        ) from None


def _describe(err: Any) -> str:
    loc = ""
    for part in err["loc"]:
        loc += f"[{part}]" if isinstance(part, int) else (f".{part}" if loc else str(part))
    msg = err["msg"]
    if err["type"] == "extra_forbidden":
        msg = f"unknown field; known: {', '.join(_fields_at(err['loc'][:-1]))}"
    return f"{loc or '(top level)'}: {msg}"


def _fields_at(loc: tuple) -> list[str]:
    """The field names of the table at ``loc`` (``("datasets", 0)`` -> Dataset's fields)."""
    model: Any = AssetList
    for part in loc:
        if isinstance(part, str):
            annotation = model.model_fields[part].annotation
            model = typing.get_args(annotation)[0] if typing.get_args(annotation) else annotation
    return list(model.model_fields)


def parse_key(key: str) -> Item | str:
    """The asset a key names, for ``--add``/``--only``; a ``task:NAME`` key returns the task name.

    Raises:
        AssetListError: the key's kind is unknown or its value invalid.
    """
    kind, sep, value = key.partition(":")
    if not sep or not value:
        raise AssetListError(
            f"{key!r}: an asset key is KIND:VALUE, e.g. model:org/name, dataset:org/name?name=CONFIG, "
            "metric:accuracy, nltk:punkt_tab, task:hellaswag"
        )
    try:
        if kind in ("model", "tokenizer"):
            repo, _, rev = value.partition("@")
            cls = HubModel if kind == "model" else Tokenizer
            return cls(repo=repo, revision=rev or "main")
        if kind == "dataset":
            repo, _, query = value.partition("?")
            opts = dict(parse_qsl(query))
            unknown = set(opts) - {"name", "split", "revision"}
            if unknown:
                raise ValueError(f"unknown option(s) {sorted(unknown)}; use name, split, revision")
            return Dataset(repo=repo, config=opts.get("name"), split=opts.get("split"), revision=opts.get("revision"))
        if kind == "metric":
            name, _, rev = value.partition("@")
            return Metric(name=name, revision=rev or None)
        if kind == "nltk":
            return NltkData(name=value)
        if kind == "task":
            return value
    except (ValidationError, ValueError) as e:
        detail = e.errors()[0]["msg"] if isinstance(e, ValidationError) else str(e)
        raise AssetListError(f"{key!r}: {detail}") from None
    raise AssetListError(f"{key!r}: unknown asset kind {kind!r}; use model, tokenizer, dataset, metric, nltk or task")
