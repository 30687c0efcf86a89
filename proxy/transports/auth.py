"""Who may reach an agent's memory: bearer tokens, each bound to the scopes it may touch.

Optional. Without a tokens file the Memory service trusts whoever can reach its port, which is right for a sidecar
listening on loopback (only the agent's own pod reaches it). Where several agents share one proxy, each gets a token:
every Memory call then needs `authorization: Bearer <token>` (UNAUTHENTICATED without a known one) and may touch only
the scopes its token names (PERMISSION_DENIED otherwise, naming the scope).

The tokens file, one grant a line (`#` starts a comment):

    <token> <scope>[,<scope>...]

A scope ending in `*` is a prefix (`team-a/*` covers `team-a/alice`); `*` alone is every scope. Tokens are kept only
as SHA-256 digests, looked up by the digest of the token presented; no token is ever logged or echoed. The file is
read again when it changes (checked at most once a second), so a Kubernetes Secret can rotate tokens without a
restart.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from adapters.errors import NoCredential, NotGranted, TokensFileError

log = logging.getLogger("memshift.auth")
_RECHECK_SECONDS = 1.0


@dataclass(frozen=True, slots=True)
class Grant:
    exact: frozenset[str]
    prefixes: tuple[str, ...]

    def allows(self, scope: str) -> bool:
        return scope in self.exact or any(scope.startswith(p) for p in self.prefixes)


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def parse(text: str, where: str) -> dict[bytes, Grant]:
    grants: dict[bytes, Grant] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2:
            raise TokensFileError(f"{where}:{number}: expected '<token> <scope>[,<scope>...]'")
        token, scopes = parts
        if len(token) < 16:
            raise TokensFileError(f"{where}:{number}: the token is {len(token)} characters; use at least 16")
        names = [s for s in scopes.split(",") if s]
        if not names:
            raise TokensFileError(f"{where}:{number}: names no scope")
        digest = _digest(token)
        if digest in grants:
            raise TokensFileError(f"{where}:{number}: the same token is granted twice; put its scopes on one line")
        grants[digest] = Grant(frozenset(n for n in names if not n.endswith("*")),
                               tuple(n[:-1] for n in names if n.endswith("*")))
    if not grants:
        raise TokensFileError(f"{where}: grants no token; without tokens, leave memory_tokens_file unset")
    return grants


class ScopeTokens:
    """The grants of a tokens file, reloaded when the file changes."""

    def __init__(self, path: str) -> None:
        self._path = Path(path)
        self._stamp: tuple[int, int] = (-1, -1)
        self._checked = 0.0
        self._grants: dict[bytes, Grant] = {}
        self._load()

    def _load(self) -> None:
        try:
            stat = os.stat(self._path)
            stamp = (stat.st_mtime_ns, stat.st_size)
            if stamp == self._stamp:
                return
            grants = parse(self._path.read_text(encoding="utf-8"), str(self._path))
        except OSError as exc:
            raise TokensFileError(f"{self._path}: cannot read the tokens file ({exc.strerror})") from None
        self._grants, self._stamp = grants, stamp
        log.info("memory tokens loaded", extra={"tokens_file": str(self._path), "tokens": len(grants)})

    def _fresh(self) -> dict[bytes, Grant]:
        now = time.monotonic()
        if now - self._checked >= _RECHECK_SECONDS:
            self._checked = now
            try:
                self._load()
            except TokensFileError as exc:  # a bad edit keeps the last good grants in force
                log.error("memory tokens file not reloaded; the previous grants stay", extra={"error": str(exc)})
        return self._grants

    def check(self, authorization: str | None, scope: str) -> None:
        """Raises NoCredential (no known bearer token) or NotGranted (the token may not touch `scope`)."""
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise NoCredential("memory calls need metadata 'authorization: Bearer <token>' (a token from the "
                                  "proxy's memory_tokens_file)")
        # Looked up by the token's SHA-256: how long a dictionary lookup of a digest takes tells nothing usable about
        # the token, so no constant-time scan over every grant is needed.
        grant = self._fresh().get(_digest(token.strip()))
        if grant is None:
            raise NoCredential("the bearer token is not one this proxy knows")
        if not grant.allows(scope):
            raise NotGranted(f"scope: this token may not touch scope {scope[:128]!r}")
