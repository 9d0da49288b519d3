"""Checkpoints named by Hugging Face id, resolved by ``huggingface_hub`` itself.

``--model``, ``--tokenizer`` and ``--apd-verifier`` name a local directory when one exists at
that path; otherwise a Hub id. The library does the resolving: its cache first (``HF_HOME``,
``HF_HUB_CACHE`` or ``--download-dir``), ``HF_HUB_OFFLINE`` and ``HF_TOKEN`` as it reads them,
then a download of only the files the loader reads: config, safetensors shards and index,
tokenizer files and chat template. Never the ``.bin``/``.pth`` pickles, and remote code only
for the transformers fallback with ``--trust-remote-code``. Every failure is one line, a
``CheckpointError`` that names the id and what to do.
"""

from __future__ import annotations

import io
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import huggingface_hub
from huggingface_hub import constants
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    IncompleteSnapshotError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import are_progress_bars_disabled, validate_repo_id
from loguru import logger
from tqdm import tqdm

from vdiff_worker.models.errors import CheckpointError

# What the loader and the tokenizer read, as huggingface_hub allow patterns. The Kubernetes
# download Job (deploy/kubernetes/models.yaml) passes the same list to `hf download --include`.
CONFIG_FILES = ("config.json",)
TOKENIZER_FILES = (
    "config.json",  # AutoTokenizer reads model_type from it when tokenizer_config.json is vague
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "tokenizer.model",
    "*.tiktoken",
    "chat_template.jinja",
    "chat_template.json",
)
MODEL_FILES = (
    *TOKENIZER_FILES,
    "generation_config.json",
    "*.safetensors",
    "*.safetensors.index.json",
)
# Only the transformers fallback with --trust-remote-code runs a checkpoint's own code.
REMOTE_CODE_FILES = ("*.py",)
# The loader reads the top level only; sub-folders hold other formats (onnx/, original/...).
IGNORE = ("*/*",)
_INDEX = "model.safetensors.index.json"
_PROGRESS_EVERY_S = 10.0


@dataclass(frozen=True)
class Snapshot:
    """Where a checkpoint's files are: a local directory, or a Hub id's cached snapshot."""

    path: Path | None  # None: not located yet
    repo_id: str | None = None  # None: a local directory, used as it is
    revision: str = constants.DEFAULT_REVISION  # as asked: a branch, tag or commit
    download_dir: str | None = None

    @property
    def root(self) -> Path:
        assert self.path is not None, f"{self.repo_id} is not located yet"
        return self.path

    @property
    def commit(self) -> str:
        # The cache keeps each snapshot in a folder named by its commit hash.
        return self.root.name


def locate(
    spec: str,
    *,
    files: Sequence[str],
    revision: str | None = None,
    download_dir: str | None = None,
    what: str = "model",
) -> Snapshot:
    """The local directory ``spec``, or the Hub id ``spec`` with ``files`` in the cache."""
    local = Path(spec).expanduser()
    if local.is_dir():
        return Snapshot(local)
    try:
        validate_repo_id(spec)
    except HFValidationError:
        # Not an id either (an absolute path, "./x", "a/b/c"): report it as the path it is.
        raise CheckpointError(f"{what} directory {spec} does not exist") from None
    # An empty VDIFF_REVISION or VDIFF_DOWNLOAD_DIR (a compose default) means unset.
    rev = revision or constants.DEFAULT_REVISION
    return fetch(Snapshot(None, spec, rev, download_dir or None), files, progress=False)


