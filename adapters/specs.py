"""Store and control specs: one URL-like string names a store; it is read here, once, into a typed `StoreSpec`.

    sqlite:///relative/path.db   sqlite:////absolute/path.db   sqlite:///:memory:
    postgresql://user@host:5432/db?schema=memshift&password_file=/run/secrets/pg
    qdrant+local:///path/to/dir   qdrant+local:///:memory:   qdrant://host:6333?api_key_file=PATH   qdrants://host
    qdrant+edge:///path/to/dir   (Qdrant's embeddable engine, qdrant-edge-py)
    bolt://user@host:7687/database?prefix=Memshift&password_file=PATH   (also neo4j://, bolt+s://, neo4j+s://)
    hybrid:?graph=bolt://host:7687&vectors=qdrant://host:6333
    chroma+local:///path/to/dir   chroma://host:8000?tenant=T&database=D&prefix=P&token_file=PATH   chromas://host

Everything about a spec lives here: the one reading of its parts (`_lex`), which of them are secrets (`secret_param`),
the typed value adapters are built from (`parse`), where a secret comes from and the one place it is read
(`Secret.read`, `read_secret_file`), and how a spec is shown without its secrets (`redact`, and `scrub` for specs
inside free text). A spec that cannot be used is a `StoreSpecError` naming the part to fix, the spec shown redacted.

A secret is the userinfo's password (or a user alone, in a URL with no scheme), and the value of any query parameter
whose name says it holds one (`password`, `api_key`, `token`, `secret`, ...); `*_file` parameters name files, not
secrets, and stay visible. Nested specs (the hybrid store's `graph=` and `vectors=`, plain or percent-encoded) are
read and redacted the same way.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import unquote

from adapters.errors import StoreSpecError

# Scheme -> the kind of store it names.
KINDS: Mapping[str, str] = {
    "sqlite": "sqlite",
    **dict.fromkeys(("postgresql", "postgres"), "postgresql"),
    **dict.fromkeys(("qdrant+local", "qdrant", "qdrants"), "qdrant"),
    "qdrant+edge": "qdrant-edge",
    **dict.fromkeys(("bolt", "bolt+s", "bolt+ssc", "neo4j", "neo4j+s", "neo4j+ssc"), "neo4j"),
    "hybrid": "hybrid",
    **dict.fromkeys(("chroma+local", "chroma", "chromas"), "chroma"),
}
LOCAL_SCHEMES = frozenset({"sqlite", "qdrant+local", "qdrant+edge", "chroma+local"})  # a path, not a server
# The environment variable a store's secret comes from when the spec names none.
SECRET_ENV: Mapping[str, str] = {"postgresql": "PGPASSWORD", "neo4j": "NEO4J_PASSWORD", "qdrant": "QDRANT_API_KEY",
                                 "chroma": "CHROMA_TOKEN"}
_SECRET_FILES = ("password_file", "api_key_file", "token_file")

HIDDEN = "***"
_UNREADABLE = "<store spec that cannot be read; redacted>"
_SECRET_NAMES = re.compile(r"pass|pwd|secret|token|api.?key|apikey|access.?key|auth|credential|^key$|signature",
                           re.IGNORECASE)
_TRAILER = re.compile(r"^[^'\"`,;)\]>]*(.*)$", re.DOTALL)
# A spec inside free text: scheme:// (or percent-encoded, or hybrid:?...), or a bare user:password@host.
_SPECLIKE = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:(?://|%2[Ff]%2[Ff]|\?)\S*|[^\s:@/'\"]+:[^\s@/]+@\S+")


def secret_param(name: str) -> bool:
    """Whether a query parameter of this name holds a secret."""
    name = unquote(name)
    return bool(_SECRET_NAMES.search(name)) and not name.lower().endswith("file")


# --- the one reading of a spec's parts --------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class _Lexed:
    scheme: str
    authority: str | None  # between "//" and the path; None for a spec with none (hybrid:?..., a bare path)
    path: str
    query: tuple[tuple[str, str, str], ...]  # (name, "=" or "", value), raw
    has_query: bool
    fragment: str | None


def _pairs(query: str) -> tuple[tuple[str, str, str], ...]:
    return tuple((name, eq, value) for name, eq, value in (p.partition("=") for p in query.split("&")))


def _lex(text: str) -> _Lexed:
    """`text` cut into scheme, authority, path, query and fragment, by the same rules whether it is then parsed
    strictly or only redacted. Never raises."""
    sep, ask = text.find("://"), text.find("?")
    if ask >= 0 and (sep < 0 or ask < sep):  # no authority before the query: hybrid:?graph=...&vectors=...
        return _Lexed(text[:ask].rstrip(":"), None, "", _pairs(text[ask + 1:]), True, None)
    if sep < 0:
        return _Lexed("", None, text, (), False, None)
    scheme, rest = text[:sep], text[sep + 3:]
    ends = [i for i in (rest.find("/"), rest.find("?"), rest.find("#")) if i >= 0]
    end = min(ends) if ends else len(rest)
    authority, tail = rest[:end], rest[end:]
    tail, hash_, fragment = tail.partition("#")
    path, q, query = tail.partition("?")
    return _Lexed(scheme, authority, path, _pairs(query) if q else (), bool(q), fragment if hash_ else None)


# --- the typed value ------------------------------------------------------------------------------------------------
def read_secret_file(path: str) -> str:
    """The secret a file holds (stripped): the one place Memshift reads one. OSError when it cannot be read."""
    with open(path, encoding="utf-8") as f:
        return f.read().strip()


@dataclass(frozen=True, slots=True)
class Secret:
    """Where a store's secret comes from: written in the spec, a file it names, or the environment."""

    value: str = field(default="", repr=False)
    file: str = ""  # the `*_file` option
    env: str = ""  # the variable consulted when the spec names neither

    def read(self) -> str:
        """The secret ("" when there is none). A file that cannot be read is a StoreSpecError naming the file."""
        if self.value:
            return self.value
        if self.file:
            try:
                return read_secret_file(self.file)
            except OSError as exc:
                raise StoreSpecError(f"cannot read the secret file {self.file}: {exc.strerror or exc}") from None
        return os.environ.get(self.env, "") if self.env else ""


