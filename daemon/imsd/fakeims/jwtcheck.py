"""The fake IMS's check of a legacy JWT exchange assertion (pure: token and binding in, claims
or an IMS error out).

It follows the documented ``/ims/exchange/jwt`` error table (reference/ims-protocol.md §2):
``invalid_token`` (undecodable, expired, ``exp``/``jti`` of the wrong type), ``invalid_signature``
(no registered key verifies it, or not RS256), ``invalid_jti`` (required and missing, or
replayed), ``invalid_scope`` (metascopes absent or not a subset of the binding's),
``bad_request`` (``iss``/``sub`` not those of the binding) and ``invalid_client`` (``aud`` does
not name the client, or names another IMS environment: documented as ``400 invalid_client``).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey

__all__ = ["Binding", "Refused", "check_assertion"]


class Refused(ValueError):
    """A refused assertion: ``code`` is the IMS error code, ``str()`` its description."""

    def __init__(self, code: str, description: str) -> None:
        self.code = code
        super().__init__(description)


@dataclass(frozen=True, slots=True)
class Binding:
    """What IMS knows about a JWT client: its certificates' keys, org, technical account and
    the metascopes it may ask for."""

    client_id: str
    org_id: str
    technical_account_id: str
    keys: Sequence[RSAPublicKey]
    metascopes: Collection[str]
    require_jti: bool = False


def _header_alg(token: str) -> str:
    try:
        header = jwt.get_unverified_header(token)
    except jwt.DecodeError:
        raise Refused("invalid_token", "the JWT cannot be decoded") from None
    alg = header.get("alg")
    return alg if isinstance(alg, str) else ""


def _verified(token: str, keys: Sequence[RSAPublicKey]) -> dict[str, Any]:
    for key in keys:
        try:
            return jwt.decode(
                token, key, algorithms=["RS256"], options={"verify_exp": False, "verify_aud": False}
            )
        except jwt.InvalidSignatureError:
            continue
        except jwt.DecodeError:
            raise Refused("invalid_token", "the JWT cannot be decoded") from None
    raise Refused(
        "invalid_signature", "the JWT signature does not match any certificate of the binding"
    )


def check_assertion(
    token: str, binding: Binding, *, origin: str | None, now: float, seen_jti: set[str]
) -> dict[str, Any]:
    """The verified claims, or :class:`Refused`. *origin* is the IMS base URL the
    client called (the ``aud`` and metascope prefix); None accepts the one ``aud`` names.
    A valid assertion's ``jti`` is added to *seen_jti*."""
    if not token:
        raise Refused("invalid_token", "jwt_token is missing")
    if _header_alg(token) != "RS256":
        raise Refused("invalid_signature", "the JWT must be signed with RS256")
    claims = _verified(token, binding.keys)
    exp = claims.get("exp")
    if not isinstance(exp, int) or isinstance(exp, bool):
        raise Refused("invalid_token", "exp must be an integer")
    if exp <= now:
        raise Refused("invalid_token", "the JWT has expired")
    jti = claims.get("jti")
    if jti is not None and not isinstance(jti, str | int):
        raise Refused("invalid_token", "jti must be a string or an integer")
    if jti is None and binding.require_jti:
        raise Refused("invalid_jti", "the binding requires a jti")
    if jti is not None and str(jti) in seen_jti:
        raise Refused("invalid_jti", "the jti was already used")
    if claims.get("iss") != binding.org_id:
        raise Refused("bad_request", "iss is not the client's organization")
    if claims.get("sub") != binding.technical_account_id:
        raise Refused("bad_request", "sub is not the client's technical account")
    aud = claims.get("aud")
    suffix = f"/c/{binding.client_id}"
    if not isinstance(aud, str) or not aud.endswith(suffix):
        raise Refused("invalid_client", "aud is not {ims}/c/{client_id}")
    base = aud[: -len(suffix)]
    if origin is not None and base.rstrip("/") != origin.rstrip("/"):
        raise Refused("invalid_client", "aud names another IMS host")
    prefix = f"{base}/s/"
    asked = {k[len(prefix) :] for k, v in claims.items() if k.startswith(prefix) and v is True}
    if not asked:
        raise Refused("invalid_scope", "the JWT carries no metascope")
    if not asked <= set(binding.metascopes):
        raise Refused(
            "invalid_scope",
            "The metascopes in the JWT are not a subset of the metascopes in the binding.",
        )
    if jti is not None:
        seen_jti.add(str(jti))
    return claims
