"""Test-only stand-in for the access-control addon: `X-Test-Acls: a, b` on a
request becomes flow.metadata["relais.acls"] = ["a", "b"] (the header is
dropped), and the level anonymize chose comes back in the response header
X-Test-Anonymize. Load it before addons/anonymize.py."""
from mitmproxy import http


class SetAcls:
    def requestheaders(self, flow: http.HTTPFlow) -> None:
        value = flow.request.headers.pop("X-Test-Acls", None)
        if value is not None:
            flow.metadata["relais.acls"] = [v.strip() for v in value.split(",") if v.strip()]

    def response(self, flow: http.HTTPFlow) -> None:
        level = flow.metadata.get("relais.anonymize")
        if level:
            flow.response.headers["X-Test-Anonymize"] = level


addons = [SetAcls()]
