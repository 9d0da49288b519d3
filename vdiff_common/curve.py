"""CURVE keys for the gateway-worker link: layout of a key directory, generation, loading.

    DIR/gateway.key          the gateway's public key (every worker needs it)
    DIR/gateway.key_secret   the gateway's keypair (the gateway only)
    DIR/worker.key_secret    a worker's keypair (each worker: its own, under this name)
    DIR/authorized/*.key     the worker public keys the gateway admits

`vdiff keys generate DIR` makes all of it; `--worker NAME` adds a keypair NAME.key_secret
(copy it to that worker's directory as worker.key_secret) and authorizes NAME.key.
"""

from __future__ import annotations

import argparse
import shutil
from dataclasses import dataclass
from pathlib import Path

import zmq.auth

GATEWAY = "gateway"
WORKER = "worker"
AUTHORIZED = "authorized"


@dataclass(frozen=True)
class Keys:
    """Our keypair, and for a client the server's public key."""

    public: bytes
    secret: bytes
    server: bytes | None = None


def _load(path: Path, secret: bool) -> tuple[bytes, bytes | None]:
    if not path.is_file():
        raise ValueError(
            f"--zmq-curve-dir: {path} is missing (make keys with "
            f"`vdiff keys generate {path.parent}`)"
        )
    try:
        public, private = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as err:
        raise ValueError(f"--zmq-curve-dir: {path} is not a CURVE key file: {err}") from None
    if secret and private is None:
        raise ValueError(f"--zmq-curve-dir: {path} holds no secret key")
    return public, private


def server_keys(directory: str) -> tuple[Keys, Path]:
    """The gateway's keypair and the directory of admitted worker keys."""
    root = Path(directory)
    public, secret = _load(root / f"{GATEWAY}.key_secret", secret=True)
    assert secret is not None
    authorized = root / AUTHORIZED
    if not authorized.is_dir() or not any(authorized.glob("*.key")):
        raise ValueError(f"--zmq-curve-dir: {authorized} holds no worker public keys (*.key)")
    return Keys(public, secret), authorized


def client_keys(directory: str) -> Keys:
    """A worker's keypair and the gateway's public key."""
    root = Path(directory)
    public, secret = _load(root / f"{WORKER}.key_secret", secret=True)
    server, _ = _load(root / f"{GATEWAY}.key", secret=False)
    assert secret is not None
    return Keys(public, secret, server)


def generate(directory: Path, workers: list[str]) -> list[Path]:
    """Make what is missing: the gateway's keypair, and each worker's, authorized."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / AUTHORIZED).mkdir(exist_ok=True)
    made = []
    for name in [GATEWAY, *workers]:
        if not (directory / f"{name}.key_secret").exists():
            public, secret = zmq.auth.create_certificates(directory, name)
            Path(secret).chmod(0o600)
            made += [Path(public), Path(secret)]
        if name != GATEWAY:
            allowed = directory / AUTHORIZED / f"{name}.key"
            shutil.copyfile(directory / f"{name}.key", allowed)
            made.append(allowed)
    return made


def keys_main(argv: list[str]) -> int:
    """`vdiff keys generate DIR [--worker NAME ...]`."""
    p = argparse.ArgumentParser(
        prog="vdiff keys", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="make the gateway's and workers' CURVE keys")
    g.add_argument("directory", type=Path)
    g.add_argument(
        "--worker",
        action="append",
        default=[],
        help=f"worker keypair to make and authorize (default: {WORKER})",
    )
    args = p.parse_args(argv)
    for path in generate(args.directory, args.worker or [WORKER]):
        print(path)
    return 0
