"""The fake IMS's state and logic, free of HTTP: clients, minted tokens, faults, counters.

Theory of operation
-------------------
Tests (often in another thread) register clients and flip fault switches; the HTTP layer
hands each token request to :meth:`FakeImsState.token_request` as a plain mapping of
parameters and gets back ``(status, json_body, headers)``. Every public method takes the
lock, so the state is safe to drive from a test thread while the server runs in its own.

Tokens are shaped like IMS's (reference/ims-protocol.md §4): JWT-like, carrying only the
claims real IMS tokens are documented to carry (``id``, ``type``, ``client_id``, ``user_id``,
``as``, ``scope``, ``created_at`` and ``expires_in`` as millisecond strings; no ``exp`` and no
org: the gateway finds a token's org through its client, as IMS does). They are HMAC-signed
with a key private to this instance so :meth:`validate_token` (and the fake gateway) can tell
ours from forgeries. Faults are consumed in a fixed order per request: reset, hang, bomb, fail,
throttle; a drip applies to whatever answer is then sent.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Final

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey

from imsd.fakeims.authorize import Authorizations, authorization_code
from imsd.fakeims.jwtcheck import Binding, Refused, check_assertion

__all__ = ["PRODUCTS", "Client", "FakeImsState", "LogEntry", "Profile", "TokenReply"]

TokenReply = tuple[int, dict[str, Any], dict[str, str]]

_HEADER: Final = {"alg": "HS256", "x5u": "fake_ims-key-at-1.cer", "kid": "fake_ims-key-at-1"}
_JWT_GRANT: Final = "urn:ietf:params:oauth:grant-type:jwt-bearer"
_THROTTLE_BODY: Final = {"error_code": "429050", "message": "Too many requests"}


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _error(status: int, code: str, description: str) -> TokenReply:
    return status, {"error": code, "error_description": description}, {}


#: The product profiles a client can be in (what the fake gateway's products need).
PRODUCTS: Final = frozenset({"aep", "ajo", "cja", "analytics", "campaign"})


@dataclass(frozen=True, slots=True)
class Profile:
    """What an Admin Console admin gave a client (its product profiles) and what its org has:
    the products it may call, the org's Platform sandboxes and the Campaign tenants it can
    see. The default is in every product, with the ``prod`` and ``dev`` sandboxes and one
    tenant (``fake``). The Analytics companies it can see are what the fake discovery lists
    for it (:mod:`imsd.fakeims.discovery`, one company by default)."""

    products: frozenset[str] = PRODUCTS
    sandboxes: frozenset[str] = frozenset({"prod", "dev"})
    tenants: frozenset[str] = frozenset({"fake"})

    @classmethod
    def of(cls, data: Mapping[str, Iterable[str]]) -> Profile:
        """A profile from JSON-like *data*; keys left out keep their defaults."""
        unknown = set(data) - {"products", "sandboxes", "tenants"}
        if unknown:
            raise KeyError(sorted(unknown)[0])
        if any(isinstance(vs, str) for vs in data.values()):
            raise TypeError("profile values are lists of names")
        values = {k: frozenset(str(v) for v in vs) for k, vs in data.items()}
        return cls(**values)


@dataclass
class Client:
    client_id: str
    secrets: list[str]
    scopes: frozenset[str]
    org_id: str
    technical_account_id: str
    lifetime: float | None = None  # seconds; None = the server default
    keys: list[RSAPublicKey] = field(default_factory=list)  # JWT: certificates' public keys
    metascopes: frozenset[str] = frozenset()
    require_jti: bool = False
    profile: Profile = field(default_factory=Profile)


@dataclass
class _RefreshGrant:
    client_id: str
    scopes: frozenset[str]
    user_id: str
    expires: float


def _public_key(pem: bytes) -> RSAPublicKey:
    """A certificate's (``certificate_pub.crt``) or a bare public key's RSA key."""
    if b"CERTIFICATE" in pem:
        key: object = x509.load_pem_x509_certificate(pem).public_key()
    else:
        key = serialization.load_pem_public_key(pem)
    if not isinstance(key, RSAPublicKey):
        raise ValueError("JWT bindings use RSA certificates")
    return key


@dataclass(frozen=True, slots=True)
class LogEntry:
    """One token request as the fake saw it (never the secret)."""

    time: float
    path: str
    client_id: str | None
    grant_type: str | None
    status: int


@dataclass
class _Faults:
    reset: int = 0
    hang: float = 0.0
    drip: float = 0.0
    bomb: int = 0
    fail: int = 0
    fail_status: int = 503
    throttle: int = 0
    retry_after: float = 1.0


@dataclass
class FakeImsState:
    token_lifetime: float = 86400.0
    ims_as: str = "ims-na1"
    v1_unit_ms: bool = True
    clock: Callable[[], float] = time.time
    clients: dict[str, Client] = field(default_factory=dict)
    request_log: list[LogEntry] = field(default_factory=list)
    revoked: set[str] = field(default_factory=set)
    _faults: _Faults = field(default_factory=_Faults)
    _key: bytes = field(default_factory=lambda: secrets.token_bytes(32))
    _lock: threading.RLock = field(default_factory=threading.RLock)
    _rate: tuple[int, float] | None = None  # (requests, per seconds) per client
    in_flight: int = 0  # token requests being answered right now
    peak_in_flight: int = 0
    _recent: dict[str, list[float]] = field(default_factory=dict)
    refresh_lifetime: float = 14 * 86400.0  # IMS's default for refresh tokens
    _refresh: dict[str, _RefreshGrant] = field(default_factory=dict)
    _seen_jti: set[str] = field(default_factory=set)
    minted: list[str] = field(default_factory=list)  # every token issued (leak audits)
    authorize: Authorizations = field(default_factory=Authorizations)  # user logins

    # -- test controls -----------------------------------------------------------------------

    def add_client(
        self,
        client_id: str,
        *,
        secrets: Iterable[str],
        scopes: Iterable[str],
        org_id: str,
        lifetime: float | None = None,
        technical_account_id: str | None = None,
        public_keys: Iterable[bytes] = (),
        metascopes: Iterable[str] = (),
        require_jti: bool = False,
        profile: Profile | None = None,
    ) -> Client:
        keep = list(secrets)
        if not 1 <= len(keep) <= 2:
            raise ValueError("IMS clients have one or two active secrets")
        digest = hashlib.sha256(client_id.encode()).hexdigest()[:24].upper()
        tech = technical_account_id or f"{digest}@techacct.adobe.com"
        client = Client(
            client_id,
            keep,
            frozenset(scopes),
            org_id,
            tech,
            lifetime,
            keys=[_public_key(pem) for pem in public_keys],
            metascopes=frozenset(metascopes),
            require_jti=require_jti,
            profile=profile or Profile(),
        )
        with self._lock:
            self.clients[client_id] = client
        return client

    def client(self, client_id: str) -> Client | None:
        with self._lock:
            return self.clients.get(client_id)

    def set_profile(self, client_id: str, profile: Profile) -> None:
        with self._lock:
            self.clients[client_id].profile = profile

    def set_secrets(self, client_id: str, secrets: Iterable[str]) -> None:
        with self._lock:
            self.clients[client_id].secrets = list(secrets)

    def fail_next(self, n: int, status: int = 503) -> None:
        """Answer the next *n* token requests with *status* (0 clears)."""
        with self._lock:
            self._faults.fail, self._faults.fail_status = n, status

    def throttle_next(self, n: int, retry_after: float = 1.0) -> None:
        with self._lock:
            self._faults.throttle, self._faults.retry_after = n, retry_after

    def reset_next(self, n: int) -> None:
        """Close the connection without an answer for the next *n* token requests."""
        with self._lock:
            self._faults.reset = n

    def hang(self, seconds: float) -> None:
        """Delay every token answer by *seconds* (0 clears, releasing the answers waiting)."""
        with self._lock:
            self._faults.hang = seconds

    def drip(self, seconds: float) -> None:
        """Send every token answer's body one byte per *seconds* (0 clears): an IMS that
        never lets a per-read timeout fire."""
        with self._lock:
            self._faults.drip = seconds

    def bomb_next(self, n: int) -> None:
        """Answer the next *n* token requests with a gzip bomb (``Content-Encoding: gzip``,
        100 MiB of zeros in about 100 KiB), whatever ``Accept-Encoding`` asked."""
        with self._lock:
            self._faults.bomb = n

    def rate_limit(self, requests: int | None, per: float = 1.0) -> None:
        """Throttle any client minting more than *requests* per *per* seconds."""
        with self._lock:
            self._rate = None if requests is None else (requests, per)

    def request_count(self, client_id: str | None = None) -> int:
        with self._lock:
            return sum(1 for e in self.request_log if client_id in (None, e.client_id))

    def login(self, client_id: str, scopes: Iterable[str], *, user_id: str = "") -> str:
        """A refresh token for *client_id*, as a user's consent with ``offline_access`` would
        give one (the start of a rotation chain)."""
        with self._lock:
            client = self.clients[client_id]
            user = user_id or f"{secrets.token_hex(12).upper()}@AdobeID"
            return self._new_refresh_token(client, frozenset(scopes), user)

    def revoke_refresh_tokens(self, client_id: str | None = None) -> int:
        """Revoke every live refresh token (of *client_id*); returns how many."""
        with self._lock:
            gone = [t for t, g in self._refresh.items() if client_id in (None, g.client_id)]
            for t in gone:
                del self._refresh[t]
            return len(gone)

    def live_refresh_tokens(self) -> int:
        with self._lock:
            return len(self._refresh)

    def revoke(self, token: str) -> None:
        with self._lock:
            claims = self._verify(token)
            if claims is not None:
                self.revoked.add(str(claims["id"]))

    # -- per-request faults (the HTTP layer asks before answering) ---------------------------

    def take_reset(self) -> bool:
        with self._lock:
            if self._faults.reset > 0:
                self._faults.reset -= 1
                return True
            return False

    def enter(self) -> None:
        with self._lock:
            self.in_flight += 1
            self.peak_in_flight = max(self.peak_in_flight, self.in_flight)

    def leave(self) -> None:
        with self._lock:
            self.in_flight -= 1

    def hang_seconds(self) -> float:
        with self._lock:
            return self._faults.hang

    def drip_seconds(self) -> float:
        with self._lock:
            return self._faults.drip

    def take_bomb(self) -> bool:
        with self._lock:
            if self._faults.bomb > 0:
                self._faults.bomb -= 1
                return True
            return False

    # -- tokens ------------------------------------------------------------------------------

    def _sign(self, claims: Mapping[str, Any]) -> str:
        head = _b64(json.dumps(_HEADER, separators=(",", ":")).encode())
        body = _b64(json.dumps(claims, separators=(",", ":")).encode())
        sig = hmac.new(self._key, f"{head}.{body}".encode(), hashlib.sha256).digest()
        return f"{head}.{body}.{_b64(sig)}"

    def _verify(self, token: str) -> dict[str, Any] | None:
        parts = token.split(".")
        if len(parts) != 3:
            return None
        expected = hmac.new(self._key, f"{parts[0]}.{parts[1]}".encode(), hashlib.sha256).digest()
        try:
            if not hmac.compare_digest(expected, _unb64(parts[2])):
                return None
            claims = json.loads(_unb64(parts[1]))
        except ValueError:
            return None
        return claims if isinstance(claims, dict) else None

    def mint(
        self,
        client: Client,
        scopes: Iterable[str],
        *,
        kind: str = "access_token",
        user_id: str | None = None,
    ) -> tuple[str, float]:
        """A new token for *client* (a user's, *user_id*, else its technical account's);
        returns it and its lifetime in seconds."""
        now_ms = int(self.clock() * 1000)
        lifetime = client.lifetime if client.lifetime is not None else self.token_lifetime
        claims = {
            "id": f"{now_ms}_{secrets.token_hex(8)}_ue1",
            "type": kind,
            "client_id": client.client_id,
            "user_id": user_id or client.technical_account_id,
            "as": self.ims_as,
            "scope": ",".join(sorted(scopes)),
            "created_at": str(now_ms),
            "expires_in": str(int(lifetime * 1000)),
        }
        token = self._sign(claims)
        self.minted.append(token)
        return token, lifetime

    def validate_token(self, token: str) -> dict[str, Any] | None:
        """The claims of a valid, unexpired, unrevoked token we minted, else None."""
        with self._lock:
            claims = self._verify(token)
            if claims is None or str(claims.get("id")) in self.revoked:
                return None
            try:
                expires = (int(claims["created_at"]) + int(claims["expires_in"])) / 1000
            except (KeyError, ValueError):
                return None
            return claims if expires > self.clock() else None

    # -- the token endpoint ------------------------------------------------------------------

    def _log(self, path: str, params: Mapping[str, str], status: int) -> None:
        self.request_log.append(
            LogEntry(self.clock(), path, params.get("client_id"), params.get("grant_type"), status)
        )

    def token_request(
        self, path: str, params: Mapping[str, str], *, origin: str | None = None
    ) -> TokenReply:
        """Answer a token request whose parameters (body, query and Basic auth merged) are
        *params*. The reply body is IMS-shaped JSON. *origin* is the base URL the client
        called (what a JWT assertion's ``aud`` must name)."""
        with self._lock:
            if path.rstrip("/") == "/ims/exchange/jwt":
                params = {**params, "grant_type": _JWT_GRANT}
            reply = self._token_reply(path, params, origin)
            self._log(path, params, reply[0])
            return reply

    def _token_reply(
        self, path: str, params: Mapping[str, str], origin: str | None = None
    ) -> TokenReply:
        f = self._faults
        if f.fail > 0:
            f.fail -= 1
            return _error(f.fail_status, "server_error", "the fake IMS is failing on purpose")
        if f.throttle > 0:
            f.throttle -= 1
            return 429, dict(_THROTTLE_BODY), {"Retry-After": f"{f.retry_after:g}"}
        grant = params.get("grant_type", "")
        if not grant:
            return _error(400, "invalid_request", "missing grant_type")
        handler = self._grants.get(grant)
        if handler is None or (grant == _JWT_GRANT) != path.rstrip("/").endswith("/exchange/jwt"):
            return _error(400, "unsupported_grant_type", f"unsupported grant_type {grant[:40]}")
        client_id = params.get("client_id", "")
        if client_id and self._rate is not None and self._throttled(client_id):
            return 429, dict(_THROTTLE_BODY), {"Retry-After": f"{self._rate[1]:g}"}
        status, body, headers = handler(self, params, origin)
        p = path.rstrip("/")
        if status == 200 and (
            p.endswith("/exchange/jwt") or (p.endswith("/v1") and self.v1_unit_ms)
        ):
            body["expires_in"] = int(body["expires_in"] * 1000)
        return status, body, headers

    def _throttled(self, client_id: str) -> bool:
        assert self._rate is not None
        limit, per = self._rate
        now = self.clock()
        recent = [t for t in self._recent.get(client_id, []) if now - t < per]
        throttled = len(recent) >= limit
        if not throttled:
            recent.append(now)
        self._recent[client_id] = recent
        return throttled

    def _authenticate(self, params: Mapping[str, str]) -> Client | TokenReply:
        client_id, secret = params.get("client_id", ""), params.get("client_secret", "")
        if not client_id:
            return _error(400, "invalid_request", "missing client_id")
        if not secret:
            return _error(400, "invalid_request", "missing client_secret")
        client = self.clients.get(client_id)
        if client is None:
            return _error(400, "invalid_client", "unknown client_id")
        if not any(hmac.compare_digest(secret, s) for s in client.secrets):
            return _error(401, "invalid_client", "invalid client credentials")
        return client

    def _client_credentials(self, params: Mapping[str, str], origin: str | None) -> TokenReply:
        client = self._authenticate(params)
        if not isinstance(client, Client):
            return client
        raw = params.get("scope", "")
        scopes = {s.strip() for s in raw.replace(" ", ",").split(",") if s.strip()}
        if not scopes:
            return _error(400, "invalid_request", "missing scope")
        if not scopes <= client.scopes:
            return _error(400, "invalid_scope", "requested scopes are not granted to the client")
        org = params.get("org_id")
        if org and org != client.org_id:
            return _error(400, "invalid_request", "org_id does not match the client")
        token, lifetime = self.mint(client, scopes)
        body = {"access_token": token, "token_type": "bearer", "expires_in": int(lifetime)}
        return 200, body, {}

    def _jwt_exchange(self, params: Mapping[str, str], origin: str | None) -> TokenReply:
        """``/ims/exchange/jwt``: client id and secret, plus a signed assertion."""
        client = self._authenticate(params)
        if not isinstance(client, Client):
            return client
        if not client.keys:
            return _error(401, "invalid_client", "the client has no JWT binding")
        binding = Binding(
            client.client_id,
            client.org_id,
            client.technical_account_id,
            client.keys,
            client.metascopes,
            client.require_jti,
        )
        try:
            check_assertion(
                params.get("jwt_token", ""),
                binding,
                origin=origin,
                now=self.clock(),
                seen_jti=self._seen_jti,
            )
        except Refused as e:
            return _error(400, e.code, str(e))
        token, lifetime = self.mint(client, client.metascopes)
        body = {"access_token": token, "token_type": "bearer", "expires_in": int(lifetime)}
        return 200, body, {}

    def _new_refresh_token(self, client: Client, scopes: frozenset[str], user: str) -> str:
        token, _ = self.mint(client, scopes, kind="refresh_token", user_id=user)
        self._refresh[token] = _RefreshGrant(
            client.client_id, scopes, user, self.clock() + self.refresh_lifetime
        )
        return token

    def _refresh_token(self, params: Mapping[str, str], origin: str | None) -> TokenReply:
        """``grant_type=refresh_token``: a new access token and a new refresh token; the
        presented one is spent."""
        client = self._authenticate(params)
        if not isinstance(client, Client):
            return client
        presented = params.get("refresh_token", "")
        if not presented:
            return _error(400, "invalid_request", "missing refresh_token")
        grant = self._refresh.get(presented)
        if grant is None or grant.client_id != client.client_id:
            return _error(400, "invalid_grant", "the refresh token is invalid or was revoked")
        del self._refresh[presented]  # rotation: each refresh token works once
        if grant.expires <= self.clock():
            return _error(400, "invalid_grant", "the refresh token has expired")
        token, lifetime = self.mint(client, grant.scopes, user_id=grant.user_id)
        body = {
            "access_token": token,
            "refresh_token": self._new_refresh_token(client, grant.scopes, grant.user_id),
            "token_type": "bearer",
            "expires_in": int(lifetime),
        }
        return 200, body, {}

    _grants: ClassVar[
        dict[str, Callable[[FakeImsState, Mapping[str, str], str | None], TokenReply]]
    ]


FakeImsState._grants = {
    "client_credentials": FakeImsState._client_credentials,
    "refresh_token": FakeImsState._refresh_token,
    "authorization_code": authorization_code,
    _JWT_GRANT: FakeImsState._jwt_exchange,  # set by token_request for /ims/exchange/jwt
}
