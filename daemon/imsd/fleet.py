"""Fleet mode: the pure part — key names, the lease and fencing scripts, the sealing of a
shared token, and the decisions a node takes before it calls IMS.

Theory of operation
-------------------
Several daemons holding the same credential share one token through Redis
(:mod:`imsd.fleetredis` is the driver; nothing here does I/O). Per credential *identity* the
fleet keeps three keys, named from a public key id derived from the credential's own secret
material, so that a node with another secret under the same name lands in another group and
can neither read nor overwrite this one:

- ``lease``: ``"<node>:<fence>"`` with a TTL, taken with ``SET … NX PX`` and renewed by a
  compare-and-set script (:data:`ACQUIRE`). Taking it increments ``fence`` (``INCR``, and
  at least Redis's clock in ms: a Redis restarted empty must not hand out an old fence).
- ``fence``: the fencing counter. Every write of the shared token is :data:`PUBLISH`, which
  refuses a writer whose fence is no longer the current one: a holder that stalled past its
  lease (GC pause, SIGSTOP) while another node took over can never overwrite a newer token.
- ``token``: the sealed token (:func:`seal`): AES-GCM under a key derived by HKDF from the
  credential's secret material and identity, the associated data binding the key's name and
  the fence. A rotated refresh token is sealed in the same blob, so it is in Redis no later
  than the access token it came with (one atomic write; the chain has one writer).

Before a fetch a node adopts a newer shared token (:func:`adoptable`), else takes the lease
and fetches (then publishes, fenced, before writing its files), else waits for the holder
(:class:`Deferred`). With Redis unreachable, S2S and JWT credentials mint locally
(:func:`may_fall_back`); a ``refresh_token`` credential waits: a second writer would fork its
chain.
"""

from __future__ import annotations

import functools
import json
import os
import re
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Final, Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from imsd.model import Credential, Grant, Secret
from imsd.scheduler import Fetch, Record, Step

__all__ = [
    "ACQUIRE",
    "FALLBACK_AUTHS",
    "PUBLISH",
    "RELEASE",
    "RENEW",
    "Deferred",
    "Exchange",
    "FleetKeys",
    "Rejected",
    "Sealed",
    "Tampered",
    "Unavailable",
    "adoptable",
    "announced",
    "deferred",
    "derive",
    "keys_for",
    "may_fall_back",
    "open_sealed",
    "seal",
]

#: Auth methods that may mint on their own while Redis is unreachable (a second token for the
#: same client is harmless); any other method (``refresh_token``: a rotating chain) waits.
FALLBACK_AUTHS: Final = frozenset({"oauth_server_to_server", "jwt"})

_VERSION: Final = 1
_HEADER: Final = struct.Struct(">BQ")  # version, fence
_NONCE: Final = 12
_SALT: Final = b"imsd fleet v1"


class Deferred(Exception):
    """Another node holds the lease: look again at *until* (wall clock)."""

    def __init__(self, until: float, holder: str | None = None) -> None:
        super().__init__(f"lease held by {holder or 'another node'}")
        self.until = until
        self.holder = holder


class Unavailable(Exception):
    """Redis cannot be reached (or answered nonsense)."""


class Tampered(ValueError):
    """A sealed token that does not open under this node's key."""


class Rejected(ValueError):
    """A message on the fleet's channel that is not a token key's name (its reason is one of
    a few fixed phrases, never the message)."""


class Exchange(Protocol):
    """The seam in the supervisor's fetch (:class:`imsd.fleetredis.Fleet`)."""

    async def exchange(self, rec: Record, fetch: Callable[[], Awaitable[Grant]]) -> Grant: ...


# -- names and keys -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FleetKeys:
    lease: str
    fence: str
    token: str
    channel: str


def _material(cred: Credential) -> bytes:
    """The credential's own secret material: the client secret and every option (the JWT
    private key, a login's refresh token), as the identity hash covers them."""
    parts = [cred.client_secret.reveal()]
    for k, v in sorted(cred.options.items()):
        plain = v.reveal() if isinstance(v, Secret) else str(v)
        parts.append(f"{k}={plain}")
    return "\0".join(parts).encode()


def _hkdf(material: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=_SALT, info=info).derive(material)


def derive(cred: Credential) -> tuple[bytes, str]:
    """(the AES-256 key, a public key id) for *cred*. Both depend on the secret material and
    the identity; the id tells nothing about the key (another HKDF output)."""
    material = _material(cred)
    info = f"{cred.name}\0{cred.identity}".encode()
    key = _hkdf(material, b"key\0" + info)
    kid = _hkdf(material, b"kid\0" + info)[:12].hex()
    return key, kid


def keys_for(prefix: str, name: str, kid: str) -> FleetKeys:
    # One hash tag per credential: the three keys live on one slot (a cluster's scripts).
    base = f"{prefix}:{{{name}:{kid}}}"
    return FleetKeys(f"{base}:lease", f"{base}:fence", f"{base}:token", f"{prefix}:tokens")


@functools.cache
def _key_shape(prefix: str) -> re.Pattern[bytes]:
    # A credential name (model.NAME_RE's characters, at most 64) and a 24-digit key id.
    name, kid = rb"[A-Za-z0-9._-]{1,64}", rb"[0-9a-f]{24}"
    return re.compile(re.escape(prefix.encode()) + rb":\{" + name + b":" + kid + rb"\}:token")


def announcement_limit(prefix: str) -> int:
    """The longest message the channel carries: a token key's name under *prefix*."""
    return len(prefix.encode()) + len(":{:}:token") + 64 + 24


