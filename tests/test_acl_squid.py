"""Differential test: the same squid.conf rules in a real Squid and in Relais (which imports the
conf's acl/http_access lines through the `policy` option), the same requests, the same answers.

Every case is classified as allow (anything but 403/407), deny (403) or auth (407) on both sides.
Only loopback addresses are used; clients pick their source address with curl --interface.
Squid must be built with OpenSSL (Debian's squid-openssl) for the ssl::server_name* acls.
"""
from __future__ import annotations

import datetime as dt
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from harness import Origin, Proxy, free_port, stop_group, write_htpasswd
from squid import SQUID, common_conf, start_squid

DAYS = "MTWHFAS"  # datetime.weekday() -> Squid's day letter


def conf(tmp: Path, sport: int, rport: int, oport: int) -> str:
    today = DAYS[dt.datetime.now().weekday()]
    other = DAYS[(dt.datetime.now().weekday() + 3) % 7]
    return f"""
# --- squid-only settings (Relais ignores everything but acl/http_access/ssl_bump) ---
http_port 127.0.0.1:{sport} name=regular
{common_conf(tmp)}
cache deny all
dns_timeout 1 seconds
dns_retransmit_interval 1 seconds
auth_param basic program /usr/lib/squid/basic_ncsa_auth {tmp}/users
auth_param basic realm relais-diff

# --- the rules both proxies apply ---
acl Safe_ports port 80 21 443 1025-65535
acl SSL_ports port 443
acl origin_port port {oport}
acl lan2 src 127.0.0.2
acl lan34 src 127.0.0.3-127.0.0.4
acl lan6 src 127.0.0.6/255.255.255.255
acl lan7 src 127.0.0.7/32 ::1
# one acl over several lines; Squid skips the comment and empty lines inside it
acl split src 127.0.0.21 \\
# 127.0.0.22 \\

    127.0.0.23
acl bad_dst dst 127.0.0.9
acl local_dst dst 127.0.0.0/8
acl blocked dstdomain .blocked.test exact.test
acl rx dstdom_regex -i ^www[0-9]+\\.regex\\.test$
acl url_rx url_regex -i \\.exe$
acl url_q url_regex [?&]block=1
acl path_rx urlpath_regex ^/private/
acl path_cs urlpath_regex ^/CaseSens
acl rw method PUT DELETE
acl purge method PURGE
acl http proto HTTP
acl today time {today}
acl otherday time {other} 00:00-23:59
acl night time 00:00-00:00
acl bot browser -i ^evilbot
acl hdr req_header X-Block -i ^yes$
acl users proxy_auth REQUIRED
acl admins proxy_auth alice
acl authpath urlpath_regex ^/auth/
acl adminpath urlpath_regex ^/auth/admin
acl busy maxconn 1
acl sni dstdomain .sni.test
acl portname myportname regular
acl lport localport {sport} {rport}
acl tls_ok ssl::server_name .tls-ok.test
acl tls_no ssl::server_name .no.tls-ok.test exact.tls-ok.test
acl tls_loc ssl::server_name --client-requested localhost
acl tls_srv ssl::server_name --server-provided .tls-ok.test
acl tls_none ssl::server_name --server-provided none
acl port8444 port 8444
acl tls_ip ssl::server_name 127.0.0.1
acl tls_rx ssl::server_name_regex -i ^api[0-9]+\\.tlsrx\\.test$
acl tls_rx_cs ssl::server_name_regex ^CASE\\.tlsrx\\.test$ ^lower\\.tlsrx\\.test$
acl tlspath urlpath_regex ^/tlsip
acl up_cs dstdom_regex ^LOCALHOST$
acl up_path urlpath_regex ^/up
acl url_cs url_regex ^http://LOCALHOST:[0-9]+/urlcs
acl url_lc url_regex ^http://localhost:[0-9]+/urllc
acl ref referer_regex -i ^https?://bad\\.ref\\.test/
acl uname proxy_auth_regex -i ^AL
acl rxpath urlpath_regex ^/rxauth/
acl rxpath403 urlpath_regex ^/rxauth403/

http_access deny !Safe_ports
http_access deny CONNECT sni
http_access deny tls_no
http_access allow CONNECT tls_rx
http_access allow CONNECT tls_rx_cs
http_access deny CONNECT tls_loc
http_access deny CONNECT tls_srv
http_access deny CONNECT tls_none port8444
http_access allow CONNECT tls_ok
http_access deny tls_ip tlspath
http_access deny up_cs up_path
http_access deny url_cs
http_access deny url_lc
http_access allow CONNECT origin_port
http_access deny CONNECT !SSL_ports
http_access deny blocked
http_access deny rx
http_access deny url_rx
http_access deny url_q
http_access deny bad_dst
http_access deny lan2 path_rx
http_access deny path_cs
http_access deny rw !lan34
http_access deny purge !localhost
http_access deny bot
http_access deny hdr
http_access deny busy
http_access deny otherday
http_access deny night
http_access deny lan6 today
http_access deny lan7
http_access deny split
http_access deny adminpath !admins
http_access deny ref
http_access deny rxpath !uname
http_access deny rxpath403 !uname all
http_access allow rxpath
http_access allow rxpath403
http_access allow authpath users
http_access allow portname local_dst lport http
http_access deny all
"""


