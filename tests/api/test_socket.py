"""The listening socket: connections it accepts get TCP_NODELAY.

Without it a keep-alive response whose head and body are written separately waits
for the client's delayed ACK (~40 ms per request); asyncio only sets the option
on accepted sockets whose protocol says TCP, so the socket `inferd serve` binds
must be created with IPPROTO_TCP.
"""

from __future__ import annotations

import asyncio
import socket

from inferd.api.server import _bind


def test_accepted_connections_have_tcp_nodelay():
    async def main() -> int:
        accepted = asyncio.get_running_loop().create_future()

        async def on_client(reader, writer):
            sock = writer.get_extra_info("socket")
            accepted.set_result(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            writer.close()

        sock = _bind("127.0.0.1", 0)
        server = await asyncio.start_server(on_client, sock=sock)
        port = sock.getsockname()[1]
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        value = await asyncio.wait_for(accepted, 5)
        writer.close()
        server.close()
        await server.wait_closed()
        return value

    assert asyncio.run(main()) != 0
