"""Helpers shared by the test modules: the standard fake-IMS clients and credentials, daemon
settings for tests, waiting and reading. The fixtures built on them (``fake``, ``daemon``,
``running``) are in ``conftest.py``."""

from __future__ import annotations

import datetime as dt
import functools
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import httpx
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from imsd.config import Settings
from imsd.daemon import Daemon
from imsd.fakeims.server import FakeIms
from imsd.supervisor import Supervisor

ORG = "0123456789ABCDEF01234567@AdobeOrg"
# With the scope that puts the client's product profiles in its tokens: the fake gateway
# refuses a token without it, as Adobe's does.
SCOPES = ["openid", "AdobeID", "read_organizations", "additional_info.projectedProductContext"]
SECRET = "p8e-TestSecretValue0123456789abcdef"
SECRET2 = "p8e-RotatedSecret9876543210fedcba"
TECH = "ABCDEF0123456789ABCDEF01@techacct.adobe.com"


# -- the fake IMS ----------------------------------------------------------------------------


def add_client(fake: FakeIms) -> None:
    """``client-a`` with the one secret ``SECRET``: what a credential from ``write_cred`` uses."""
    fake.state.add_client("client-a", secrets=[SECRET], scopes=SCOPES, org_id=ORG)


def add_standard_clients(fake: FakeIms) -> None:
    """The clients of the shared ``fake`` fixture: ``client-a`` (secrets ``SECRET`` and the
    rotated ``SECRET2``) and ``client-b`` (``SECRET``)."""
    fake.state.add_client("client-a", secrets=[SECRET, SECRET2], scopes=SCOPES, org_id=ORG)
    fake.state.add_client("client-b", secrets=[SECRET], scopes=SCOPES, org_id=ORG)


# -- credentials and settings ----------------------------------------------------------------


def make_settings(tmp_path: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "credentials_dir": tmp_path / "creds",
        "output_dir": tmp_path / "tokens",
        "state_dir": tmp_path / "state",
        "socket": tmp_path / "imsd.sock",
        "metrics_address": "",
        "debounce_ms": 20,
        "rescan_interval": 2.0,
        "backoff_initial": 0.05,
        "backoff_cap": 0.5,
        "recheck_interval": 0.2,
        "min_margin": 0.5,
        "request_rate": None,
    }
    values.update(overrides)
    for key in ("credentials_dir", "output_dir", "state_dir"):
        values[key].mkdir(exist_ok=True)
    return Settings(**values)


def write_cred(
    directory: Path,
    name: str,
    fake: FakeIms,
    *,
    client_id: str = "client-a",
    secret: str = SECRET,
    extra: str = "",
) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    secret_file = directory / f"{name}.secret"
    secret_file.write_text(secret + "\n")
    path = directory / f"{name}.toml"
    tmp = directory / f".{name}.tmp"
    tmp.write_text(
        f'auth = "oauth_server_to_server"\nclient_id = "{client_id}"\n'
        f'client_secret_file = "{secret_file}"\norg_id = "{ORG}"\n'
        f'scopes = {json.dumps(SCOPES)}\nims_url = "{fake.url}"\n{extra}'
    )
    os.replace(tmp, path)  # the way editors and config management save
    return path


# -- JWT keys --------------------------------------------------------------------------------


@functools.cache
def rsa_key(n: int = 0) -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def private_pem(key: rsa.RSAPrivateKey, passphrase: bytes | None = None) -> bytes:
    algo: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(passphrase)
        if passphrase
        else serialization.NoEncryption()
    )
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, algo)


def certificate(key: rsa.RSAPrivateKey) -> bytes:
    """A self-signed ``certificate_pub.crt``, as the Console's "generate a key pair" gives."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "imsd-test")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=365))
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM)


# -- a running daemon ------------------------------------------------------------------------


async def wait_for(predicate: Callable[[], object], limit: float = 10.0) -> None:
    with anyio.fail_after(limit):
        while not predicate():
            await anyio.sleep(0.02)


def read(path: Path) -> str | None:
    try:
        return path.read_text()
    except FileNotFoundError:
        return None


def sup(d: Daemon) -> Supervisor:
    assert d.supervisor is not None
    return d.supervisor


class Live:
    """A credential's record as it is now: records are frozen and replaced on every change,
    so a test that waits for a change reads through this instead of holding one."""

    def __init__(self, d: Daemon, name: str) -> None:
        self._d, self._name = d, name

    def __getattr__(self, attr: str) -> Any:
        record = sup(self._d).store.get(self._name)
        assert record is not None, f"no record for {self._name!r}"
        return getattr(record, attr)


def live(d: Daemon, name: str) -> Any:
    assert sup(d).store.get(name) is not None, f"no record for {name!r}"
    return Live(d, name)


def uds(d: Daemon) -> httpx.AsyncClient:
    """A client of the daemon's socket API."""
    return httpx.AsyncClient(
        transport=httpx.AsyncHTTPTransport(uds=str(d.settings.socket)),
        base_url="http://imsd",
        timeout=30,
    )


async def force_refresh(d: Daemon) -> httpx.Response:
    """Ask the daemon's socket API to refresh the credential named ``user`` now."""
    transport = httpx.AsyncHTTPTransport(uds=str(d.settings.socket))
    async with httpx.AsyncClient(transport=transport, base_url="http://imsd") as c:
        r = await c.post("/v1/credentials/user/refresh")
    # Let the server see the close before the test cancels it: on asyncio, anyio's UNIX
    # stream can resolve a just-cancelled receive (InvalidStateError; cf. anyio#1267).
    await anyio.sleep(0.05)
    return r