def announced(prefix: str, data: object) -> str:
    """The token key a message on the fleet's channel names. Every message is input (anyone
    with PUBLISH rights may send one): anything but a token key's name under *prefix* raises
    :class:`Rejected`, checked in this order: not bytes, too long, not UTF-8, another shape."""
    if not isinstance(data, bytes):
        raise Rejected("not a byte string")
    if len(data) > announcement_limit(prefix):
        raise Rejected("longer than a token key")
    try:
        data.decode()
    except UnicodeDecodeError:
        raise Rejected("not UTF-8") from None
    if _key_shape(prefix).fullmatch(data) is None:
        raise Rejected("not a token key")
    return data.decode("ascii")


# -- sealing ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Sealed:
    """What a sealed blob holds."""

    grant: Grant
    fence: int


def _aad(token_key: str, fence: int) -> bytes:
    return f"imsd fleet token\0{token_key}\0{fence}".encode()


def seal(key: bytes, token_key: str, fence: int, grant: Grant, nonce: bytes | None = None) -> bytes:
    """*grant* (its rotated refresh token included) encrypted for *token_key* at *fence*."""
    body = {
        "access_token": grant.access_token.reveal(),
        "token_type": grant.token_type,
        "issued_at": grant.issued_at,
        "expires_at": grant.expires_at,
        "refresh_token": grant.refresh_token.reveal() if grant.refresh_token else None,
    }
    nonce = os.urandom(_NONCE) if nonce is None else nonce
    ct = AESGCM(key).encrypt(nonce, json.dumps(body).encode(), _aad(token_key, fence))
    return _HEADER.pack(_VERSION, fence) + nonce + ct


def open_sealed(key: bytes, token_key: str, blob: bytes) -> Sealed:
    """The grant in *blob*; :class:`Tampered` if it is not ours, was altered, or moved."""
    if len(blob) < _HEADER.size + _NONCE + 16:
        raise Tampered("sealed token too short")
    version, fence = _HEADER.unpack_from(blob)
    if version != _VERSION:
        raise Tampered(f"sealed token version {version}")
    nonce = blob[_HEADER.size : _HEADER.size + _NONCE]
    try:
        plain = AESGCM(key).decrypt(nonce, blob[_HEADER.size + _NONCE :], _aad(token_key, fence))
        body = json.loads(plain)
        rt = body["refresh_token"]
        grant = Grant(
            access_token=Secret(str(body["access_token"])),
            token_type=str(body["token_type"]),
            issued_at=float(body["issued_at"]),
            expires_at=float(body["expires_at"]),
            refresh_token=Secret(str(rt)) if rt else None,
        )
    except InvalidTag:
        raise Tampered("sealed token does not open under this credential's key") from None
    except (ValueError, KeyError, TypeError):
        raise Tampered("sealed token holds no token") from None
    return Sealed(grant, fence)


# -- decisions --------------------------------------------------------------------------------


def adoptable(ours: Grant | None, shared: Grant | None, now: float) -> bool:
    """Take *shared* instead of fetching: it is newer than ours and still valid. (A shared
    token inside its margin is still better than none; the fetch that follows finds it is
    due and takes the lease or waits for the holder.)"""
    if shared is None or shared.expires_at <= now:
        return False
    return ours is None or shared.issued_at > ours.issued_at


def may_fall_back(cred: Credential) -> bool:
    """Mint locally while Redis is down? Never for a rotating chain (it would fork)."""
    return cred.auth in FALLBACK_AUTHS


def deferred(rec: Record, identity: str, until: float, now: float) -> Step:
    """The fetch found another node holding the lease: no IMS request, no failure counted;
    look again at *until* (the holder's publish usually comes first)."""
    rec = replace(rec, fetching=None)
    if rec.credential is None or rec.credential.identity != identity:
        return replace(rec, due=now), (Fetch(),)  # changed meanwhile: fetch
    return replace(rec, due=until), ()


# -- scripts ----------------------------------------------------------------------------------

#: KEYS: lease, fence. ARGV: node id, lease ms. Take the lease (a new fence) or renew our own.
#: Returns {fence, holder}: fence 0 when another node (holder) has it. A new fence is at least
#: Redis's clock in milliseconds: a Redis restarted empty (counter gone) still hands out fences
#: above any from its previous life, so a holder stalled across the restart stays fenced out.
ACQUIRE: Final = """
if redis.replicate_commands then redis.replicate_commands() end
local cur = redis.call('GET', KEYS[1])
if cur then
  local node, fence = string.match(cur, '^(.*):(%d+)$')
  if node == ARGV[1] then
    redis.call('PEXPIRE', KEYS[1], ARGV[2])
    return {tonumber(fence), cur}
  end
  return {0, cur}
end
local fence = redis.call('INCR', KEYS[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if fence < now then
  fence = now
  redis.call('SET', KEYS[2], string.format('%d', fence))
end
local value = ARGV[1] .. ':' .. string.format('%d', fence)
redis.call('SET', KEYS[1], value, 'NX', 'PX', ARGV[2])
return {fence, value}
"""

#: KEYS: lease. ARGV: "<node>:<fence>", lease ms. Compare-and-set renewal: 1 if still ours.
RENEW: Final = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""

#: KEYS: lease. ARGV: "<node>:<fence>". Give the lease up if it is still ours (a failed fetch:
#: another node, perhaps with a newer link of a rotating chain, may then take over).
RELEASE: Final = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""

#: KEYS: fence, token. ARGV: fence, blob, ttl ms, channel. The fenced write: refused (0)
#: unless the writer's fence is the current one; then the token is stored and announced.
PUBLISH: Final = """
local cur = tonumber(redis.call('GET', KEYS[1]) or '0')
if cur ~= tonumber(ARGV[1]) then
  return 0
end
redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3])
redis.call('PUBLISH', ARGV[4], KEYS[2])
return 1
"""
