"""Hugging Face ids: resolved by huggingface_hub in a cache built by hand, offline.

Every test runs with the library's offline mode on: nothing here reaches the network. The Hub's
refusals (gated, missing, bad revision) come from real responses fed to the library's own
error parser.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx2
import huggingface_hub
import pytest
import yaml
from huggingface_hub import constants
from huggingface_hub.errors import LocalEntryNotFoundError
from huggingface_hub.utils import filter_repo_objects, hf_raise_for_status
from loguru import logger

from tests.hf_cache import SHARDS, add_snapshot, checkpoint_files, repo_dir, sharded_files
from vdiff_worker import cli
from vdiff_worker.models import CheckpointError, hub, load_model

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = ROOT / "tests" / "data" / "golden"
LLADA_ID = "vdiff-test/llada-tiny"


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """HF_HUB_OFFLINE=1 and HF_HUB_CACHE=tmp/hub, as the library reads them at import."""
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


@pytest.fixture()
def logs() -> Iterator[list[str]]:
    lines: list[str] = []
    sink = logger.add(lambda m: lines.append(str(m).rstrip("\n")), level="INFO", format="{message}")
    yield lines
    logger.remove(sink)


def _one_line(err: pytest.ExceptionInfo[CheckpointError]) -> str:
    message = str(err.value)
    assert "\n" not in message, message
    return message


def test_id_is_served_from_the_cache_under_the_name_typed(offline: Path) -> None:
    commit = add_snapshot(offline, LLADA_ID, checkpoint_files(GOLDEN / "llada-tiny"))
    loaded = load_model(LLADA_ID)
    assert loaded.kind == "llada"
    assert loaded.name == LLADA_ID
    assert Path(loaded.path) == repo_dir(offline, LLADA_ID) / "snapshots" / commit
    assert loaded.max_model_len == 512
    assert loaded.tokenizer.decode(loaded.tokenizer.encode("What is 2 + 3?")) == "What is 2 + 3?"


def test_revision_picks_a_branch_or_a_commit(offline: Path) -> None:
    main = add_snapshot(offline, LLADA_ID, checkpoint_files(GOLDEN / "llada-tiny"))
    v2 = add_snapshot(
        offline,
        LLADA_ID,
        checkpoint_files(GOLDEN / "llada-tiny", max_sequence_length=300),
        refs=("v2",),
    )
    assert load_model(LLADA_ID).max_model_len == 512
    assert load_model(LLADA_ID, revision="v2").max_model_len == 300
    assert load_model(LLADA_ID, revision=v2).max_model_len == 300
    assert load_model(LLADA_ID, revision=main).max_model_len == 512


def test_download_dir_is_the_cache(offline: Path, tmp_path: Path) -> None:
    own = tmp_path / "own-cache"
    add_snapshot(own, LLADA_ID, checkpoint_files(GOLDEN / "llada-tiny"))
    assert load_model(LLADA_ID, download_dir=str(own)).name == LLADA_ID
    with pytest.raises(CheckpointError, match=re.escape(str(offline))):
        load_model(LLADA_ID)  # not in the default cache


def test_local_directory_wins_over_an_id(
    offline: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, logs: list[str]
) -> None:
    shutil.copytree(GOLDEN / "llada-tiny", tmp_path / "vdiff-test" / "llada-tiny")
    monkeypatch.chdir(tmp_path)
    loaded = load_model(LLADA_ID, revision="v2")  # nothing cached: the directory is used
    assert loaded.name == "llada-tiny"  # today's name for a directory
    assert any("--revision v2 applies to Hugging Face ids" in line for line in logs)


def test_offline_and_absent_names_the_id_and_the_way_to_fetch_it(offline: Path) -> None:
    with pytest.raises(CheckpointError) as err:
        load_model("vdiff-test/absent")
    message = _one_line(err)
    assert "vdiff-test/absent (revision main) is not a local directory" in message
    assert str(offline) in message and "HF_HUB_OFFLINE" in message
    assert "`hf download vdiff-test/absent`" in message
    add_snapshot(offline, LLADA_ID, checkpoint_files(GOLDEN / "llada-tiny"))
    with pytest.raises(CheckpointError) as err:
        load_model(LLADA_ID, revision="v9", download_dir=str(offline))
    assert f"`hf download {LLADA_ID} --revision v9 --cache-dir {offline}`" in _one_line(err)


def test_paths_that_are_no_ids_keep_their_message(tmp_path: Path) -> None:
    for spec in (str(tmp_path / "nowhere"), "./nowhere", "a/b/c"):
        with pytest.raises(CheckpointError, match=f"model directory {spec} does not exist"):
            load_model(spec)


def test_half_downloaded_snapshot_names_the_missing_shard(offline: Path, tmp_path: Path) -> None:
    files = sharded_files(GOLDEN / "llada-tiny", tmp_path / "shards")
    del files[SHARDS[1]]  # the interrupted download never linked the second shard
    add_snapshot(offline, LLADA_ID, files)
    with pytest.raises(CheckpointError) as err:
        load_model(LLADA_ID)
    message = _one_line(err)
    assert f"Missing: {SHARDS[1]} (named in model.safetensors.index.json)" in message
    assert "incomplete" in message and f"hf download {LLADA_ID}" in message


def test_sharded_snapshot_loads(offline: Path, tmp_path: Path) -> None:
    add_snapshot(offline, LLADA_ID, sharded_files(GOLDEN / "llada-tiny", tmp_path / "shards"))
    assert load_model(LLADA_ID).kind == "llada"


def test_a_blob_deleted_from_the_cache_is_named(offline: Path) -> None:
    add_snapshot(offline, LLADA_ID, checkpoint_files(GOLDEN / "llada-tiny"))
    snapshot = next((repo_dir(offline, LLADA_ID) / "snapshots").iterdir())
    (snapshot / "tokenizer.json").resolve().unlink()
    with pytest.raises(CheckpointError, match="Missing: tokenizer.json"):
        load_model(LLADA_ID)


def test_pickled_weights_only_are_refused(offline: Path) -> None:
    files = checkpoint_files(GOLDEN / "llada-tiny")
    files["pytorch_model.bin"] = files.pop("model.safetensors")
    add_snapshot(offline, LLADA_ID, files)
    with pytest.raises(CheckpointError, match="no safetensors weights; vdiff never loads .bin"):
        load_model(LLADA_ID)


def test_autoregressive_fallback_by_id(offline: Path) -> None:
    add_snapshot(offline, "vdiff-test/ar-tiny", checkpoint_files(GOLDEN / "ar-tiny"))
    loaded = load_model("vdiff-test/ar-tiny")
    assert loaded.kind == "ar" and loaded.name == "vdiff-test/ar-tiny"


def test_tokenizer_and_verifier_take_ids(offline: Path) -> None:
    add_snapshot(offline, "vdiff-test/tok", checkpoint_files(GOLDEN / "llada-tiny"))
    loaded = load_model(str(GOLDEN / "llada-tiny"), tokenizer_path="vdiff-test/tok")
    assert loaded.tokenizer.encode("2 + 3") == load_model(
        str(GOLDEN / "llada-tiny")
    ).tokenizer.encode("2 + 3")
    with pytest.raises(CheckpointError, match="vdiff-test/absent-tok .* not a local directory"):
        load_model(str(GOLDEN / "llada-tiny"), tokenizer_path="vdiff-test/absent-tok")
    with pytest.raises(CheckpointError, match="tokenizer directory /nowhere does not exist"):
        load_model(str(GOLDEN / "llada-tiny"), tokenizer_path="/nowhere")


class _Recorder:
    """snapshot_download that records its calls and then runs the real one (offline)."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []
        self.real = huggingface_hub.snapshot_download

    def __call__(self, repo_id: str, **kwargs: Any) -> str:
        self.calls.append(kwargs)
        return self.real(repo_id, **kwargs)