# (name, curl args, source address or None). URLs use {o} for the origin's port.
CASES = [
    ("plain allowed", ["http://127.0.0.1:{o}/ok"], None),
    ("localhost resolves into dst", ["http://localhost:{o}/ok"], None),
    ("port 22 not safe", ["http://127.0.0.1:22/"], None),
    ("port 70 not safe", ["http://127.0.0.1:70/"], None),
    ("port 1024 not safe", ["http://localhost:1024/"], None),
    ("port 1025 safe (refused upstream)", ["http://localhost:1025/"], None),
    ("port 21 safe (refused upstream)", ["http://127.0.0.1:21/"], None),
    ("dst denied", ["http://127.0.0.9:{o}/"], None),
    ("dstdomain subdomain", ["http://www.blocked.test/"], None),
    ("dstdomain the domain itself", ["http://blocked.test/x"], None),
    ("dstdomain exact", ["http://exact.test/"], None),
    ("dstdomain exact: not its subdomain", ["http://sub.exact.test/"], None),
    ("dstdom_regex", ["http://www12.regex.test/"], None),
    ("dstdom_regex -i", ["http://WWW7.REGEX.TEST/"], None),
    ("dstdom_regex no match", ["http://www.regex.test/"], None),
    ("url_regex -i", ["http://127.0.0.1:{o}/setup.EXE"], None),
    ("url_regex query", ["http://127.0.0.1:{o}/q?a=2&block=1"], None),
    ("url_regex no match", ["http://127.0.0.1:{o}/q?a=2&block=2"], None),
    ("urlpath_regex + src", ["http://127.0.0.1:{o}/private/x"], "127.0.0.2"),
    ("urlpath_regex other src", ["http://127.0.0.1:{o}/private/x"], None),
    ("urlpath_regex case-sensitive", ["http://127.0.0.1:{o}/CaseSens"], None),
    ("urlpath_regex case differs", ["http://127.0.0.1:{o}/casesens"], None),
    ("method PUT", ["-X", "PUT", "http://127.0.0.1:{o}/put"], None),
    ("method PUT from range", ["-X", "PUT", "http://127.0.0.1:{o}/put"], "127.0.0.3"),
    ("method DELETE from range end", ["-X", "DELETE", "http://127.0.0.1:{o}/del"], "127.0.0.4"),
    ("method DELETE outside range", ["-X", "DELETE", "http://127.0.0.1:{o}/del"], "127.0.0.5"),
    ("method POST", ["-d", "x=1", "http://127.0.0.1:{o}/post"], None),
    ("PURGE from localhost", ["-X", "PURGE", "http://127.0.0.1:{o}/p"], None),
    ("PURGE from elsewhere", ["-X", "PURGE", "http://127.0.0.1:{o}/p"], "127.0.0.5"),
    ("browser -i", ["-A", "EvilBot/1.0", "http://127.0.0.1:{o}/ua"], None),
    ("browser no match", ["-A", "GoodBot/1.0 evilbot", "http://127.0.0.1:{o}/ua"], None),
    ("req_header -i", ["-H", "X-Block: YES", "http://127.0.0.1:{o}/h"], None),
    ("req_header no match", ["-H", "X-Block: yes please", "http://127.0.0.1:{o}/h"], None),
    ("time today + src mask", ["http://127.0.0.1:{o}/t"], "127.0.0.6"),
    ("acl continued: first line", ["http://127.0.0.1:{o}/c"], "127.0.0.21"),
    ("acl continued: commented out", ["http://127.0.0.1:{o}/c"], "127.0.0.22"),
    ("acl continued: after a comment and an empty line", ["http://127.0.0.1:{o}/c"], "127.0.0.23"),
    ("src /32", ["http://127.0.0.1:{o}/t"], "127.0.0.7"),
    ("src not listed", ["http://127.0.0.1:{o}/t"], "127.0.0.8"),
    ("auth: no credentials", ["http://127.0.0.1:{o}/auth/x"], None),
    ("auth: user", ["-U", "bob:bpw", "http://127.0.0.1:{o}/auth/x"], None),
    ("auth: wrong password", ["-U", "bob:nope", "http://127.0.0.1:{o}/auth/x"], None),
    ("auth: admin path, plain user", ["-U", "bob:bpw", "http://127.0.0.1:{o}/auth/admin"], None),
    ("auth: admin path, admin", ["-U", "alice:apw", "http://127.0.0.1:{o}/auth/admin"], None),
    ("auth: admin path, no credentials", ["http://127.0.0.1:{o}/auth/admin"], None),
    ("auth not needed elsewhere", ["-U", "bob:nope", "http://127.0.0.1:{o}/free"], None),
    ("CONNECT to the origin port", ["-p", "http://127.0.0.1:{o}/c"], None),
    ("CONNECT to a non-SSL port", ["-p", "http://127.0.0.1:8443/c"], None),
    ("CONNECT by dstdomain", ["-p", "http://www.sni.test:443/c"], None),
    ("CONNECT to 443 reaches proto/dst rules", ["-p", "http://127.0.0.1:443/c"], None),
    ("CONNECT name to 443 without DNS", ["-p", "http://nowhere.test:443/c"], None),
    # ssl::server_name without bumping: the CONNECT host (URL host for plain HTTP), dstdomain syntax.
    # Names that do not resolve: an allowed CONNECT fails upstream (500/503), a denied one is 403.
    ("ssl::server_name allows CONNECT to a non-SSL port", ["-p", "http://www.tls-ok.test:8443/c"], None),
    ("ssl::server_name: the domain itself", ["-p", "http://tls-ok.test:8443/c"], None),
    ("ssl::server_name: not a lookalike", ["-p", "http://www.tls-ok.test.evil:8443/c"], None),
    ("ssl::server_name denies a subdomain", ["-p", "http://a.b.no.tls-ok.test:8443/c"], None),
    ("ssl::server_name exact", ["-p", "http://exact.tls-ok.test:8443/c"], None),
    ("ssl::server_name exact: not its subdomain", ["-p", "http://www.exact.tls-ok.test:8443/c"], None),
    ("ssl::server_name --client-requested by name", ["-p", "http://localhost:{o}/c"], None),
    ("ssl::server_name --client-requested other name", ["-p", "http://127.0.0.1:{o}/c"], None),
    ("ssl::server_name --server-provided: no certificate, 'none'", ["-p", "http://www.tls-ok.test:8444/c"], None),
    ("ssl::server_name on a plain HTTP URL host", ["http://127.0.0.1:{o}/tlsip"], None),
    ("ssl::server_name on a plain HTTP URL host: other name", ["http://localhost:{o}/tlsip"], None),
    ("ssl::server_name_regex -i", ["-p", "http://API12.tlsrx.test:8443/c"], None),
    ("ssl::server_name_regex no match", ["-p", "http://api.tlsrx.test:8443/c"], None),
    ("ssl::server_name_regex sees the host lowercased", ["-p", "http://CASE.tlsrx.test:8443/c"], None),
    ("ssl::server_name_regex case differs", ["-p", "http://case.tlsrx.test:8443/c"], None),
    ("ssl::server_name_regex: lower-case pattern, upper-case host", ["-p", "http://LOWER.tlsrx.test:8443/c"], None),
    # Squid lowercases the URL host: case-sensitive host regexes see it in lower case
    ("dstdom_regex on the lowercased host", ["http://LOCALHOST:{o}/up"], None),
    ("url_regex on the lowercased host", ["http://LOCALHOST:{o}/urlcs"], None),
    ("url_regex on the lowercased host: lower-case pattern", ["http://LOCALHOST:{o}/urllc"], None),
    ("referer_regex -i", ["-e", "HTTP://BAD.ref.test/page", "http://127.0.0.1:{o}/ref"], None),
    ("referer_regex no match", ["-e", "http://good.test/?u=http://bad.ref.test/", "http://127.0.0.1:{o}/ref"], None),
    ("proxy_auth_regex -i", ["-U", "alice:apw", "http://127.0.0.1:{o}/rxauth/x"], None),
    ("proxy_auth_regex no match: 407", ["-U", "bob:bpw", "http://127.0.0.1:{o}/rxauth/x"], None),
    ("proxy_auth_regex no credentials", ["http://127.0.0.1:{o}/rxauth/x"], None),
    ("proxy_auth_regex then all: 403", ["-U", "bob:bpw", "http://127.0.0.1:{o}/rxauth403/x"], None),
    ("proxy_auth_regex then all, matching user", ["-U", "alice:apw", "http://127.0.0.1:{o}/rxauth403/x"], None),
]


