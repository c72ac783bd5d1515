"""The README's options table is the addons' own option list.

    python tests/test_readme.py --write    rewrites the table from the addons
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
START, END = "<!-- options:start -->", "<!-- options:end -->"


class Recorder:
    """Stands in for mitmproxy's addon loader and records add_option calls."""

    def __init__(self):
        self.options: list[tuple[str, object, str]] = []

    def add_option(self, name, typespec, default, help, choices=None):
        self.options.append((name, default, help))

    def add_command(self, *args, **kwargs):
        pass


def show(value) -> str:
    if isinstance(value, bool):
        return "`true`" if value else "`false`"
    if value is None or value == "":
        return "(none)"
    if isinstance(value, (list, tuple)):
        return ", ".join(f"`{v}`" for v in value) or "(none)"
    return f"`{value}`"


def table() -> str:
    from addons import all as suite
    rows = ["| addon | option | default | meaning |", "|---|---|---|---|"]
    for addon in suite.pipeline:
        rec = Recorder()
        if hasattr(addon, "load"):
            addon.load(rec)
            if hasattr(addon, "done"):  # undoes what load did to mitmproxy itself (interim, cache's recover)
                addon.done()
        module = type(addon).__module__.rsplit(".", 1)[-1]
        for name, default, help in rec.options:
            text = " ".join(help.split()).replace("|", "\\|")
            rows.append(f"| {module} | `{name}` | {show(default)} | {text} |")
    return "\n".join(rows)


def current() -> str:
    text = (ROOT / "README.md").read_text()
    return text[text.index(START) + len(START):text.index(END)].strip()


def test_readme_options_table_matches_the_addons():
    assert current() == table(), "README options table is stale: run `python tests/test_readme.py --write`"


def test_every_addon_of_the_suite_declares_its_options_with_help():
    from addons import all as suite
    for addon in suite.pipeline:
        rec = Recorder()
        if hasattr(addon, "load"):
            addon.load(rec)
        for name, _, help in rec.options:
            assert len(help.split()) >= 4, f"{name}: option help text too short"


if __name__ == "__main__" and "--write" in sys.argv:
    path = ROOT / "README.md"
    text = path.read_text()
    if START not in text:
        text = text.replace("OPTIONS-TABLE", f"{START}\n{END}")
    new = re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _: f"{START}\n{table()}\n{END}", text, flags=re.S)
    path.write_text(new)
    print("README options table written")


def test_readme_policy_addon_example_works(start_proxy, origin, tmp_path):
    """The 'Writing a policy addon' example, as printed, loaded beside the suite."""
    text = (ROOT / "README.md").read_text()
    code = text.split("## Writing a policy addon", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    script = tmp_path / "no_big_uploads.py"
    script.write_text(code)
    from harness import curl
    proxy = start_proxy(args=["-s", str(script)])
    small = curl("-x", proxy.url, "-d", "a=b", f"{origin.url}/upload")
    assert small.stdout == b"hello /upload"
    big = curl("-i", "-x", proxy.url, "--data-binary", "@-", f"{origin.url}/upload-big",
               input_bytes=b"x" * 1_100_000)
    assert b"HTTP/1.1 403 Forbidden\r\n" in big.stdout and b"uploads are limited to 1 MB" in big.stdout
    assert "/upload-big" not in origin.hits
    assert " TCP_DENIED/403 " in proxy.log_line("/upload-big")
