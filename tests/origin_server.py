"""Run a loopback origin as a process (for network namespaces).

    origin_server.py HOST PORT [CERT KEY]   the harness Origin (HTTP, or HTTPS with CERT KEY)
    origin_server.py HOST PORT echo         a raw TCP server that answers each line with "echo: line"
"""
import socketserver
import sys
import time

from harness import Origin


class Echo(socketserver.StreamRequestHandler):
    def handle(self):
        for line in self.rfile:
            self.wfile.write(b"echo: " + line)


if __name__ == "__main__":
    host, port = sys.argv[1], int(sys.argv[2])
    if sys.argv[3:] == ["echo"]:
        server = socketserver.ThreadingTCPServer((host, port), Echo)
        server.daemon_threads = True
        import threading
        threading.Thread(target=server.serve_forever, daemon=True).start()
    else:
        tls = (sys.argv[3], sys.argv[4]) if len(sys.argv) > 4 else None
        o = Origin(tls=tls, host=host, port=port)
    print("ready", flush=True)
    end = time.monotonic() + 600  # never outlive a test run by much
    while time.monotonic() < end:
        time.sleep(1)