def fetch(snapshot: Snapshot, files: Sequence[str], progress: bool = True) -> Snapshot:
    """``files`` of a Hub snapshot, from the cache or downloaded into it, with the download's
    ``progress`` in the log (not worth it for a config or a tokenizer).

    A snapshot already located is fetched again at its commit, so that the second call
    needs no revision look-up and cannot see a newer commit than the first.
    """
    assert snapshot.repo_id is not None, "a local directory has nothing to fetch"
    revision = snapshot.revision if snapshot.path is None else snapshot.commit
    started = time.monotonic()
    LogProgress.reset()
    for name in ("httpx", "httpx2"):  # the library's HTTP clients: a line per request, at INFO,
        logging.getLogger(name).setLevel(logging.WARNING)  # would bury the progress lines
    try:
        path = huggingface_hub.snapshot_download(
            snapshot.repo_id,
            revision=revision,
            cache_dir=snapshot.download_dir,
            allow_patterns=list(files),
            ignore_patterns=list(IGNORE),
            # The library would learn this from its HTTP layer; asking first skips the look-up.
            local_files_only=constants.is_offline_mode(),
            tqdm_class=LogProgress if progress and not are_progress_bars_disabled() else _Quiet,
        )
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError, ValueError) as err:
        raise CheckpointError(_explain(err, snapshot)) from err
    found = Snapshot(Path(path), snapshot.repo_id, snapshot.revision, snapshot.download_dir)
    if progress and LogProgress.moved:
        logger.info("downloaded {} in {:.1f} s", found.repo_id, time.monotonic() - started)
    if snapshot.path is None:  # said once, when the revision is first resolved
        logger.info(
            "{} (revision {}, commit {}) is {}",
            found.repo_id,
            found.revision,
            found.commit[:12],
            found.path,
        )
    return found


def check_complete(snapshot: Snapshot, weights: bool = True) -> None:
    """Refuse a half-downloaded snapshot: a file whose blob is missing, or (``weights``) a
    shard that the index names and the snapshot lacks. huggingface_hub checks this itself
    only where it cached the repository's file listing; caches filled otherwise (older
    versions, copies) have none."""
    root = snapshot.root
    # hf writes a snapshot's link once its blob is complete; a link without a blob is a
    # blob deleted since (a cache pruned by hand, a partial copy).
    dangling = {p.name for p in root.iterdir() if p.is_symlink() and not p.exists()}
    index = root / _INDEX
    shards: set[str] = set()
    if weights and index.is_file():
        try:
            shards = {
                str(s) for s in json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()
            }
        except (ValueError, KeyError, AttributeError, TypeError) as exc:
            raise CheckpointError(
                f"{snapshot.repo_id}: {index} is not a valid safetensors index: {exc}"
            ) from exc
    elif weights and not any(root.glob("*.safetensors")):
        raise CheckpointError(
            f"{snapshot.repo_id} (revision {snapshot.revision}) has no safetensors weights; "
            "vdiff never loads .bin/.pth pickles"
        )
    absent = {s for s in shards if not (root / s).is_file()}
    if absent or dangling:
        shown = ", ".join(sorted(absent | dangling))
        named = f" (named in {_INDEX})" if absent else ""
        raise CheckpointError(
            f"{snapshot.repo_id} (revision {snapshot.revision}): the cached snapshot {root} is "
            f"incomplete, an interrupted download? Missing: {shown}{named}. "
            f"{_how_to_fetch(snapshot)}"
        )


