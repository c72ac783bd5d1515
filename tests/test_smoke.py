from harness import curl


def test_plain_http_is_relayed_and_logged(proxy, origin):
    r = curl("-x", proxy.url, f"{origin.url}/hello")
    assert r.stdout == b"hello /hello"
    line = proxy.log_line("/hello")
    assert " TCP_MISS/200 " in line and f"GET {origin.url}/hello - HIER_DIRECT/127.0.0.1 text/plain" in line
