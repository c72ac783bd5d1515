"""A DNS server on 127.0.0.1 (UDP) for the tests: answers the names it is given, counts the queries.

    with DnsServer({"origin.test": (["127.0.0.1"], 300)}) as dns:
        ... dns.port ... dns.queries["origin.test", "A"]

Names it does not know get NXDOMAIN; names in `silent` get no answer at all (a name server
that times out), and so do (name, type) pairs in it: ("origin.test", "AAAA") for a server that
drops AAAA queries. Built on dnspython's message parsing, no other server needed.
"""
from __future__ import annotations

import socket
import threading
from collections import Counter

import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset


class DnsServer:
    def __init__(self, records: dict[str, tuple[list[str], int]], silent: set[str] = frozenset()):
        self.records = {name.lower().rstrip("."): value for name, value in records.items()}
        self.silent = {(s[0].lower().rstrip("."), s[1]) if isinstance(s, tuple) else s.lower().rstrip(".")
                       for s in silent}
        self.queries: Counter = Counter()  # (name, "A" | "AAAA" | ...) -> queries received
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.address = f"127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        self.sock.close()
        self.thread.join(5)

    def _run(self):
        while True:
            try:
                data, peer = self.sock.recvfrom(4096)
            except OSError:
                return
            try:
                reply = self._answer(dns.message.from_wire(data))
            except Exception:  # not a query we can read: a real server would drop it too
                continue
            if reply is not None:
                self.sock.sendto(reply.to_wire(), peer)

    def _answer(self, query: dns.message.Message):
        question = query.question[0]
        name = question.name.to_text().lower().rstrip(".")
        rdtype = dns.rdatatype.to_text(question.rdtype)
        self.queries[name, rdtype] += 1
        if name in self.silent or (name, rdtype) in self.silent:
            return None
        reply = dns.message.make_response(query)
        if name not in self.records:
            reply.set_rcode(dns.rcode.NXDOMAIN)
            return reply
        addresses, ttl = self.records[name]
        family = ":" if rdtype == "AAAA" else "."
        matching = [a for a in addresses if family in a] if rdtype in ("A", "AAAA") else []
        if matching:  # else: the name exists, with no record of that type (NOERROR, no answer)
            reply.answer.append(dns.rrset.from_text_list(question.name, ttl, "IN", rdtype, matching))
        return reply
