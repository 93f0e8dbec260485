"""The legacy Service Account (JWT) assertion (pure: claims in, signed RS256 JWT out), for
the built-in ``jwt`` auth method.

Adobe ended JWT credentials on 30 Jun 2025 and converts the remaining ones to OAuth
Server-to-Server by 1 Mar 2026 (same client id, technical account and scopes), so loading
one logs :data:`DEPRECATION`. The assertion is short-lived (5 minutes) and fresh for every
exchange, with a random ``jti`` so a replayed assertion is refused.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from typing import Any, Final

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey

__all__ = [
    "ASSERTION_TTL",
    "DEPRECATION",
    "PrivateKeyError",
    "assertion_claims",
    "load_key",
    "sign",
]

ASSERTION_TTL: Final = 300
DEPRECATION: Final = (
    "JWT (Service Account) credentials reached end of life on 2025-06-30 and Adobe converts "
    "them to OAuth Server-to-Server by 2026-03-01; migrate: create the OAuth Server-to-Server "
    "credential in the Developer Console (same client id and scopes) and set "
    'auth = "oauth_server_to_server" with its client secret'
)


class PrivateKeyError(ValueError):
    """The private key cannot be used; the message never contains key material."""


def load_key(pem: bytes, passphrase: bytes | None = None) -> RSAPrivateKey:
    try:
        key = serialization.load_pem_private_key(pem, password=passphrase)
    except TypeError:
        raise PrivateKeyError(
            "the private key is encrypted: set private_key_passphrase_file"
        ) from None
    except ValueError:
        raise PrivateKeyError("not a PEM private key, or wrong passphrase") from None
    if not isinstance(key, RSAPrivateKey):
        raise PrivateKeyError("the private key must be RSA (RS256)")
    return key


def assertion_claims(
    *,
    client_id: str,
    org_id: str,
    technical_account_id: str,
    metascopes: Sequence[str],
    ims_url: str,
    now: float,
    ttl: int = ASSERTION_TTL,
    jti: str | None = None,
) -> dict[str, Any]:
    base = ims_url.rstrip("/")
    claims: dict[str, Any] = {
        "exp": int(now) + ttl,
        "iss": org_id,
        "sub": technical_account_id,
        "aud": f"{base}/c/{client_id}",
        "jti": jti or secrets.token_hex(16),
    }
    for scope in metascopes:
        claims[f"{base}/s/{scope}"] = True
    return claims


def sign(claims: dict[str, Any], key: RSAPrivateKey) -> str:
    return jwt.encode(claims, key, algorithm="RS256")