def test_config_first_then_only_what_the_architecture_reads(
    offline: Path, monkeypatch: pytest.MonkeyPatch, logs: list[str]
) -> None:
    commit = add_snapshot(offline, LLADA_ID, checkpoint_files(GOLDEN / "llada-tiny"))
    recorder = _Recorder()
    monkeypatch.setattr(huggingface_hub, "snapshot_download", recorder)
    load_model(LLADA_ID, trust_remote_code=True)
    first, second = recorder.calls
    assert first["allow_patterns"] == ["config.json"] and first["revision"] == "main"
    assert second["revision"] == commit  # no second look-up of "main"
    assert "*.safetensors" in second["allow_patterns"]
    assert "*.py" not in second["allow_patterns"]  # native: remote code is not even fetched
    assert first["local_files_only"] is True
    assert first["tqdm_class"] is not hub.LogProgress  # a config is no download to watch
    assert second["tqdm_class"] is hub.LogProgress
    ignored = [line for line in logs if "--trust-remote-code" in line]
    assert len(ignored) == 1 and "llada is built in" in ignored[0]


def test_remote_code_is_fetched_for_the_fallback_only_when_trusted(
    offline: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = checkpoint_files(
        GOLDEN / "ar-tiny", auto_map={"AutoModelForCausalLM": "modeling_tiny.TinyForCausalLM"}
    )
    add_snapshot(offline, "vdiff-test/remote", files)
    recorder = _Recorder()
    monkeypatch.setattr(huggingface_hub, "snapshot_download", recorder)
    load_model("vdiff-test/remote")
    assert "*.py" not in recorder.calls[-1]["allow_patterns"]
    with pytest.raises(CheckpointError):  # no modeling_tiny.py in the cache: transformers fails
        load_model("vdiff-test/remote", trust_remote_code=True)
    assert "*.py" in recorder.calls[-1]["allow_patterns"]


def test_patterns_keep_what_the_loader_reads_and_nothing_else() -> None:
    listing = [  # GSAI-ML/LLaDA-8B-Instruct's files, plus the usual extras of other repos
        ".gitattributes",
        "README.md",
        "config.json",
        "configuration_llada.py",
        "generation_config.json",
        "model-00001-of-00006.safetensors",
        "model-00006-of-00006.safetensors",
        "model.safetensors.index.json",
        "modeling_llada.py",
        "special_tokens_map.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "pytorch_model.bin",
        "pytorch_model.bin.index.json",
        "consolidated.pth",
        "original/consolidated.00.pth",
        "onnx/model.safetensors",
        "chat_template.jinja",
        "tokenizer.model",
        "merges.txt",
        "vocab.json",
        "images/logo.png",
    ]
    kept = set(
        filter_repo_objects(
            listing, allow_patterns=list(hub.MODEL_FILES), ignore_patterns=list(hub.IGNORE)
        )
    )
    assert kept == {
        "config.json",
        "generation_config.json",
        "model-00001-of-00006.safetensors",
        "model-00006-of-00006.safetensors",
        "model.safetensors.index.json",
        "special_tokens_map.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        "tokenizer.model",
        "merges.txt",
        "vocab.json",
    }


def _hub_error(status: int, url: str, **headers: str) -> Exception:
    response = httpx2.Response(status, headers=headers, request=httpx2.Request("GET", url))
    try:
        hf_raise_for_status(response)
    except Exception as exc:  # the library's own parse of the Hub's answer
        return exc
    raise AssertionError("not an error response")


API = "https://huggingface.co/api/models/vdiff-test/llada-tiny/revision/main"


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (
            _hub_error(
                403,
                API,
                **{
                    "X-Error-Code": "GatedRepo",
                    "X-Error-Message": "Access to model vdiff-test/llada-tiny is restricted.",
                },
            ),
            "vdiff-test/llada-tiny is gated on the Hugging Face Hub: Access to model "
            "vdiff-test/llada-tiny is restricted. Ask for access at "
            "https://huggingface.co/vdiff-test/llada-tiny, then give a token that has it in "
            "HF_TOKEN",
        ),
        (
            _hub_error(
                404,
                API,
                **{"X-Error-Code": "RepoNotFound", "X-Error-Message": "Repository not found"},
            ),
            "the Hugging Face Hub has no model vdiff-test/llada-tiny that this token may see: "
            "Repository not found. Check the id; a private model needs HF_TOKEN",
        ),
        (
            _hub_error(
                404,
                API,
                **{"X-Error-Code": "RevisionNotFound", "X-Error-Message": "Invalid rev id: v9"},
            ),
            "vdiff-test/llada-tiny has no revision main on the Hugging Face Hub: Invalid rev "
            "id: v9",
        ),
        (
            LocalEntryNotFoundError(
                "Got: ConnectError: [Errno -2] Name or service not known\n"
                "An error happened while trying to locate the files on the Hub"
            ),
            "and the Hub cannot be reached to download it: Got: ConnectError",
        ),
        (
            PermissionError(13, "Permission denied"),
            "cannot fetch vdiff-test/llada-tiny (revision main) into",
        ),
    ],
)
def test_hub_refusals_are_one_line_with_the_hubs_reason(
    error: Exception, expected: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)

    def refuse(repo_id: str, **kwargs: Any) -> str:
        raise error

    monkeypatch.setattr(huggingface_hub, "snapshot_download", refuse)
    with pytest.raises(CheckpointError) as err:
        load_model(LLADA_ID)
    assert expected in _one_line(err)


