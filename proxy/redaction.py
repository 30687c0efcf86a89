"""The one redaction rule: credentials never leave the process through a log, an error, a status, the stored
history, a trace or a metric label.

`redact(spec)` shows a store spec without its secrets; `scrub(text)` does the same for every spec-like token inside
free text (a reason an operator typed, an exception's message, a log line); `scrub_secrets(text, spec)` also removes
the literal secret values of `spec`, for messages that quote a fragment of it without its URL around it (a parser
complaining about a port). None of them can raise: a spec too broken to read is shown as a placeholder.

A secret is the userinfo of a URL (`user:password@`) and the value of any query parameter whose name says it holds
one (`password`, `api_key`, `token`, `secret`, ...); `*_file` parameters name files, not secrets, and stay visible.
Nested specs (the hybrid store's `graph=` and `vectors=`, plain or percent-encoded) are redacted the same way.
"""

from __future__ import annotations

import re
from urllib.parse import unquote

HIDDEN = "***"
_UNREADABLE = "<store spec that cannot be read; redacted>"
_SECRET_NAMES = re.compile(r"pass|pwd|secret|token|api.?key|apikey|access.?key|auth|credential|^key$|signature",
                           re.IGNORECASE)
_TRAILER = re.compile(r"^[^'\"`,;)\]>]*(.*)$", re.DOTALL)
# A spec inside free text: scheme:// (or percent-encoded, or hybrid:?...), or a bare user:password@host.
_SPECLIKE = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:(?://|%2[Ff]%2[Ff]|\?)\S*|[^\s:@/'\"]+:[^\s@/]+@\S+")


def _secret_param(name: str) -> bool:
    name = unquote(name)
    return bool(_SECRET_NAMES.search(name)) and not name.lower().endswith("file")


def _query(query: str) -> str:
    out = []
    for part in query.split("&"):
        name, eq, value = part.partition("=")
        if eq and _secret_param(name):
            trailer = _TRAILER.match(value)  # the punctuation of the text around it stays
            value = HIDDEN + (trailer.group(1) if trailer else "")
        elif eq and ("://" in unquote(value) or unquote(value).startswith("hybrid:")):
            value = _redact(unquote(value))  # a nested spec
        out.append(f"{name}{eq}{value}")
    return "&".join(out)


def _redact(spec: str) -> str:
    sep, ask = spec.find("://"), spec.find("?")
    if ask >= 0 and (sep < 0 or ask < sep):  # no authority before the query: hybrid:?graph=...&vectors=...
        return f"{spec[:ask]}?{_query(spec[ask + 1:])}"
    if sep < 0:
        if "@" in spec:  # no scheme at all, yet userinfo: user:password@host
            return f"{HIDDEN}@{spec.rpartition('@')[2]}"
        return spec
    head, rest = spec[:sep + 3], spec[sep + 3:]
    ends = [i for i in (rest.find("/"), rest.find("?"), rest.find("#")) if i >= 0]
    end = min(ends) if ends else len(rest)
    netloc, tail = rest[:end], rest[end:]
    if "@" in netloc:
        netloc = f"{HIDDEN}@{netloc.rpartition('@')[2]}"
    tail, hash_, fragment = tail.partition("#")
    path, q, query = tail.partition("?")
    return head + netloc + path + (q + _query(query) if q else "") + (hash_ + HIDDEN if fragment else "")


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
    """The literal secret values inside `spec` (userinfo and secret parameters, nested specs included)."""
    found: list[str] = []
    try:
        for m in re.finditer(r"(?:^|://)([^/?#\s@]*)@", unquote(spec)):
            user, _, password = m.group(1).partition(":")
            found += [password or user, unquote(password or user)]
        for m in re.finditer(r"[?&]([^=&\s]+)=([^&\s#]*)", unquote(spec)):
            if _secret_param(m.group(1)):
                found += [m.group(2), unquote(m.group(2))]
    except Exception:
        pass
    return sorted({s for s in found if len(s) >= 3}, key=len, reverse=True)


def scrub_secrets(text: str, spec: str) -> str:
    """`scrub(text)`, and every literal secret of `spec` in it replaced: for messages about `spec` itself."""
    out = scrub(text)
    for secret in secrets_of(spec):
        out = out.replace(secret, HIDDEN)
    return out