class LogProgress(tqdm):
    """huggingface_hub's download progress as log lines: one every few seconds, from
    whichever of its bars (files, bytes received, bytes written) moves.

    tqdm's own bar draws on a terminal only (the library turns it off elsewhere), and its
    carriage returns would break the worker's JSON log; a log line works for both, and in
    ``kubectl logs``. Nothing is logged when a bar closes: the library leaves its byte bars
    to the garbage collector, which closes them at any later time; ``fetch`` logs the end.
    """

    next_line: ClassVar[float] = 0.0  # monotonic time of the next line, shared by the bars
    moved: ClassVar[bool] = False  # bytes went by since reset(): something was downloaded

    @classmethod
    def reset(cls) -> None:
        cls.next_line = time.monotonic() + _PROGRESS_EVERY_S  # a quick fetch logs no line
        cls.moved = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.pop("name", None)  # the library's bar-group name: not a tqdm argument
        # Drawing goes to a scratch buffer: display() below logs instead.
        kwargs.update(disable=False, mininterval=1.0, file=io.StringIO())
        super().__init__(*args, **kwargs)

    def update(self, n: float | None = 1) -> bool | None:
        if n and self.unit == "B":
            LogProgress.moved = True
        return super().update(n)  # type: ignore[no-any-return]

    def display(self, msg: str | None = None, pos: int | None = None) -> bool:
        now = time.monotonic()
        # tqdm marks a closing bar disabled before its last display.
        if self.n and not self.disable and now >= LogProgress.next_line:
            LogProgress.next_line = now + _PROGRESS_EVERY_S
            logger.info("download: {}", self.format_meter(**self.format_dict).rstrip())
        return True


class _Quiet(LogProgress):
    """No progress at all. (The library's default bar would draw on a terminal, over the log.)"""

    def display(self, msg: str | None = None, pos: int | None = None) -> bool:
        return True


def _explain(err: Exception, snapshot: Snapshot) -> str:
    """One line: what the Hub or the cache said, the id, and how to get the model."""
    repo, rev = snapshot.repo_id, snapshot.revision
    reason = _one_line(err)
    cache = snapshot.download_dir or constants.HF_HUB_CACHE
    if isinstance(err, GatedRepoError):
        return (
            f"{repo} is gated on the Hugging Face Hub: {reason}. Ask for access at "
            f"https://huggingface.co/{repo}, then give a token that has it in HF_TOKEN"
        )
    if isinstance(err, RepositoryNotFoundError):
        return (
            f"{repo} is not a local directory, and the Hugging Face Hub has no model "
            f"{repo} that this token may see: {reason}. Check the id; a private model "
            "needs HF_TOKEN"
        )
    if isinstance(err, RevisionNotFoundError):
        return f"{repo} has no revision {rev} on the Hugging Face Hub: {reason}"
    if isinstance(err, IncompleteSnapshotError):
        return f"{repo}: {reason} {_how_to_fetch(snapshot)}"
    if isinstance(err, LocalEntryNotFoundError):
        where = (
            f"{repo} (revision {rev}) is not a local directory and not in the "
            f"Hugging Face cache {cache}"
        )
        if constants.is_offline_mode():
            return f"{where}, and HF_HUB_OFFLINE forbids downloading it. {_how_to_fetch(snapshot)}"
        return (
            f"{where}, and the Hub cannot be reached to download it: {reason}. Check the "
            f"network (HF_ENDPOINT, proxies), or {_hf_download(snapshot)} elsewhere"
        )
    return f"cannot fetch {repo} (revision {rev}) into {cache}: {reason}"


def _how_to_fetch(snapshot: Snapshot) -> str:
    if constants.is_offline_mode():
        return (
            f"Fetch it where the Hub is reachable: {_hf_download(snapshot)}; or unset "
            "HF_HUB_OFFLINE and vdiff downloads it"
        )
    return f"Fetch it again: {_hf_download(snapshot)}"


def _hf_download(snapshot: Snapshot) -> str:
    words = ["hf", "download", str(snapshot.repo_id)]
    if snapshot.revision != constants.DEFAULT_REVISION:
        words += ["--revision", snapshot.revision]
    if snapshot.download_dir:
        words += ["--cache-dir", snapshot.download_dir]
    return "`" + " ".join(words) + "`"


def _one_line(err: Exception) -> str:
    # The Hub's own words where it sent some; else the message without its status line.
    server = getattr(err, "server_message", None)
    lines = [ln.strip() for ln in str(server or err).splitlines() if ln.strip()]
    if not server and len(lines) > 1 and "Client Error" in lines[0]:
        lines = lines[1:]
    return " ".join(" ".join(lines).split()).rstrip(".") or type(err).__name__