def outcome(status: int) -> str:
    return {403: "deny", 407: "auth"}.get(status, "allow")


def ask(proxy_port: int, args: list[str], src: str | None, oport: int) -> int:
    args = [a.replace("{o}", str(oport)) for a in args]
    connect = "-p" in args
    cmd = ["curl", "-s", "-o", "/dev/null", "--max-time", "15", "-x", f"http://127.0.0.1:{proxy_port}",
           "-w", "%{http_connect}" if connect else "%{http_code}", *args]
    if src:
        cmd[1:1] = ["--interface", src]
    r = subprocess.run(cmd, capture_output=True, timeout=30)
    return int(r.stdout or 0)


@pytest.fixture(scope="module")
def proxies(tmp_path_factory):
    assert os.geteuid() == 0, "the Squid differential test runs Squid as root (cache_effective_user proxy)"
    version = subprocess.run([SQUID, "-v"], capture_output=True, text=True).stdout
    assert "--with-openssl" in version, "the ssl::* acls need Squid built with OpenSSL: apt-get install squid-openssl"
    origin = Origin()
    tmp = Path(tempfile.mkdtemp(prefix="relais-squid-"))  # readable by the proxy user, unlike pytest's tmp
    os.chmod(tmp, 0o755)
    write_htpasswd(tmp / "users", {"alice": "apw", "bob": "bpw"})
    squid = relais = None
    try:
        # A free port may be taken by another process before Squid or Relais binds it: then the one that
        # could not bind exits, and both start again on new ports (the conf names both).
        for attempt in range(3):
            sport, rport = free_port(), free_port()
            try:
                squid = start_squid(tmp, conf(tmp, sport, rport, origin.port), sport)
                relais = Proxy(tmp_path_factory.mktemp("relais"), ports=[rport],
                               options={"policy": str(tmp / "squid.conf"), "proxyauth": f"@{tmp / 'users'}"})
                break
            except Exception as e:
                if squid:
                    stop_group(squid)
                if attempt == 2 or "address already in use" not in str(e).lower():
                    raise
        yield sport, rport, origin.port
    finally:
        if relais:
            relais.stop()
        if squid:
            stop_group(squid)
        origin.close()
        shutil.rmtree(tmp, ignore_errors=True)


