"""Bad conditions lose nothing and stop nothing: full disks under the cache and the log."""
from __future__ import annotations

import subprocess

import pytest

from harness import cache_rows, curl, fill_disk, wait_stored


@pytest.fixture
def tiny_disk(small_disk):
    """1 MB: a full disk is reached in a few requests."""
    return small_disk("1m")


def test_full_cache_disk_keeps_serving(start_proxy, origin, tiny_disk):
    proxy = start_proxy(options={"cache_dir": str(tiny_disk / "cache"), "cache_mem": "0",
                                 "maximum_object_size": "4 MB"})
    urls = [f"{origin.url}/size/{300_000 + i}?h.Cache-Control=max-age%3D600&n={i}" for i in range(8)]
    for rounds in range(2):
        for i, url in enumerate(urls):
            r = curl("-x", proxy.url, url)
            assert r.returncode == 0 and len(r.stdout) == 300_000 + i, (rounds, i, r.stderr)
    assert proxy.proc.poll() is None
    # whatever fitted is served from disk; what did not was fetched again, never served short
    assert all(origin.hits.get("/size/%d" % (300_000 + i), 0) in (1, 2) for i in range(8))
    lines = proxy.wait_lines("/size/", 16)
    assert len(lines) == 16 and all("/200 " in l for l in lines)


@pytest.mark.parametrize("stream", [None, "50k"], ids=["buffered", "streamed"])
def test_a_cache_disk_smaller_than_cache_dir_size_keeps_storing_new_objects(start_proxy, origin, small_disk, stream):
    """The file system has room for far less than cache_dir_size (3200 MB), and the access log shares
    it: the tier keeps to what fits, leaving room for the log, evicting its oldest objects, and the
    newest are stored and served from disk (streamed bodies too: copied to a temp file first)."""
    disk = small_disk("2m")
    cache, log = disk / "cache", disk / "access.log"
    proxy = start_proxy(options={"cache_dir": str(cache), "cache_mem": "0", "access_log": str(log),
                                 "stream_large_bodies": stream})
    urls = [f"{origin.url}/size/{100_000 + i}?n={i}&h.Cache-Control=max-age%3D600" for i in range(16)]
    for i, url in enumerate(urls):
        assert len(curl("-x", proxy.url, url).stdout) == 100_000 + i
        wait_stored(cache, f"?n={i}&")  # each new object stored, whatever it evicts to make room
    kept = [i for i in range(16) if cache_rows(cache, "SELECT 1 FROM Cache WHERE key LIKE ?", (f"m|%?n={i}&%",))]
    assert kept == list(range(16 - len(kept), 16)) and len(kept) >= 4, kept  # the newest, and several
    assert len(curl("-x", proxy.url, urls[-1]).stdout) == 100_015
    assert proxy.wait_lines("/size/100015", 2, path=log)[-1].split()[3] == "TCP_HIT/200"
    assert len(proxy.wait_lines("/size/", 17, path=log)) == 17  # every line: the cache left room for the log
    text = proxy.text()
    assert text.count("less than cache_dir_size (3200 MB): the disk tier keeps within it, evicting its oldest") == 1
    assert "disk write failed" not in text and "eviction failed" not in text and "cannot write" not in text
    assert origin.hits["/size/100015"] == 1
    assert [p.name for p in (cache / "incoming").glob("*/*")] == ["in-use"]  # no temp file left behind


def test_full_log_disk_keeps_serving(start_proxy, origin, tiny_disk):
    log = tiny_disk / "access.log"
    proxy = start_proxy(options={"access_log": str(log)})
    filler = fill_disk(tiny_disk)
    for i in range(100):
        r = curl("-x", proxy.url, f"{origin.url}/logfull-{i}")
        assert r.stdout == f"hello /logfull-{i}".encode()
    assert proxy.proc.poll() is None
    assert proxy.text().count("cannot write") == 1  # the admin is told, once
    filler.unlink()                                  # room again: logging resumes
    curl("-x", proxy.url, f"{origin.url}/after-room")
    proxy.wait_lines("/after-room", path=log)
    lines = proxy.log_lines(1, path=log)
    proxy.wait_output("lines were lost")  # logged by the writer thread just after that write
    for line in lines:
        assert line.count(" GET ") == 1  # whole lines only, no half-written one


def test_a_cache_dir_that_cannot_be_opened_leaves_the_proxy_serving_from_ram(start_proxy, origin, tmp_path):
    """A read-only disk (the same path as a full one: diskcache writes when it opens): not a reason to stop."""
    ro = tmp_path / "ro"
    ro.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,ro", "tmpfs", str(ro)], check=True)
    try:
        proxy = start_proxy(options={"cache_dir": str(ro / "cache")})
        url = f"{origin.url}/ro?h.Cache-Control=max-age%3D600"
        for _ in range(2):
            assert curl("-x", proxy.url, url).stdout == b"hello /ro"
        assert [l.split()[3] for l in proxy.wait_lines("/ro", 2)] == ["TCP_MISS/200", "TCP_MEM_HIT/200"]
        assert "caching in RAM only" in proxy.text() and "Read-only file system" in proxy.text()
    finally:
        subprocess.run(["umount", "-l", str(ro)], check=False)


def test_a_damaged_cache_database_is_moved_aside_and_the_proxy_starts(start_proxy, origin, tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "cache.db").write_bytes(b"\x07" * 8192)
    proxy = start_proxy(options={"cache_dir": str(cache), "cache_mem": "0"})
    url = f"{origin.url}/fresh-start?h.Cache-Control=max-age%3D600"
    for _ in range(2):
        assert curl("-x", proxy.url, url).stdout == b"hello /fresh-start"
        wait_stored(cache, "/fresh-start")
    assert [l.split()[3] for l in proxy.wait_lines("/fresh-start", 2)] == ["TCP_MISS/200", "TCP_HIT/200"]
    assert "is damaged" in proxy.text()
    assert [p.name.startswith("cache.damaged-") for p in tmp_path.iterdir()].count(True) == 1


def test_a_cache_dir_that_is_a_file_is_refused_by_name(tmp_path):
    from harness import Proxy
    f = tmp_path / "afile"
    f.write_text("x")
    p = Proxy(tmp_path / "p", options={"cache_dir": str(f)}, wait=False)
    try:
        p.proc.wait(60)
        assert p.proc.returncode != 0 and f"cache_dir: '{f}' is not a folder" in p.text()
    finally:
        p.stop()
