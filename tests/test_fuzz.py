"""Fuzzing with hypothesis: credential files, IMS responses and socket requests. No input
crashes anything; each gets a clear error; other credentials are unaffected and the daemon
stays ready."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from imsd.credentials import MAX_FILE_SIZE, parse_credentials
from imsd.fakeims.server import FakeIms
from imsd.flows import parse_token_response
from imsd.model import NAME_RE, CredentialError, HttpResponse, ImsError

from tests.support import ORG, SCOPES, SECRET, write_cred

NOW = 1_800_000_000.0

# -- credential files (pure) --------------------------------------------------------------------

_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False),
    st.text(max_size=20),
    st.sampled_from(["../x", "a/b", "..", "x\x00y", "p8e-" + "A" * 20, "o@AdobeOrg", ""]),
)
_json = st.recursive(
    _scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(
            st.one_of(
                st.sampled_from(
                    [
                        "auth",
                        "client_id",
                        "client_secret",
                        "org_id",
                        "scopes",
                        "name",
                        "products",
                        "outputs",
                        "product",
                        "ims_url",
                        "extra_headers",
                        "on_refresh",
                        "metascopes",
                        "private_key",
                        "refresh_token_file",
                        "CLIENT_ID",
                        "CLIENT_SECRETS",
                        "ORG_ID",
                        "SCOPES",
                        "project",
                        "integration",
                        "workspace",
                        "details",
                        "credentials",
                        "oauth_server_to_server",
                        "jwt",
                    ]
                ),
                st.text(max_size=8),
            ),
            inner,
            max_size=6,
        ),
    ),
    max_leaves=25,
)
_valid = {
    "client_id": "c",
    "client_secret": "s3cret-value-0123",
    "org_id": ORG,
    "scopes": ["openid"],
}


def _check(path: Path, data: bytes) -> None:
    error: CredentialError | None = None
    try:
        creds = parse_credentials(path, data, env={}, read_secret=lambda p: "file-secret")
    except CredentialError as e:
        error, creds = e, []
    if error is not None:
        assert str(error).startswith(f"{path}: ")
        assert "s3cret-value-0123" not in str(error)
        assert "file-secret" not in str(error)
    for c in creds:
        assert NAME_RE.fullmatch(c.name)
        assert "s3cret" not in repr(c)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(_json, st.dictionaries(st.sampled_from(sorted(_valid)), _json)), st.booleans())
def test_fuzz_json_credentials(obj: Any, merge: bool) -> None:
    if merge and isinstance(obj, dict):
        obj = {**_valid, **obj}
    _check(Path("/creds/c.json"), json.dumps(obj).encode())


@settings(max_examples=200)
@given(st.binary(max_size=300), st.sampled_from([".toml", ".json", ".yaml"]))
def test_fuzz_random_bytes(data: bytes, suffix: str) -> None:
    _check(Path("/creds/c" + suffix), data)


@settings(max_examples=200)
@given(st.dictionaries(st.sampled_from([*_valid, "name", "products", "auth"]), _scalars))
def test_fuzz_toml_credentials(table: dict[str, Any]) -> None:
    lines = [f"{k} = {json.dumps(v)}" for k, v in {**_valid, **table}.items() if v is not None]
    _check(Path("/creds/c.toml"), "\n".join(lines).encode())


@pytest.mark.parametrize(
    ("name", "data", "needle"),
    [
        ("c.json", b"[" * 100_000 + b"]" * 100_000, "invalid JSON"),
        ("c.toml", b"a = " + b"[" * 100_000, "invalid TOML"),
        ("c.json", b" " * (MAX_FILE_SIZE + 1), "larger than 1 MiB"),
        ("c.json", json.dumps({**_valid, "name": "../x"}).encode(), "name"),
        ("c.json", json.dumps({**_valid, "client_id": ["x"]}).encode(), "client_id"),
        ("c.json", b"\xff\xfe", "not UTF-8"),
    ],
)
def test_hostile_files_get_clear_errors(name: str, data: bytes, needle: str) -> None:
    with pytest.raises(CredentialError, match=needle):
        parse_credentials(Path("/creds") / name, data, env={})


# -- IMS responses (pure) -----------------------------------------------------------------------


@settings(max_examples=300)
@given(
    status=st.sampled_from([200, 201, 400, 401, 429, 500, 503]),
    token=st.one_of(st.none(), st.integers(), st.text(max_size=40), st.just("a.b.c")),
    expires_in=st.one_of(
        st.none(),
        st.integers(-(10**12), 10**15),
        st.floats(allow_nan=True),
        st.text(max_size=10),
        st.booleans(),
    ),
    extra=st.dictionaries(st.text(max_size=10), _scalars, max_size=3),
    content_type=st.sampled_from(["application/json", "text/html", "", "application/xml"]),
    unit=st.sampled_from(["s", "ms"]),
)
def test_fuzz_ims_json_responses(
    status: int,
    token: Any,
    expires_in: Any,
    extra: dict[str, Any],
    content_type: str,
    unit: str,
) -> None:
    body = {**extra, "access_token": token, "expires_in": expires_in}
    raw = json.dumps(body, allow_nan=True).encode()
    resp = HttpResponse(status, {"content-type": content_type}, raw)
    try:
        grant = parse_token_response(resp, now=NOW, unit=unit)
    except ImsError as e:
        message = str(e)
    else:
        assert 200 <= status < 300
        assert NOW < grant.expires_at <= NOW + 366 * 86400
        return
    assert len(message) < 400
    assert not isinstance(token, str) or len(token) < 3 or token not in message


# -- socket requests and credential files against a running daemon --------------------------


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("fuzzd")
    with FakeIms.in_thread() as fake:
        fake.state.add_client("client-a", secrets=[SECRET], scopes=SCOPES, org_id=ORG)
        write_cred(tmp / "creds", "good", fake)
        env = {k: v for k, v in os.environ.items() if not k.startswith("IMSD_")}
        env["IMSD_DEBOUNCE_MS"] = "20"
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "imsd",
                "run",
                "--credentials-dir",
                str(tmp / "creds"),
                "--output-dir",
                str(tmp / "tokens"),
                "--state-dir",
                str(tmp / "state"),
                "--socket",
                str(tmp / "imsd.sock"),
                "--metrics-address",
                "",
                "--log-level",
                "error",
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 20
        while not (tmp / "tokens" / "good" / "token").exists():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        yield {"dir": tmp, "sock": tmp / "imsd.sock", "proc": proc, "fake": fake}
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0


def _state(sock: Path) -> dict[str, Any]:
    with httpx.Client(transport=httpx.HTTPTransport(uds=str(sock)), base_url="http://imsd") as c:
        listing = c.get("/v1/credentials").json()["credentials"]
        ready = c.get("/readyz").status_code
    return {"creds": {x["name"]: x["state"] for x in listing}, "ready": ready}


def _raw(sock: Path, data: bytes) -> bytes:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(15)
        s.connect(str(sock))
        try:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
        except OSError:  # the server may answer (and close) before reading it all
            pass
        out = b""
        try:
            while chunk := s.recv(65536):
                out += chunk
        except OSError:
            pass
        return out


_methods = st.sampled_from([b"GET", b"POST", b"DELETE", b"G\x00T", b"", b"HEAD"])
_paths = st.one_of(
    st.sampled_from(
        [
            b"/v1/credentials",
            b"/v1/credentials/good/token",
            b"/v1/credentials/../../etc/passwd/token",
            b"/v1/credentials/%2e%2e%2fetc/token",
            b"/v1/credentials/good/headers?product=../../x",
            b"/readyz",
            b"*",
            b"/" + b"a" * 70_000,
        ]
    ),
    st.binary(max_size=40).map(lambda b: b"/" + b),
)
_requests = st.one_of(
    st.binary(max_size=400),
    st.builds(
        lambda m, p, h, body: m + b" " + p + b" HTTP/1.1\r\nHost: x\r\n" + h + b"\r\n" + body,
        _methods,
        _paths,
        st.one_of(
            st.just(b""),
            st.just(b"X-Big: " + b"a" * 70_000 + b"\r\n"),
            st.just(b"Content-Length: 99999999\r\n"),
            st.just(b"Transfer-Encoding: chunked\r\n"),
            st.binary(max_size=60).map(lambda b: b + b"\r\n"),
        ),
        st.binary(max_size=50),
    ),
)


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(_requests)
def test_fuzz_socket_requests(running: dict[str, Any], data: bytes) -> None:
    answer = _raw(running["sock"], data)
    if answer:
        status_line = answer.split(b"\r\n", 1)[0]
        assert status_line.startswith(b"HTTP/1.1 "), status_line[:80]
        status = int(status_line.split()[1])
        assert status < 500 or status == 503, answer[:300]
        head, _, rest = answer.partition(b"\r\n\r\n")
        length = [
            int(line.split(b":", 1)[1])
            for line in head.lower().split(b"\r\n")
            if line.startswith(b"content-length:")
        ]
        if status >= 400 and length and length[0] and not data.startswith(b"HEAD "):
            assert "error" in json.loads(rest[: length[0]])  # the first answer's JSON body
        assert b"root:" not in answer  # no path traversal to the file system
    assert running["proc"].poll() is None


@settings(
    max_examples=15,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["f1.json", "f2.toml", "f3.json", ".hidden.json", "f4.txt"]),
            st.one_of(_json.map(lambda o: json.dumps(o).encode()), st.binary(max_size=200)),
        ),
        min_size=1,
        max_size=4,
    )
)
def test_fuzz_files_in_a_running_daemon(
    running: dict[str, Any], files: list[tuple[str, bytes]]
) -> None:
    creds: Path = running["dir"] / "creds"
    token = (running["dir"] / "tokens" / "good" / "token").read_text()
    for name, data in files:
        (creds / name).write_bytes(data)
    time.sleep(0.3)  # let the watcher see them (debounce 20 ms)
    state = _state(running["sock"])
    assert state["creds"]["good"] == "valid"
    assert (running["dir"] / "tokens" / "good" / "token").read_text() == token
    for name, _ in files:
        (creds / name).unlink(missing_ok=True)
    assert running["proc"].poll() is None