@dataclass(frozen=True, slots=True)
class StoreSpec:
    """A store spec, read. `path` is a local store's file or directory (":memory:" included) or a server's
    database; `options` are the query's parameters, secrets and secret files left out (those are in `secret`)."""

    text: str = field(repr=False)
    scheme: str
    kind: str
    host: str = ""
    port: int | None = None
    user: str = ""
    path: str = ""
    options: Mapping[str, str] = field(default_factory=dict)
    secret: Secret = field(default_factory=Secret)
    parts: Mapping[str, StoreSpec] = field(default_factory=dict)  # the hybrid store's graph and vectors

    @property
    def local(self) -> bool:
        return self.scheme in LOCAL_SCHEMES

    @property
    def shown(self) -> str:
        return redact(self.text)

    def problem(self, what: str) -> StoreSpecError:
        """The error for a part of this spec that cannot be used, naming it."""
        return StoreSpecError(f"store spec {self.shown}: {what}")


def parse(text: str) -> StoreSpec:
    """`text` read into a StoreSpec, or a StoreSpecError naming the part that is wrong (the spec shown redacted)."""
    shown = redact(text)
    lexed = _lex(text)
    if not lexed.scheme:
        raise StoreSpecError(f"store spec {shown!r} has no scheme; e.g. sqlite:///./data/memory.db")
    kind = KINDS.get(lexed.scheme)
    if kind is None:
        raise StoreSpecError(f"store spec {shown}: unknown scheme {lexed.scheme!r}; supported: sqlite, postgresql, "
                             "qdrant+local, qdrant+edge, qdrant, qdrants, bolt, neo4j (and their +s forms), hybrid, "
                             "chroma+local, chroma, chromas")
    if kind == "hybrid":
        return _hybrid(text, lexed, shown)
    if lexed.authority is None:
        raise StoreSpecError(f"store spec {shown}: expected {lexed.scheme}://...")
    options: dict[str, str] = {}
    value, file = "", ""
    for name, eq, raw in lexed.query:
        if not name:
            continue
        name, raw = unquote(name), unquote(raw)
        if secret_param(name):
            value = value or raw
        elif name in _SECRET_FILES:
            file = raw
        else:
            options[name] = raw if eq else ""
    if lexed.scheme in LOCAL_SCHEMES:
        if lexed.authority:
            raise StoreSpecError(f"store spec {shown}: a local store takes a path, not a host "
                                 f"({lexed.scheme}:///relative or {lexed.scheme}:////absolute)")
        path = lexed.path[1:] if lexed.path.startswith("/") else lexed.path
        if not path:
            raise StoreSpecError(f"store spec {shown}: the path is missing ({lexed.scheme}:///path)")
        return StoreSpec(text, lexed.scheme, kind, path=unquote(path), options=options,
                         secret=Secret(value, file, SECRET_ENV.get(kind, "")))
    userinfo, at, hostport = lexed.authority.rpartition("@")
    user, _, password = userinfo.partition(":") if at else ("", "", "")
    host, port = _address(hostport, shown)
    return StoreSpec(text, lexed.scheme, kind, host=host, port=port, user=unquote(user),
                     path=unquote(lexed.path.strip("/")), options=options,
                     secret=Secret(unquote(password) or value, file, SECRET_ENV.get(kind, "")))


def _address(hostport: str, shown: str) -> tuple[str, int | None]:
    if hostport.startswith("["):  # [v6] or [v6]:port
        close = hostport.find("]")
        if close < 0:
            raise StoreSpecError(f"store spec {shown}: an IPv6 address needs its closing ']'")
        host, port = hostport[1:close], hostport[close + 1:].removeprefix(":")
        colon = hostport[close + 1:].startswith(":")
    else:
        host, colon_s, port = hostport.rpartition(":")
        colon = bool(colon_s)
        if not colon:
            host, port = hostport, ""
    if colon and not (port.isdigit() and 1 <= int(port) <= 65535):
        raise StoreSpecError(f"store spec {shown}: port {port!r} is not a number from 1 to 65535")
    if colon and not host:
        raise StoreSpecError(f"store spec {shown}: the host is missing before port {port}")
    return unquote(host), int(port) if colon else None