def test_download_progress_is_logged(logs: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    hub.LogProgress.reset()
    bar = hub.LogProgress(
        total=2_000_000,
        desc="Downloading bytes",
        unit="B",
        unit_scale=True,
        name="huggingface_hub.snapshot_download",
    )
    bar.update(500_000)
    bar.refresh()  # within the first interval: a quick download says nothing
    assert not logs and hub.LogProgress.moved
    monkeypatch.setattr(hub, "_PROGRESS_EVERY_S", 0.0)
    hub.LogProgress.reset()
    bar.update(500_000)
    bar.refresh()
    files = hub.LogProgress(total=3, desc="Fetching 3 files")
    files.refresh()  # has not moved: silent
    bar.close()  # closing adds nothing (the library's byte bars close whenever GC runs)
    files.close()
    assert logs and all(
        line.startswith("download: Downloading bytes:  50%|#####     | 1.00M/2.00M [")
        for line in logs
    ), logs


def test_flags_and_environment_twins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VDIFF_REVISION", "v2")
    monkeypatch.setenv("VDIFF_DOWNLOAD_DIR", "/cache")
    args = cli.build_parser().parse_args(["--model", LLADA_ID])
    assert (args.model, args.revision, args.download_dir) == (LLADA_ID, "v2", "/cache")
    args = cli.build_parser().parse_args(["--revision", "abc", "--download-dir", "/other"])
    assert (args.revision, args.download_dir) == ("abc", "/other")


def test_kubernetes_job_fills_the_cache_the_worker_reads() -> None:
    """The download Job fetches exactly the files a worker resolves, where it resolves them."""
    docs = {
        d["kind"]: d
        for path in ("models.yaml", "worker.yaml")
        for d in yaml.safe_load_all((ROOT / "deploy" / "kubernetes" / path).read_text())
    }
    job = docs["Job"]["spec"]["template"]["spec"]["containers"][0]
    worker = docs["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    command, args = job["command"], job["args"]

    def values(flag: str, argv: list[str]) -> list[str]:
        return [argv[i + 1] for i, a in enumerate(argv) if a == flag]

    assert command[:2] == ["hf", "download"]
    assert set(values("--include", args)) == set(hub.MODEL_FILES)
    assert values("--exclude", args) == list(hub.IGNORE)
    flags = dict(a.removeprefix("--").split("=", 1) for a in worker["args"])
    assert flags["model"] == command[2]
    assert values("--cache-dir", args) == [flags["download-dir"]]
    assert {"name": "HF_HUB_OFFLINE", "value": "1"} in worker["env"]


class _FakeHub(BaseHTTPRequestHandler):
    """The few Hub routes a snapshot download uses, for one repository on 127.0.0.1."""

    repo = "vdiff-test/online"
    commit = "0123456789abcdef0123456789abcdef01234567"
    files: dict[str, bytes] = {}
    fetched: list[str] = []

    def _send(self, status: int, body: bytes, **headers: str) -> None:
        self.send_response(status)
        for name, value in {"Content-Length": str(len(body)), **headers}.items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        path = urlsplit(self.path).path
        api = f"/api/models/{self.repo}"
        resolve = f"/{self.repo}/resolve/{self.commit}/"
        if path == f"{api}/revision/main":
            self._send(200, json.dumps({"id": self.repo, "sha": self.commit}).encode())
        elif path.startswith(f"{api}/tree/{self.commit}"):
            tree = [
                {
                    "type": "file",
                    "path": name,
                    "size": len(data),
                    "oid": hashlib.sha1(data).hexdigest(),
                }
                for name, data in self.files.items()
            ]
            self._send(200, json.dumps(tree).encode())
        elif path.startswith(resolve) and path[len(resolve) :] in self.files:
            name = path[len(resolve) :]
            if self.command == "GET":
                self.fetched.append(name)
            etag = f'"{hashlib.sha1(self.files[name]).hexdigest()}"'
            self._send(200, self.files[name], ETag=etag, **{"X-Repo-Commit": self.commit})
        else:
            self._send(
                404,
                b"",
                **{"X-Error-Code": "RepoNotFound", "X-Error-Message": "Repository not found"},
            )

    do_HEAD = do_GET

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture()
def fake_hub(monkeypatch: pytest.MonkeyPatch) -> Iterator[type[_FakeHub]]:
    files = checkpoint_files(GOLDEN / "llada-tiny")
    files |= {
        "pytorch_model.bin": b"pickle",
        "modeling_llada.py": b"raise SystemExit",
        "onnx/model.safetensors": b"other format",
        "README.md": b"# llada-tiny",
    }
    _FakeHub.files, _FakeHub.fetched = files, []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(
        constants,
        "HUGGINGFACE_CO_URL_TEMPLATE",
        endpoint + "/{repo_id}/resolve/{revision}/{filename}",
    )
    yield _FakeHub
    server.shutdown()


def test_download_fetches_only_what_the_loader_reads(
    fake_hub: type[_FakeHub], offline: Path, logs: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Online (a Hub on loopback): config first, then the rest, never pickles or code."""
    loaded = load_model(fake_hub.repo, trust_remote_code=True)
    assert loaded.name == fake_hub.repo and loaded.kind == "llada"
    assert fake_hub.fetched[0] == "config.json"
    assert set(fake_hub.fetched) == set(checkpoint_files(GOLDEN / "llada-tiny"))
    assert any(line.startswith(f"downloaded {fake_hub.repo} in ") for line in logs), logs
    # Then offline, from the cache the download filled.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    fake_hub.fetched.clear()
    assert load_model(fake_hub.repo).name == fake_hub.repo and not fake_hub.fetched
    with pytest.raises(CheckpointError, match="the Hugging Face Hub has no model vdiff-test/x"):
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        load_model("vdiff-test/x")


def test_tokenizer_revision_picks_the_tokenizer_snapshot(offline: Path) -> None:
    files = checkpoint_files(GOLDEN / "llada-tiny")
    add_snapshot(offline, "vdiff-test/tok", files)
    config = json.loads(files["tokenizer_config.json"]) | {"chat_template": "v2:{{ messages }}"}
    add_snapshot(
        offline,
        "vdiff-test/tok",
        files | {"tokenizer_config.json": json.dumps(config).encode()},
        refs=("v2",),
    )
    model = str(GOLDEN / "llada-tiny")
    chat = [{"role": "user", "content": "hi"}]
    main = load_model(model, tokenizer_path="vdiff-test/tok").tokenizer
    v2 = load_model(model, tokenizer_path="vdiff-test/tok", tokenizer_revision="v2").tokenizer
    assert main.apply_chat_template(chat) != v2.apply_chat_template(chat)
    assert v2.decode(v2.apply_chat_template(chat)).startswith("v2:")
    # Without --tokenizer, the model id's own tokenizer at that revision (vLLM's reading).
    add_snapshot(offline, LLADA_ID, files)
    add_snapshot(
        offline,
        LLADA_ID,
        files | {"tokenizer_config.json": json.dumps(config).encode()},
        refs=("v2",),
    )
    own = load_model(LLADA_ID, tokenizer_revision="v2").tokenizer
    assert own.decode(own.apply_chat_template(chat)).startswith("v2:")
    assert cli.build_parser().parse_args(["--tokenizer-revision", "v2"]).tokenizer_revision == "v2"