def test_at_least_forty_cases_over_all_acl_types():
    assert len(CASES) + 2 >= 40  # +2: the maxconn cases below
    text = conf(Path("/tmp"), 1, 2, 3)
    used = {line.split()[2] for line in text.splitlines() if line.startswith("acl ")}
    # `all` is no acl type in Squid ("FATAL: Invalid ACL type 'all'"): it is the predefined `acl all src
    # all`, which the rules name explicitly (and not only as the last line).
    rules = [line.split()[2:] for line in text.splitlines() if line.startswith("http_access ")]
    if any("all" in names for names in rules[:-1]):
        used.add("all")
    from addons.aclrules import TYPES
    # the ssl::* acls need Squid built with OpenSSL (Debian's squid-openssl, which run.sh installs)
    missing = set(TYPES) - used
    assert not missing, f"acl types without a differential case: {missing}"


def test_same_answers_as_squid(proxies):
    sport, rport, oport = proxies
    diffs, seen = [], []
    for name, args, src in CASES:
        t0 = time.monotonic()
        s = ask(sport, args, src, oport)
        t1 = time.monotonic()
        r = ask(rport, args, src, oport)
        print(f"{name}: squid {s} ({t1 - t0:.2f}s) relais {r} ({time.monotonic() - t1:.2f}s)")
        seen.append((name, s, r))
        if outcome(s) != outcome(r):
            diffs.append(f"{name}: squid {s} relais {r}")
    kinds = {outcome(s) for _, s, _ in seen}
    assert kinds == {"allow", "deny", "auth"}, seen  # the cases exercise every answer
    assert not diffs, "\n".join(diffs)


def test_maxconn_same_as_squid(proxies):
    sport, rport, oport = proxies
    for port in (sport, rport):
        idle = socket.socket()
        idle.bind(("127.0.0.11", 0))
        idle.connect(("127.0.0.1", port))
        time.sleep(0.3)
        try:
            busy = ask(port, ["http://127.0.0.1:{o}/busy"], "127.0.0.11", oport)
        finally:
            idle.close()
        end = time.monotonic() + 5  # each proxy notices the closed connection in its own time
        while True:
            calm = ask(port, ["http://127.0.0.1:{o}/calm"], "127.0.0.11", oport)
            if outcome(calm) == "allow" or time.monotonic() >= end:
                break
            time.sleep(0.2)
        assert (outcome(busy), outcome(calm)) == ("deny", "allow"), (port, busy, calm)
