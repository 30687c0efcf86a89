"""Store specs read once, by one parser, into typed values (adapters/specs.py): what a spec says is what every
adapter connects to, every malformed part is one kind of error naming it, a secret is read in one place and shown
nowhere."""

from __future__ import annotations

import string
from pathlib import Path
from urllib.parse import quote

import pytest
from hypothesis import given
from hypothesis import strategies as st

from adapters.chroma import parse_spec as chroma_args
from adapters.errors import StoreSpecError
from adapters.neo4j import parse_spec as neo4j_args
from adapters.postgres import connection
from adapters.qdrant import parse_spec as qdrant_args
from adapters.specs import parse, redact

NAMES = st.text(string.ascii_letters + string.digits + "_-", min_size=1, max_size=12)
SECRETS = st.text(string.ascii_letters + string.digits + "!$%&'()*+,;=:@/?#[] ", min_size=3, max_size=20)
HOSTS = st.one_of(st.from_regex(r"[a-z][a-z0-9-]{0,10}(\.[a-z]{2,5})?", fullmatch=True),
                  st.just("127.0.0.1"), st.just("::1"))
SERVER_SCHEMES = st.sampled_from(["postgresql", "postgres", "bolt", "neo4j+s", "qdrant", "qdrants", "chroma",
                                  "chromas"])


@given(scheme=SERVER_SCHEMES, user=NAMES, password=SECRETS, host=HOSTS, port=st.none() | st.integers(1, 65535),
       db=st.none() | NAMES, prefix=NAMES)
def test_a_server_spec_reads_back_its_parts_and_shows_no_secret(
        scheme: str, user: str, password: str, host: str, port: int | None, db: str | None, prefix: str) -> None:
    netloc = f"{quote(user)}:{quote(password, safe='')}@" + (f"[{host}]" if ":" in host else host) + (
        f":{port}" if port else "")
    text = f"{scheme}://{netloc}/{db or ''}?prefix={prefix}"
    spec = parse(text)
    assert (spec.scheme, spec.user, spec.host, spec.port, spec.path) == (scheme, user, host, port, db or "")
    assert spec.options == {"prefix": prefix} and spec.secret.read() == password and not spec.local
    assert spec.shown == f"{scheme}://***@{netloc.rpartition('@')[2]}/{db or ''}?prefix={prefix}"
    assert repr(spec.secret) == f"Secret(file='', env={spec.secret.env!r})"  # the value is never shown


@given(password=SECRETS, host=HOSTS, port=st.integers(1, 65535), db=NAMES)
def test_every_adapter_connects_where_the_spec_says(password: str, host: str, port: int, db: str) -> None:
    at = (f"[{host}]" if ":" in host else host) + f":{port}"
    dsn, schema = connection(f"postgresql://me:{quote(password, safe='')}@{at}/{db}?schema=s1&sslmode=disable")
    assert dsn == f"postgresql://me:{quote(password, safe='')}@{at}/{quote(db)}?sslmode=disable" and schema == "s1"
    graph = neo4j_args(f"bolt://me:{quote(password, safe='')}@{at}/{db}?prefix=P")
    assert graph == {"uri": f"bolt://{at}", "auth": ("me", password), "database": db, "prefix": "P"}
    vectors = qdrant_args(f"qdrants://{at}?api_key={quote(password, safe='')}")
    assert vectors["client"] == {"url": f"https://{at}", "api_key": password}
    chroma = chroma_args(f"chroma://{at}?tenant=t&database=d")
    assert chroma["args"]["host"] == host and chroma["args"]["port"] == port and chroma["args"]["tenant"] == "t"


@pytest.mark.parametrize(("text", "says"), [
    ("memory.db", "has no scheme"),
    ("mysql://h/db", "unknown scheme 'mysql'"),
    ("postgresql://u:pw-123@h:notaport/db", "port 'notaport' is not a number from 1 to 65535"),
    ("postgresql://u:pw-123@h:0/db", "port '0' is not a number"),
    ("bolt://:7687", "the host is missing before port 7687"),
    ("qdrant://[::1/x", "needs its closing ']'"),
    ("sqlite://host/file.db", "a local store takes a path, not a host"),
    ("chroma+local://", "the path is missing"),
    ("hybrid:?graph=bolt://h:x&vectors=qdrant+local:///:memory:", "port 'x' is not a number"),
    ("hybrid:?graph=postgresql://h&vectors=qdrant://q", "graph= needs a Neo4j spec"),
    ("postgresql://u@h/db?schema=no-dash", "schema 'no-dash': letters, digits and _ only"),
    ("bolt://h?prefix=9x", "prefix '9x': a letter"),
    ("postgresql://h/db?index_workers=many", "index_workers 'many'"),
])
def test_a_malformed_part_is_one_kind_of_error_naming_it(text: str, says: str) -> None:
    from proxy.engine.backends import backend_for
    with pytest.raises(StoreSpecError) as err:
        backend_for(text, None)  # type: ignore[arg-type]
    assert says in str(err.value) and "pw-123" not in str(err.value)
    assert str(err.value).startswith(f"store spec {redact(text)}") or "has no scheme" in says


def test_a_secret_comes_from_the_spec_a_file_or_the_environment_read_in_one_place(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    secret = tmp_path / "pg-password"
    secret.write_text("from-the-file\n")
    assert parse(f"postgresql://u@h/db?password_file={secret}").secret.read() == "from-the-file"
    monkeypatch.setenv("NEO4J_PASSWORD", "from-the-env")
    assert parse("bolt://u@h").secret.read() == "from-the-env"
    assert parse("bolt://u:inline@h").secret.read() == "inline"
    missing = parse(f"qdrant://h?api_key_file={tmp_path / 'nowhere'}")
    with pytest.raises(StoreSpecError, match=r"cannot read the secret file .*nowhere"):
        missing.secret.read()
    assert "password_file" in parse(f"postgresql://u@h/db?password_file={secret}").shown  # a file is no secret
