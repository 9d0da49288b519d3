"""API keys: loaded from flags, the environment or a file; checked in constant time."""

from __future__ import annotations

import hashlib
import hmac
from pathlib import Path


def fingerprint(key: str) -> str:
    """A short, non-reversible name for a key: what logs and rate-limit buckets see."""
    return hashlib.sha256(key.encode()).hexdigest()[:12]


class APIKeys:
    def __init__(self, keys: list[str]) -> None:
        self._keys = [k.encode() for k in keys]
        self._names = [fingerprint(k) for k in keys]

    @classmethod
    def load(cls, keys: list[str], files: list[str]) -> APIKeys:
        """Keys from `--api-key`/VDIFF_API_KEY plus `--api-key-file` files (one per line;
        blank lines and lines starting with '#' are skipped). Raises ValueError."""
        out = [k.strip() for k in keys if k.strip()]
        for name in files:
            try:
                text = Path(name).read_text(encoding="utf-8")
            except OSError as err:
                raise ValueError(f"--api-key-file {name}: {err.strerror}") from None
            found = [
                line.strip()
                for line in text.splitlines()
                if line.strip() and not line.strip().startswith("#")
            ]
            if not found:
                raise ValueError(f"--api-key-file {name} holds no keys")
            out += found
        return cls(out)

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def check(self, authorization: str | None) -> str | None:
        """The fingerprint of the key in an `Authorization: Bearer` header, or None.

        Every configured key is compared, whatever matches, so timing says nothing about
        which key (or how much of one) was right.
        """
        scheme, _, token = (authorization or "").partition(" ")
        given = token.strip().encode() if scheme.lower() == "bearer" else b""
        found: str | None = None
        for key, name in zip(self._keys, self._names):
            if hmac.compare_digest(key, given) and given:
                found = name
        return found
