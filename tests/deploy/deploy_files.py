"""The repository's deployment files and the commands they run.

Shared by test_drift.py (part of `make test`) and validate_manifests.py (`make lint-deploy`).
Needs only PyYAML.
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
MANIFESTS = ROOT / "deploy"
CONTAINERS = ROOT / "containers"
COMPOSE = CONTAINERS / "docker-compose.yaml"
COMPOSE_ENV = CONTAINERS / ".env"

# Kinds whose pod template sits at spec.template.spec.
WORKLOADS = {"Deployment", "StatefulSet", "DaemonSet", "Job", "ReplicaSet"}
_INTERPOLATION = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def manifest_files() -> list[Path]:
    return sorted(MANIFESTS.rglob("*.yaml"))


def dockerfiles() -> list[Path]:
    return sorted(p for p in CONTAINERS.glob("Dockerfile.*") if p.suffix != ".dockerignore")


def load_documents(path: Path) -> list[dict[str, Any]]:
    """The YAML documents of a file (empty documents dropped)."""
    with path.open(encoding="utf-8") as f:
        return [doc for doc in yaml.safe_load_all(f) if doc is not None]


def resources() -> list[tuple[Path, dict[str, Any]]]:
    """Every document of every file under deploy/, with its file."""
    return [(path, doc) for path in manifest_files() for doc in load_documents(path)]


def describe(doc: dict[str, Any]) -> str:
    return f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"


def pod_spec(doc: dict[str, Any]) -> dict[str, Any] | None:
    """The pod spec a resource runs: a workload's template, or a ServingRuntime's spec."""
    if doc.get("kind") in WORKLOADS:
        spec: dict[str, Any] = doc["spec"]["template"]["spec"]
        return spec
    if doc.get("kind") == "ServingRuntime":
        runtime: dict[str, Any] = doc["spec"]
        return runtime
    return None


# ---- Dockerfiles ---------------------------------------------------------------------------
@dataclass
class Dockerfile:
    path: Path
    title: str  # org.opencontainers.image.title: the image name the manifests use
    entrypoint: list[str]
    cmd: list[str]
    env: dict[str, str]  # ENV of the final stage and the stages it is built FROM


def _instructions(text: str) -> list[tuple[str, str]]:
    lines: list[str] = []
    for raw in text.splitlines():
        if raw.lstrip().startswith("#"):
            continue
        if lines and lines[-1].endswith("\\"):
            lines[-1] = lines[-1][:-1] + " " + raw.strip()
        else:
            lines.append(raw.strip())
    out = []
    for line in lines:
        if line:
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _exec_form(path: Path, word: str, rest: str) -> list[str]:
    try:
        value = json.loads(rest)
    except json.JSONDecodeError:
        value = None
    if not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
        raise ValueError(
            f"{rel(path)}: {word} must use the exec form (a JSON list), "
            f"so that signals reach the server: {rest}"
        )
    return value


def parse_dockerfile(path: Path) -> Dockerfile:
    stages: dict[str, tuple[str, dict[str, str]]] = {}  # alias -> (parent, own ENV)
    env: dict[str, str] = {}
    current = ""
    entrypoint: list[str] = []
    cmd: list[str] = []
    labels: dict[str, str] = {}
    for word, rest in _instructions(path.read_text(encoding="utf-8")):
        if word == "FROM":
            parts = rest.split()
            env = {}
            current = parts[2] if len(parts) == 3 and parts[1].upper() == "AS" else ""
            stages[current] = (parts[0], env)
        elif word in ("ENV", "LABEL"):
            target = env if word == "ENV" else labels
            for item in shlex.split(rest):
                key, _, value = item.partition("=")
                target[key] = value
        elif word == "ENTRYPOINT":
            entrypoint = _exec_form(path, word, rest)
        elif word == "CMD":
            cmd = _exec_form(path, word, rest)
    merged: dict[str, str] = {}
    chain: list[dict[str, str]] = []
    stage = current
    while stage in stages and not any(own is stages[stage][1] for own in chain):
        chain.append(stages[stage][1])
        stage = stages[stage][0]
    for own in reversed(chain):
        merged.update(own)
    title = labels.get("org.opencontainers.image.title", "")
    if not title:
        raise ValueError(f"{rel(path)}: no org.opencontainers.image.title label")
    return Dockerfile(path, title, entrypoint, cmd, merged)


def image_name(image: str) -> str:
    """`registry/org/vdiff-worker:tag` -> `vdiff-worker`."""
    return image.rsplit("/", 1)[-1].split("@", 1)[0].split(":", 1)[0]


# ---- compose -------------------------------------------------------------------------------
def compose_env() -> dict[str, str]:
    """The variables containers/.env sets for compose's interpolation."""
    out = {}
    for line in COMPOSE_ENV.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip()
    return out


def interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's ${VAR}, ${VAR:-default}, ${VAR-default} and ${VAR:?error}, from containers/.env."""

    def one(m: re.Match[str]) -> str:
        name, op, default = m.group(1), m.group(2), m.group(3) or ""
        if name in env and (env[name] or op not in (":-", ":?")):
            return env[name]
        return default if op in (":-", "-") else ""

    return _INTERPOLATION.sub(one, value)


def interpolated_names(text: str) -> set[str]:
    return {m.group(1) for m in _INTERPOLATION.finditer(text)}


# ---- what runs -----------------------------------------------------------------------------
@dataclass
class Invocation:
    """One command a deployment file runs: a container, a compose service, an image."""

    where: str
    program: str  # "vdiff-api", "vdiff-worker", "vdiff", or another tool ("hf")
    args: list[str]
    # Environment the program sees: the image's ENV, then the file's own. None: the value
    # comes from elsewhere (a Secret, a field reference).
    env: dict[str, str | None] = field(default_factory=dict)


def _k8s_env(container: dict[str, Any]) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for item in container.get("env", []):
        out[item["name"]] = str(item["value"]) if "value" in item else None
    return out


def invocations() -> list[Invocation]:
    images = {d.title: d for d in map(parse_dockerfile, dockerfiles())}
    by_path = {d.path: d for d in images.values()}
    found: list[Invocation] = []

    def run(
        where: str,
        image: Dockerfile | None,
        command: list[str] | None,
        args: list[str] | None,
        env: dict[str, str | None],
    ) -> None:
        # As a container runtime does: a command replaces the ENTRYPOINT; args replace CMD.
        base = image.entrypoint if image else []
        argv = (
            list(command)
            if command
            else [*base, *(args if args is not None else (image.cmd if image else []))]
        )
        if command and args:
            argv += args
        if not argv:
            raise ValueError(f"{where}: runs nothing known (no command, unknown image)")
        merged: dict[str, str | None] = dict(image.env) if image else {}
        merged.update(env)
        found.append(Invocation(where, argv[0], argv[1:], merged))

    for d in images.values():
        run(rel(d.path), d, None, None, {})

    runtimes: dict[str, Dockerfile | None] = {}
    for path, doc in resources():
        spec = pod_spec(doc)
        if spec is None:
            continue
        for c in [*spec.get("initContainers", []), *spec["containers"]]:
            image = images.get(image_name(c.get("image", "")))
            if doc["kind"] == "ServingRuntime" and c["name"] == "kserve-container":
                runtimes[doc["metadata"]["name"]] = image
            run(
                f"{rel(path)}: {describe(doc)} container {c['name']}",
                image,
                c.get("command"),
                c.get("args"),
                _k8s_env(c),
            )
    for path, doc in resources():
        if doc.get("kind") != "InferenceService":
            continue
        model = doc["spec"]["predictor"].get("model", {})
        if model.get("args") or model.get("command") or model.get("env"):
            # KServe merges these into the runtime's kserve-container.
            run(
                f"{rel(path)}: {describe(doc)} model",
                runtimes.get(model.get("runtime", "")),
                model.get("command"),
                model.get("args"),
                _k8s_env(model),
            )

    variables = compose_env()
    compose = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    for name, service in compose["services"].items():
        build = service.get("build", {})
        image = (
            by_path.get((COMPOSE.parent / build["context"] / build["dockerfile"]).resolve())
            if build
            else images.get(image_name(service.get("image", "")))
        )

        def words(value: str | list[str] | None) -> list[str] | None:
            if value is None:
                return None
            items = shlex.split(value) if isinstance(value, str) else value
            return [interpolate(str(v), variables) for v in items]

        environment = service.get("environment", {})
        if isinstance(environment, list):
            environment = dict(item.partition("=")[::2] for item in environment)
        env: dict[str, str | None] = {
            k: None if v is None else interpolate(str(v), variables) for k, v in environment.items()
        }
        run(
            f"{rel(COMPOSE)}: service {name}",
            image,
            words(service.get("entrypoint")),
            words(service.get("command")),
            env,
        )
    return found
