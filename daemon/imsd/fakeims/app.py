"""HTTP routing of the fake IMS and the fake API gateway (a handler for
:class:`imsd.httpserver.HttpServer`).

IMS endpoints accept their parameters as ``application/x-www-form-urlencoded`` or
``multipart/form-data`` bodies, in the query string, and client credentials as HTTP Basic,
with or without a trailing slash. ``/gateway/PRODUCT/...`` plays Adobe's API gateways, as
their documentation describes them (:mod:`imsd.fakeims.gateway`). ``/_fake/...`` lets another
process drive the test controls.
"""

from __future__ import annotations

import base64
import binascii
import email.parser
import email.policy
import functools
import json
import secrets
import zlib
from typing import Final
from urllib.parse import parse_qsl

import anyio

from imsd.fakeims import authorize, discovery, gateway
from imsd.fakeims.state import FakeImsState, Profile
from imsd.httpserver import AbortConnection, Request, Response

__all__ = ["DRIP_HEADER", "FakeImsApp", "gzip_bomb"]

_TOKEN_PATHS: Final = frozenset(
    {"/ims/token/v3", "/ims/token/v2", "/ims/token/v1", "/ims/token", "/ims/exchange/jwt"}
)
_JSON_UTF8: Final = "application/json;charset=UTF-8"
#: Marks an answer whose body the connection sends one byte per this many seconds.
DRIP_HEADER: Final = "x-fake-drip"


def _multipart(content_type: str, body: bytes) -> dict[str, str]:
    head = f"Content-Type: {content_type}\r\nMIME-Version: 1.0\r\n\r\n".encode()
    msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + body)
    out: dict[str, str] = {}
    if not msg.is_multipart():
        return out
    for part in msg.iter_parts():
        name = part.get_param("name", header="content-disposition")
        payload = part.get_payload(decode=True)
        if isinstance(name, str) and isinstance(payload, bytes):
            out[name] = payload.decode("utf-8", "replace")
    return out


@functools.cache
def gzip_bomb(mib: int = 100) -> bytes:
    """*mib* MiB of zeros, gzip-compressed (about a thousandth of that), 1 MiB at a time."""
    z = zlib.compressobj(9, zlib.DEFLATED, 31)  # wbits 31: the gzip container
    chunk = bytes(1 << 20)
    return b"".join([*(z.compress(chunk) for _ in range(mib)), z.flush()])


