"""A fast loopback origin for the benchmark (its own process): asyncio, HTTP/1.1 keep-alive.

    python fast_origin.py PORT
GET /size/N?h.Name=value... -> N bytes of 'x' with the given extra headers, one write per response.
"""
import asyncio
import sys
from urllib.parse import parse_qsl, urlsplit


async def handle(reader, writer):
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            line = head.split(b"\r\n", 1)[0].decode("latin-1")
            method, target, _ = line.split(" ", 2)
            u = urlsplit(target)
            parts = u.path.strip("/").split("/")
            n = int(parts[1]) if parts[0] == "size" and len(parts) > 1 else 5
            extra = "".join(f"{k[2:]}: {v}\r\n" for k, v in parse_qsl(u.query) if k.startswith("h."))
            body = b"x" * n
            writer.write((f"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                          f"Content-Length: {n}\r\n{extra}\r\n").encode() + (body if method != "HEAD" else b""))
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError, ValueError):
        pass
    finally:
        writer.close()


async def main(port: int):
    server = await asyncio.start_server(handle, "127.0.0.1", port)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1])))
