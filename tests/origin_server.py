"""Run a harness Origin as a process (for network namespaces): origin_server.py HOST PORT [CERT KEY]."""
import sys
import time

from harness import Origin

if __name__ == "__main__":
    host, port = sys.argv[1], int(sys.argv[2])
    tls = (sys.argv[3], sys.argv[4]) if len(sys.argv) > 4 else None
    o = Origin(tls=tls, host=host, port=port)
    print("ready", flush=True)
    end = time.monotonic() + 600  # never outlive a test run by much
    while time.monotonic() < end:
        time.sleep(1)
