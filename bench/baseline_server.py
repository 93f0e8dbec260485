"""The socket benchmark's baseline: ``python -m bench.baseline_server SOCKET SIZE``, a raw
h11-on-anyio HTTP/1.1 server answering every request with a constant JSON body of SIZE bytes
(keep-alive), with none of imsd's routing, peer checks, store or metrics."""

from __future__ import annotations

import sys

import anyio
import anyio.abc
import h11


async def serve(path: str, size: int) -> None:
    body = b'{"x": "' + b"a" * max(0, size - 9) + b'"}'

    async def connection(stream: anyio.abc.ByteStream) -> None:
        conn = h11.Connection(h11.SERVER)
        async with stream:
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    try:
                        conn.receive_data(await stream.receive(65536))
                    except (anyio.EndOfStream, anyio.BrokenResourceError):
                        return
                    continue
                if isinstance(event, h11.EndOfMessage):
                    data = conn.send(
                        h11.Response(
                            status_code=200,
                            headers=[
                                ("Content-Type", "application/json"),
                                ("Content-Length", str(len(body))),
                            ],
                        )
                    )
                    data = (data or b"") + (conn.send(h11.Data(data=body)) or b"")
                    data += conn.send(h11.EndOfMessage()) or b""
                    await stream.send(data)
                    conn.start_next_cycle()
                elif isinstance(event, h11.ConnectionClosed):
                    return

    listener = await anyio.create_unix_listener(path)
    await listener.serve(connection)


if __name__ == "__main__":
    anyio.run(serve, sys.argv[1], int(sys.argv[2]))