def params_of(req: Request) -> dict[str, str]:
    """Query string, then body, then Basic auth: later sources win."""
    params = {k: v[-1] for k, v in req.query.items()}
    ctype = (req.header("content-type") or "").lower()
    if ctype.startswith("multipart/form-data"):
        params.update(_multipart(req.header("content-type") or "", req.body))
    elif req.body:
        params.update(parse_qsl(req.body.decode("utf-8", "replace"), keep_blank_values=True))
    auth = req.header("authorization") or ""
    if auth[:6].lower() == "basic ":
        try:
            user, _, password = base64.b64decode(auth[6:], validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            pass
        else:
            params["client_id"], params["client_secret"] = user, password
    return params


class FakeImsApp:
    def __init__(self, state: FakeImsState) -> None:
        self.state = state

    async def handle(self, req: Request) -> Response:
        resp = await self._route(req)
        # IMS sends one with every answer (Adobe support asks for it): so does the fake.
        if req.path.startswith("/ims/") and not any(
            k.lower() == "x-debug-id" for k, _ in resp.headers
        ):
            resp.headers.append(("x-debug-id", secrets.token_hex(8)))
        return resp

    async def _route(self, req: Request) -> Response:
        path = req.path.rstrip("/") or "/"
        if path in _TOKEN_PATHS:
            return await self._token(req, path)
        if path == "/ims/validate_token/v1":
            return self._validate(req)
        if path.startswith("/ims/authorize/v2"):
            return authorize.handle(self.state, req, path)
        if path in discovery.PATHS:
            return discovery.handle(self.state, req, path)
        if path.startswith("/gateway/"):
            return gateway.handle(self.state, req, path)
        if path.startswith("/_fake/"):
            return self._control(req, path)
        if path == "/":
            return Response.json({"service": "imsd fake IMS", "clients": len(self.state.clients)})
        return Response.json({"error": "not_found", "error_description": path[:100]}, 404)

    async def _hang(self) -> None:
        """Wait out the hang switch; clearing it releases the answers already waiting, so a
        test can hold a request in flight for as long as it needs."""
        hang = self.state.hang_seconds()
        deadline = anyio.current_time() + hang
        while hang > 0 and (left := deadline - anyio.current_time()) > 0:
            await anyio.sleep(min(left, 0.05))
            hang = self.state.hang_seconds()

    async def _token(self, req: Request, path: str) -> Response:
        if req.method != "POST":
            return Response.json({"error": "invalid_request", "error_description": "use POST"}, 405)
        if self.state.take_reset():
            raise AbortConnection
        self.state.enter()
        try:
            await self._hang()
            if self.state.take_bomb():
                return self._dripping(
                    Response(
                        200,
                        gzip_bomb(),
                        [("Content-Type", _JSON_UTF8), ("Content-Encoding", "gzip")],
                    )
                )
            host = req.header("host")
            origin = f"http://{host}" if host else None
            status, body, headers = self.state.token_request(path, params_of(req), origin=origin)
        finally:
            self.state.leave()
        out = Response(
            status,
            (json.dumps(body) + "\n").encode(),
            [("Content-Type", _JSON_UTF8), ("x-debug-id", secrets.token_hex(8))],
        )
        out.headers.extend(headers.items())
        return self._dripping(out)

    def _dripping(self, resp: Response) -> Response:
        """Mark *resp* for the connection to drip (:mod:`imsd.fakeims.server`), when asked."""
        drip = self.state.drip_seconds()
        if drip > 0:
            resp.headers.append((DRIP_HEADER, f"{drip:g}"))
        return resp

    def _validate(self, req: Request) -> Response:
        params = params_of(req)
        auth = req.header("authorization") or ""
        token = auth[7:] if auth[:7].lower() == "bearer " else params.get("token", "")
        claims = self.state.validate_token(token)
        if claims is None:
            return Response.json({"valid": False, "reason": "bad_signature_or_expired"})
        expires = int(claims["created_at"]) + int(claims["expires_in"])
        return Response.json({"valid": True, "token": claims, "expires_at": expires})

    def _control(self, req: Request, path: str) -> Response:
        state = self.state
        if path == "/_fake/stats":
            with state._lock:
                log = [
                    {
                        "time": e.time,
                        "path": e.path,
                        "client_id": e.client_id,
                        "grant_type": e.grant_type,
                        "status": e.status,
                    }
                    for e in state.request_log
                ]
            return Response.json({"requests": len(log), "log": log})
        if req.method != "POST":
            return Response.json({"error": "invalid_request", "error_description": "use POST"}, 405)
        try:
            body = json.loads(req.body or b"{}")
            if path == "/_fake/clients":
                state.add_client(
                    body["client_id"],
                    secrets=body["secrets"],
                    scopes=body["scopes"],
                    org_id=body["org_id"],
                    lifetime=body.get("lifetime"),
                    public_keys=[k.encode() for k in body.get("public_keys", [])],
                    metascopes=body.get("metascopes", []),
                    profile=Profile.of(body["profile"]) if "profile" in body else None,
                )
            elif path == "/_fake/login":
                token = state.login(
                    body["client_id"], body.get("scopes", []), user_id=body.get("user_id", "")
                )
                return Response.json({"refresh_token": token})
            elif path == "/_fake/faults":
                state.fail_next(int(body.get("fail", 0)), int(body.get("status", 503)))
                state.throttle_next(int(body.get("throttle", 0)), float(body.get("retry_after", 1)))
                state.hang(float(body.get("hang", 0)))
                state.reset_next(int(body.get("reset", 0)))
                state.drip(float(body.get("drip", 0)))
                state.bomb_next(int(body.get("bomb", 0)))
            elif path == "/_fake/lifetime":
                state.token_lifetime = float(body["seconds"])
            else:
                return Response.json({"error": "not_found"}, 404)
        except (ValueError, KeyError, TypeError) as e:
            return Response.json(
                {"error": "invalid_request", "error_description": type(e).__name__}, 400
            )
        return Response.json({"ok": True})