def _hybrid(text: str, lexed: _Lexed, shown: str) -> StoreSpec:
    # The values are store specs themselves: `+` stays `+`, their own `?` stays theirs; an `&` inside one is `%26`.
    given = {name: unquote(value) for name, _, value in lexed.query if name}
    graph, vectors = given.get("graph", ""), given.get("vectors", "")
    # The messages name only the scheme: a spec may carry a password.
    if KINDS.get(graph.partition(":")[0]) != "neo4j":
        raise StoreSpecError(f"store spec {shown}: graph= needs a Neo4j spec (bolt://, neo4j://), got "
                             f"{graph.partition(':')[0]!r}")
    if KINDS.get(vectors.partition(":")[0]) != "qdrant":
        raise StoreSpecError(f"store spec {shown}: vectors= needs a Qdrant spec (qdrant://, qdrant+local://), got "
                             f"{vectors.partition(':')[0]!r}")
    parts: dict[str, StoreSpec] = {}
    for name, part in (("graph", graph), ("vectors", vectors)):
        try:
            parts[name] = parse(part)
        except StoreSpecError as exc:  # named within the whole spec: "...: graph=bolt://h:x: port 'x' is ..."
            raise StoreSpecError(f"store spec {shown}: {name}={str(exc).removeprefix('store spec ')}") from None
    return StoreSpec(text, "hybrid", "hybrid", parts=parts)


# --- shown without secrets ------------------------------------------------------------------------------------------
def _hide_query(pairs: tuple[tuple[str, str, str], ...]) -> str:
    out = []
    for name, eq, value in pairs:
        if eq and secret_param(name):
            trailer = _TRAILER.match(value)  # the punctuation of the text around it stays
            value = HIDDEN + (trailer.group(1) if trailer else "")
        elif eq and ("://" in unquote(value) or unquote(value).startswith("hybrid:")):
            value = _redact(unquote(value))  # a nested spec
        out.append(f"{name}{eq}{value}")
    return "&".join(out)


def _redact(text: str) -> str:
    lexed = _lex(text)
    if lexed.authority is None:
        if lexed.has_query:
            return f"{text[:text.find('?')]}?{_hide_query(lexed.query)}"
        if "@" in text:  # no scheme at all, yet userinfo: user:password@host
            return f"{HIDDEN}@{text.rpartition('@')[2]}"
        return text
    authority = lexed.authority
    if "@" in authority:
        authority = f"{HIDDEN}@{authority.rpartition('@')[2]}"
    return (f"{lexed.scheme}://{authority}{lexed.path}" + (f"?{_hide_query(lexed.query)}" if lexed.has_query else "")
            + (f"#{HIDDEN}" if lexed.fragment else ""))


def redact(spec: str) -> str:
    """`spec` without credentials, for logs, errors and status. Never raises."""
    try:
        return _redact(spec)
    except Exception:
        return _UNREADABLE


def scrub(text: str) -> str:
    """`text` with every spec-like token redacted: for reasons, error messages and log lines. Never raises."""
    try:
        if ":" not in text:
            return text
        return _SPECLIKE.sub(lambda m: redact(m.group()), text)
    except Exception:
        return _UNREADABLE


def secrets_of(spec: str) -> list[str]:
    """The literal secret values inside `spec` (userinfo and secret parameters, nested specs included), cut out by
    the lexer the parser and the redaction use. Never raises: it serves error messages about unreadable specs."""
    found: list[str] = []

    def walk(text: str, depth: int) -> None:
        lexed = _lex(text)
        userinfo = lexed.authority if lexed.authority is not None else (text if "://" not in text else "")
        if "@" in userinfo:  # user:password@ (or a bare user:password@host, no scheme)
            # Up to the first "@" and up to the last: a password may hold an "@", or the host part may.
            for before in {userinfo.partition("@")[0], userinfo.rpartition("@")[0]}:
                user, _, password = before.partition(":")
                found.append(password or user)
        for name, _, value in lexed.query:
            if secret_param(name):
                found.append(value)
            elif depth < 3 and ("://" in unquote(value) or "@" in unquote(value)):
                walk(unquote(value), depth + 1)  # a nested spec (the hybrid's parts), maybe percent-encoded

    try:
        walk(spec, 0)
        if unquote(spec) != spec:
            walk(unquote(spec), 0)
    except Exception:
        pass
    return sorted({v for s in found for v in (s, unquote(s)) if len(v) >= 3}, key=len, reverse=True)


def scrub_secrets(text: str, spec: str) -> str:
    """`scrub(text)`, and every literal secret of `spec` in it replaced: for messages about `spec` itself."""
    out = scrub(text)
    for secret in secrets_of(spec):
        out = out.replace(secret, HIDDEN)
    return out
