"""The cache's storage (addons/cachestore.py) on its own: the disk layout, Vary variants, damage, reopen."""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import threading
import time

import pytest

from addons import cachestore as cs
from harness import fill_disk


def meta(url: str, body: bytes, vary=(), vary_key=()) -> cs.Meta:
    return cs.Meta(url=url, status=200, reason="OK", http_version="HTTP/1.1",
                   headers=[("Content-Type", "text/plain"), ("Content-Length", str(len(body)))],
                   request_time=0.0, response_time=0.0, lifetime=60.0, lifetime_source="max-age",
                   vary=vary, vary_key=vary_key, length=len(body), digest=cs.digest(body))


def disk_store(path, mem=0, limit=1 << 30) -> cs.Store:
    return cs.Store(mem_limit=mem, mem_object_max=mem, object_max=10 << 20, disk_dir=path, disk_limit=limit)


def store_each(s: cs.Store, urls, body: bytes, batch: int = 1) -> None:
    """Store `body` under each URL, the writer taking `batch` of them at a time."""
    for k in range(0, len(urls), batch):
        for u in urls[k:k + batch]:
            s.put(u, meta(u, body), body)
        s.disk.flush()


SMALL = b"s" * 100
LARGE = b"L" * (cs.DiskTier.INLINE_MAX + 1)


@pytest.mark.parametrize("body", [SMALL, LARGE], ids=["inline", "separate"])
def test_entry_survives_reopen(tmp_path, body):
    s = disk_store(tmp_path)
    s.put("http://a/x", meta("http://a/x", body), body)
    s.close()
    s = disk_store(tmp_path)
    try:
        s.disk.flush()  # the index of the keys on disk is loaded
        entry, tier = s.get("http://a/x", "-")
        assert tier == "disk" and entry.body == body and entry.meta.url == "http://a/x"
        assert s.get("http://a/other", "-") == (None, None)
    finally:
        s.close()


def test_small_bodies_share_the_metadata_row_large_ones_do_not(tmp_path):
    s = disk_store(tmp_path)
    s.put("http://a/small", meta("http://a/small", SMALL), SMALL)
    s.put("http://a/large", meta("http://a/large", LARGE), LARGE)
    s.disk.flush()
    keys = {k.split("|")[0] for k in s.disk.dc.iterkeys()}
    assert isinstance(s.disk.dc.get("m|-|http://a/small"), tuple)
    assert isinstance(s.disk.dc.get("m|-|http://a/large"), cs.Meta)
    assert sum(1 for k in s.disk.dc.iterkeys() if k.startswith("b|")) == 1
    assert "i" not in keys, "no Vary: no index written"
    s.close()


def test_vary_variants_are_indexed_and_found_after_reopen(tmp_path):
    s = disk_store(tmp_path)
    s.disk.flush()
    for lang in ("en", "fr"):
        body = lang.encode() * 10
        s.put("http://a/v", meta("http://a/v", body, vary=("accept-language",), vary_key=(lang,)), body)
    s.close()
    s = disk_store(tmp_path)
    try:
        assert s.vary_sets("http://a/v") == (("accept-language",),)
        for lang in ("en", "fr"):
            entry, _ = s.get("http://a/v", cs.vary_hash((lang,)))
            assert entry.body == lang.encode() * 10
        assert s.remove("http://a/v") == 1
        s.disk.flush()
        assert not any(k.startswith(("m|", "i|")) for k in s.disk.dc.iterkeys())
    finally:
        s.close()


def test_replacing_a_large_body_deletes_the_old_one(tmp_path):
    s = disk_store(tmp_path)
    s.put("http://a/x", meta("http://a/x", LARGE), LARGE)
    s.put("http://a/x", meta("http://a/x", SMALL), SMALL)
    s.disk.flush()
    assert not any(k.startswith("b|") for k in s.disk.dc.iterkeys())
    assert s.get("http://a/x", "-")[0].body == SMALL
    s.close()


@pytest.mark.parametrize("body", [SMALL, LARGE], ids=["inline", "separate"])
def test_a_damaged_body_is_dropped_and_never_served(tmp_path, body, caplog):
    s = disk_store(tmp_path)
    m = meta("http://a/x", body)
    s.put("http://a/x", m, body)
    s.disk.flush()
    bad = body[:-1] + b"!"
    if isinstance(s.disk.dc.get("m|-|http://a/x"), tuple):
        s.disk.dc.set("m|-|http://a/x", (m, bad))
    else:
        s.disk.dc.set(f"b|{m.body_id}", bad)
    assert s.get("http://a/x", "-") == (None, cs.SWAPFAIL)  # Squid's swap failure: logged TCP_SWAPFAIL_MISS
    s.disk.flush()
    assert s.disk.dc.get("m|-|http://a/x") is None, "the bad entry is dropped"
    assert s.get("http://a/x", "-") == (None, None)
    assert f"corrupt disk entry for http://a/x (expected {len(body)} bytes, got {len(body)} bytes whose " \
           "digest differs)" in caplog.text  # (same length: the digest tells)
    s.close()


def test_the_previous_layout_is_still_read(tmp_path):
    """Caches written before small bodies moved into the metadata row: Meta, body and index apart."""
    s = disk_store(tmp_path)
    m = meta("http://a/old", SMALL)
    s.disk.dc.set(f"b|{m.body_id}", SMALL)
    s.disk.dc.set("i|http://a/old", ([()], ["-"]))
    s.disk.dc.set("m|-|http://a/old", m)
    s.close()
    s = disk_store(tmp_path)
    try:
        s.disk.flush()
        assert s.get("http://a/old", "-")[0].body == SMALL
        assert s.remove("http://a/old") == 1
        s.disk.flush()
        assert not list(s.disk.dc.iterkeys())
    finally:
        s.close()


def test_writes_are_made_by_a_writer_process_that_ends_with_the_store(tmp_path):
    """The writer is a process (no GIL shared with the event loop) in a session of its own (a Ctrl-C for
    the proxy is not for it): the proxy closes the store, and what was queued is still written."""
    import os
    s = disk_store(tmp_path)
    writer = s.disk.proc
    assert os.getsid(writer.pid) != os.getsid(0)
    urls = [f"http://a/{i}" for i in range(200)]
    for u in urls:
        s.put(u, meta(u, SMALL), SMALL)
    s.close()
    assert writer.poll() is not None, "the writer ends with the store"
    s = disk_store(tmp_path)
    try:
        s.disk.flush()
        assert all(s.get(u, "-")[0].body == SMALL for u in urls)
    finally:
        s.close()


def test_a_dead_writer_turns_the_disk_tier_off(tmp_path, caplog):
    """A delete the writer never made must not be read back: without a writer, no disk reads or writes."""
    s = disk_store(tmp_path)
    s.put("http://a/x", meta("http://a/x", SMALL), SMALL)
    s.disk.flush()
    s.disk.proc.kill()
    s.disk.proc.wait()
    s.disk.receiver.join(5)  # it sees the end of the writer's output
    assert "disk writer process exited" in caplog.text
    assert s.get("http://a/x", "-") == (None, None)
    assert s.put("http://a/y", meta("http://a/y", SMALL), SMALL) is None
    for i in range(100):  # nothing is left waiting for an answer that will never come
        s.remove(f"http://a/{i}")
    assert s.disk.busy == {}
    s.disk.flush(timeout=1)  # returns at once
    s.close()


def test_a_write_that_cannot_be_sent_to_the_writer_is_dropped_alone(tmp_path, caplog):
    s = disk_store(tmp_path)
    bad = meta("http://a/bad", SMALL)
    bad.lifetime_source = lambda: None  # cannot be pickled
    s.put("http://a/bad", bad, SMALL)
    s.put("http://a/ok", meta("http://a/ok", SMALL), SMALL)
    s.disk.flush()
    assert "disk write failed (put)" in caplog.text and s.disk.backlog == 0
    assert s.get("http://a/ok", "-")[0].body == SMALL and s.get("http://a/bad", "-") == (None, None)
    s.close()


def test_the_disk_tier_stays_within_its_size_evicting_the_least_recently_stored(tmp_path):
    limit = 2 << 20
    s = disk_store(tmp_path, limit=limit)
    try:
        body = b"B" * (200 * 1024)  # files of their own: the volume counts them
        urls = [f"http://a/{i}" for i in range(40)]  # 8 MB through a 2 MB disk tier
        peaks, writing = [0], threading.Event()

        def watch():  # the volume while the writer works
            while writing.is_set():
                peaks.append(s.disk.volume())
                time.sleep(0.002)

        writing.set()
        watcher = threading.Thread(target=watch)
        watcher.start()
        try:
            for u in urls:
                s.put(u, meta(u, body), body)  # frames of up to 2 MB: many batches, each culled after its commit
            s.disk.flush()
        finally:
            writing.clear()
            watcher.join()
        peak = max(peaks)
        assert s.disk.volume() <= limit
        # before its cull a batch may go over: by 1/16 of the limit and one object at most (and SQLite's pages)
        assert peak <= limit + limit // 16 + len(body) + (256 << 10), peak
        kept = [u for u in urls if s.disk.get_entry(u, "-") is not None]
        assert kept and len(kept) < len(urls)
        assert kept == urls[-len(kept):], "the least recently stored go first"
        entry, tier = s.get(urls[-1], "-")
        assert tier == "disk" and entry.body == body
    finally:
        s.close()


def test_the_index_of_keys_on_disk_stays_bounded_as_entries_are_evicted(tmp_path, monkeypatch):
    """`known` (the keys stored on disk, so that a lookup of another key skips SQLite) keeps the keys of
    evicted entries; past a bound it is read anew from the disk, and the entries there are still found."""
    monkeypatch.setattr(cs.DiskTier, "KNOWN_MIN", 300)
    s = disk_store(tmp_path, limit=1 << 20)
    try:
        body = b"k" * 20_000  # about 50 entries fit
        s.disk.flush()
        sizes = []
        for i in range(3000):
            u = f"http://a/{i}"
            s.put(u, meta(u, body), body)
            if i % 100 == 99:
                s.disk.flush()  # its writes and any reindexing done
                sizes.append(len(s.disk.known))
        assert max(sizes) <= 300 + 100, sizes  # 3000 distinct keys went through
        entry, tier = s.get("http://a/2999", "-")
        assert tier == "disk" and entry.body == body
    finally:
        s.close()


def test_the_index_of_keys_on_disk_rebuilt_while_writes_are_queued_misses_none(tmp_path, monkeypatch):
    monkeypatch.setattr(cs.DiskTier, "KNOWN_MIN", 200)
    s = disk_store(tmp_path)
    try:
        s.disk.flush()
        for i in range(1000):  # no flush between: each rebuild starts with writes still queued
            u = f"http://a/{i}"
            s.put(u, meta(u, SMALL), SMALL)
        s.disk.flush()
        on_disk = [k.split("|", 2)[2] for k in s.disk.dc.iterkeys() if isinstance(k, str) and k.startswith("m|")]
        assert len(on_disk) == 1000
        assert [k for k in on_disk if hash(k) not in s.disk.known] == []
    finally:
        s.close()


def test_keys_that_cannot_be_indexed_leave_lookups_to_sqlite_and_keep_nothing(tmp_path, monkeypatch, caplog):
    import diskcache
    sql = diskcache.Cache._sql

    def failing_scan(self):  # the loader's scan of the keys fails, all else works
        run = sql.fget(self)

        def query(statement, *args):
            if statement.startswith("SELECT key FROM Cache"):
                raise OSError("unreadable index")
            return run(statement, *args)
        return query

    def broken(self, *a, **kw):
        raise OSError("unreadable index")
    monkeypatch.setattr(diskcache.Cache, "_sql", property(failing_scan))
    monkeypatch.setattr(diskcache.Cache, "iterkeys", broken)
    s = disk_store(tmp_path)
    try:
        s.disk.loader.join(5)
        assert "cannot index the disk keys" in caplog.text
        for i in range(50):
            s.put(f"http://a/{i}", meta(f"http://a/{i}", SMALL), SMALL)
        s.disk.flush()
        assert s.disk.known is None and s.disk.added is None  # nothing piles up for an index never built
        assert s.get("http://a/49", "-")[0].body == SMALL
    finally:
        s.close()


def test_the_sender_gathers_writes_within_a_time_and_a_size():
    import queue

    d = cs.DiskTier.__new__(cs.DiskTier)  # the gathering alone: no writer process
    d.q, d.GATHER, d.FRAME_BYTES = queue.SimpleQueue(), 0.2, 1000
    d.hurry, d.more = threading.Event(), False
    d.lock, d.failed, d.backlog, d.busy, d.queued, d.clearing = threading.Lock(), False, 0, {}, {}, 0
    d.known, d.added, d.known_limit = set(), set(), 1000
    put = lambda n: ("put", "http://a/", None, b"x" * n, None, None, False)  # noqa: E731
    for _ in range(5):
        d.q.put(put(300))
    first = d._gather()
    assert len(first) == 4, "stops once the bodies reach FRAME_BYTES; the rest waits for the next frame"
    start = time.monotonic()
    assert len(d._gather()) == 1 and time.monotonic() - start < 0.1, "after a full frame, the next goes at once"
    d.q.put(put(10))
    d.q.put(("flush", 1))
    d.hurry.set()  # as flush() does
    start = time.monotonic()
    assert [op[0] for op in d._gather()] == ["put", "flush"] and time.monotonic() - start < 0.1, "a flush goes at once"
    d.q.put(put(10))
    start = time.monotonic()
    assert len(d._gather()) == 1 and time.monotonic() - start >= 0.19, "a lone write waits GATHER for others"
    d.known.add(hash("http://a/"))  # on disk: a removal is sent
    # a purge or a clear goes at once: one that waited could be lost to a crash
    for op, queue_it in (("remove", lambda: d.remove("http://a/")), ("clear", d.clear)):
        d.q.put(put(10))
        threading.Timer(0.05, queue_it).start()  # queued while the sender waits
        start = time.monotonic()
        assert [o[0] for o in d._gather()] == ["put", op] and time.monotonic() - start < 0.15
    # bodies worth a frame, queued while the sender waits, end the wait too
    meta_of = lambda n: cs.Meta(url="http://b/", status=200, reason="OK", http_version="HTTP/1.1", headers=[],  # noqa: E731
                                request_time=0, response_time=0, lifetime=0, lifetime_source="", vary=(),
                                vary_key=(), length=n, digest="")
    d.put("http://b/", meta_of(10), b"x" * 10)
    threading.Timer(0.05, lambda: d.put("http://b/", meta_of(1000), b"x" * 1000)).start()
    start = time.monotonic()
    assert len(d._gather()) == 2 and time.monotonic() - start < 0.15


def test_the_vary_index_gives_the_garbage_collector_nothing_to_walk():
    """One index key per stored URL, up to 200,000: a container per key made every full
    collection of the proxy slower as it aged."""
    import gc
    s = cs.Store(64 * 1024 * 1024, 1024 * 1024, 1024 * 1024, None, 0)
    for i in range(1000):
        url = f"http://a/{i}"
        s.put(url, meta(url, b"x"), b"x")
    s.put("http://a/v", meta("http://a/v", b"en", vary=("accept-language",), vary_key=("en",)), b"en")
    s.put("http://a/v", meta("http://a/v", b"fr", vary=("accept-language", "dnt"), vary_key=("fr", "")), b"fr")
    gc.collect()  # untracks tuples that hold only strings
    assert s.vary_sets("http://a/7") == ((),) and s.vary_index["http://a/7"] is cs.ONLY_NO_VARY
    assert s.vary_sets("http://a/v") == (("accept-language", "dnt"), ("accept-language",))
    assert not [k for k, v in s.vary_index.items() if gc.is_tracked(v)]


def test_sending_metadata_to_the_writer_leaves_nothing_for_the_garbage_collector():
    """Pickling and unpickling by default make Python create a dict for each instance, which
    then stays with the entry in RAM; the stored form is the same as before."""
    import gc
    import pickle
    metas = [meta(f"http://a/{i}", b"x") for i in range(500)]
    data = pickle.dumps(metas, pickle.HIGHEST_PROTOCOL)
    loaded = pickle.loads(data)
    assert not [m for m in metas + loaded if any(type(r) is dict for r in gc.get_referents(m))]
    assert loaded == metas
    assert loaded[0].__dict__ == metas[0].__dict__  # the attributes by name, as before


@pytest.mark.parametrize("mem", [0, 1 << 20], ids=["disk-only", "ram-and-disk"])
def test_a_late_304_never_brings_back_a_response_replaced_or_purged_meanwhile(tmp_path, mem):
    """The metadata of a 304 updates the response it validated only while that response is the one
    stored: a newer response stored meanwhile, or a purge, stays (a revalidation can take seconds)."""
    s = cs.Store(mem_limit=mem, mem_object_max=mem, object_max=10 << 20, disk_dir=tmp_path, disk_limit=1 << 30)
    try:
        url, v1, v2 = "http://a/x", b"version 1", b"version 2"
        old = meta(url, v1)
        s.put(url, old, v1)
        s.disk.flush()
        s.put(url, meta(url, v2), v2)  # a newer response while the revalidation of v1 waits
        s.disk.flush()
        s.update_meta(url, dataclasses.replace(old, lifetime=300.0), v1)
        s.disk.flush()
        entry, _ = s.get(url, old.vhash)
        assert entry is not None and entry.body == v2
        s.remove(url)  # purged while another revalidation of v2 waits
        s.disk.flush()
        s.update_meta(url, dataclasses.replace(entry.meta, lifetime=300.0), v2)
        s.disk.flush()
        assert s.get(url, old.vhash) == (None, None)
    finally:
        s.close()


def test_a_304_for_a_response_out_of_ram_but_on_disk_puts_it_back_in_ram(tmp_path):
    s = cs.Store(mem_limit=1 << 20, mem_object_max=1 << 20, object_max=10 << 20, disk_dir=tmp_path,
                 disk_limit=1 << 30)
    try:
        url, body = "http://a/y", b"body"
        m = meta(url, body)
        s.put(url, m, body)
        s.disk.flush()
        s.mem.clear()  # evicted from RAM
        s.update_meta(url, dataclasses.replace(m, lifetime=300.0), body)
        entry, tier = s.get(url, m.vhash)
        assert tier == "mem" and entry.meta.lifetime == 300.0 and entry.body == body
    finally:
        s.close()


def test_the_entry_count_is_one_query_not_a_walk_over_every_key(tmp_path, monkeypatch):
    """cache.stats runs on the event loop: it must not read the keys one by one."""
    s = disk_store(tmp_path)
    try:
        for i in range(3):
            url = f"http://a/{i}"
            s.put(url, meta(url, LARGE), LARGE)  # separate bodies: keys that are not entries
        s.disk.flush()

        def walk(*args, **kw):
            raise AssertionError("iterkeys walked every key")
        monkeypatch.setattr(s.disk.dc, "iterkeys", walk)
        assert s.disk.count() == 3
    finally:
        s.close()


def test_the_disk_is_not_read_for_a_key_whose_newer_response_is_still_queued(tmp_path):
    """A newer response waits for the writer (batches every 0.2 s) and has left RAM meanwhile: the
    older one on disk is not served, nor brought back into RAM; once written, the newer one is."""
    s = cs.Store(mem_limit=1 << 20, mem_object_max=1 << 20, object_max=10 << 20, disk_dir=tmp_path,
                 disk_limit=1 << 30)
    try:
        url = "http://a/q"
        old = meta(url, b"version 0")
        s.put(url, old, b"version 0")
        s.disk.flush()
        s.put(url, meta(url, b"version 1"), b"version 1")
        s.mem.clear()  # evicted before the writer got to it
        assert s.get(url, old.vhash) == (None, None)
        s.update_meta(url, dataclasses.replace(old, lifetime=300.0), b"version 0")  # a late 304 for v0
        assert s.get(url, old.vhash) == (None, None)
        s.disk.flush()
        entry, tier = s.get(url, old.vhash)
        assert entry.body == b"version 1" and tier == "disk"
    finally:
        s.close()


def test_an_object_in_no_ram_tier_is_read_from_the_write_queue_till_it_is_on_disk(tmp_path):
    """A large object (over the RAM tier's object size) or a streamed one waits for the writer
    (batches every 0.2 s): lookups meanwhile get it from the queue, not a miss; a removal or a
    clear meanwhile is seen at once; once written it is read from the disk."""
    s = disk_store(tmp_path)  # no RAM tier
    try:
        url, body = "http://a/big", LARGE
        m = meta(url, body)
        s.put(url, m, body)
        assert url in s.disk.busy
        entry, tier = s.get(url, m.vhash)
        assert (entry.body, tier) == (body, "disk")
        s.update_meta(url, dataclasses.replace(m, lifetime=300.0), body)  # a 304 meanwhile
        assert s.get(url, m.vhash)[0].meta.lifetime == 300.0
        s.remove(url)
        assert s.get(url, m.vhash) == (None, None)
        streamed, sbody = "http://a/streamed", b"S" * 50_000
        with s.new_tempfile() as f:
            f.write(sbody)
        sm = meta(streamed, sbody)
        assert s.put_file(streamed, sm, f.name)
        entry, tier = s.get(streamed, sm.vhash)
        assert (entry.body, tier) == (sbody, "disk")
        s.put(url, m, body)
        s.clear()
        assert s.get(url, m.vhash) == (None, None)
        s.put(url, m, body)
        s.disk.flush()
        assert not s.disk.busy and not s.disk.queued  # nothing is kept once written
        entry, tier = s.get(url, m.vhash)
        assert (entry.body, entry.meta.lifetime, tier) == (body, 60.0, "disk")
    finally:
        s.close()


def test_a_damaged_database_is_moved_aside_and_the_disk_tier_starts_empty(tmp_path, caplog):
    d = tmp_path / "cache"
    d.mkdir()
    junk = os.urandom(8192)
    (d / "cache.db").write_bytes(junk)
    s = disk_store(d)
    try:
        s.put("http://h/a", meta("http://h/a", b"abc"), b"abc")
        s.disk.flush()
        assert s.get("http://h/a", "-")[0].body == b"abc"
    finally:
        s.close()
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("cache.damaged-")]
    assert len(aside) == 1 and (aside[0] / "cache.db").read_bytes() == junk  # kept for whoever wants to look
    assert "is damaged" in caplog.text and str(aside[0]) in caplog.text


@pytest.mark.parametrize("name", ["cache", "c[AB]"])  # glob characters in the folder's name
def test_only_the_newest_damaged_copy_is_kept(tmp_path, caplog, name):
    """A disk that keeps damaging the cache must not fill up with copies moved aside."""
    older = tmp_path / f"{name}.damaged-20000101-000000"
    (older / "ab").mkdir(parents=True)
    (older / "cache.db").write_bytes(b"old junk")
    unrelated = [tmp_path / "other.damaged-20000101-000000", tmp_path / "cA.damaged-20000101-000000",
                 tmp_path / f"{name}.damaged-0-keep-for-analysis"]  # another cache's copies, one renamed by hand
    for u in unrelated:
        u.mkdir()
    d = tmp_path / name
    d.mkdir()
    (d / "cache.db").write_bytes(os.urandom(8192))
    disk_store(d).close()
    aside = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(f"{name}.damaged-2"))
    assert len(aside) == 1 and aside[0] > older.name
    assert all(u.exists() for u in unrelated)
    assert f"removed {older}" in caplog.text


def test_bodies_being_streamed_by_another_live_proxy_on_the_same_folder_are_left_alone(tmp_path):
    """Another proxy's folder is known by the lock it holds (flock), not by its pid: containers on one
    volume all run as pid 1."""
    import subprocess
    import sys
    for name in ("live", "dead"):
        (tmp_path / "incoming" / name).mkdir(parents=True)
        (tmp_path / "incoming" / name / "body-x").write_bytes(b"partial")
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'a'); "
                               "fcntl.flock(f, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(30)",
                               str(tmp_path / "incoming" / "live" / cs.LOCK)], stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline() == b"locked\n"
        s = disk_store(tmp_path)
        mine = s.disk.tmpdir
        assert (tmp_path / "incoming" / "live" / "body-x").exists()
        assert not (tmp_path / "incoming" / "dead").exists()  # no proxy holds it: its bodies were incomplete
        other, lock = cs._incoming(tmp_path)  # a second store on the folder: its own, and ours stays
        assert other != mine and mine.exists()
        lock.close()
        s.close()
        assert not mine.exists()
    finally:
        holder.kill()
        holder.wait()



def test_removals_made_while_the_writer_is_dead_are_made_when_the_cache_opens_next(tmp_path, caplog):
    """A purge or a clear the dead writer could not make: after a restart, the disk must not answer with
    what was removed. (A response replaced meanwhile may: the older one is still a valid stored response.)"""
    s = disk_store(tmp_path)
    for name in ("purged", "kept"):
        s.put(f"http://a/{name}", meta(f"http://a/{name}", SMALL), SMALL)
    s.disk.flush()
    s.disk.proc.kill()
    s.disk.proc.wait()
    s.disk.receiver.join(5)
    for _ in range(3):
        s.remove("http://a/purged")  # journaled once
    s.remove("http://a/never-stored")  # nothing to journal
    s.close()
    assert (tmp_path / cs.JOURNAL).read_text().splitlines() == ['"http://a/purged"']
    s = disk_store(tmp_path)
    try:
        assert s.get("http://a/purged", "-") == (None, None)
        assert s.get("http://a/kept", "-")[0].body == SMALL
        assert "(1 keys)" in caplog.text and not (tmp_path / cs.JOURNAL).exists()
        s.disk.proc.kill()  # and a clear
        s.disk.proc.wait()
        s.disk.receiver.join(5)
        s.clear()
    finally:
        s.close()
    s = disk_store(tmp_path)
    try:
        assert s.get("http://a/kept", "-") == (None, None)
    finally:
        s.close()


def test_a_value_on_disk_that_cannot_be_read_back_is_replaced_by_the_next_write(tmp_path, caplog):
    import sqlite3
    s = disk_store(tmp_path)
    s.put("http://a/x", meta("http://a/x", SMALL), SMALL)
    s.close()
    db = sqlite3.connect(tmp_path / "cache.db")
    with db:
        db.execute("UPDATE Cache SET value = ? WHERE key = ?", (os.urandom(64), "m|-|http://a/x"))
    db.close()
    s = disk_store(tmp_path)
    try:
        assert s.get("http://a/x", "-") == (None, cs.SWAPFAIL)  # logged TCP_SWAPFAIL_MISS
        new = b"n" * 100
        s.put("http://a/x", meta("http://a/x", new), new)
        s.disk.flush()
        s.mem.clear()
        assert s.get("http://a/x", "-")[0].body == new
        assert "unreadable value on disk" in caplog.text
    finally:
        s.close()


@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")  # the pipe to the dead writer is closed
def test_writes_in_flight_when_the_writer_dies_are_not_waited_for_and_are_removed_at_the_next_start(tmp_path):
    s = disk_store(tmp_path)
    s.put("http://a/inflight", meta("http://a/inflight", SMALL), SMALL)
    s.disk.flush()  # an older copy on disk
    new = b"n" * 100
    s.put("http://a/inflight", meta("http://a/inflight", new), new)  # sent after GATHER (0.2 s)
    assert "http://a/inflight" in s.disk.busy
    s.disk.proc.kill()
    s.disk.proc.wait()
    s.disk.receiver.join(5)
    assert not s.disk.busy and not s.disk.queued
    assert json.loads((tmp_path / cs.JOURNAL).read_text()) == "http://a/inflight"
    s.close()
    s = disk_store(tmp_path)  # the older copy is removed, not served as if it were the newer one
    try:
        assert s.get("http://a/inflight", "-") == (None, None) and not (tmp_path / cs.JOURNAL).exists()
    finally:
        s.close()


@pytest.mark.parametrize("value", [
    {"a": 1}, (1, 2, 3), ("not meta", b"body"), "a string",
    "meta without its length", "meta with a list for a digest"])
def test_a_value_on_disk_of_the_wrong_shape_is_a_swap_failure_dropped_and_logged(tmp_path, caplog, value):
    """A value that unpickles but is not what this code writes (another version's, or damaged): the
    read is a swap failure, the entry goes, and neither reads nor the writer's next put break."""
    import pickle
    import sqlite3
    url = "http://a/x"
    s = disk_store(tmp_path)
    s.put(url, meta(url, LARGE), LARGE)
    s.close()
    if value == "meta without its length":  # pickled by a version whose Meta had no such field
        fields = cs._META_FIELDS
        try:
            cs._META_FIELDS = tuple(f for f in fields if f != "length")
            data = pickle.dumps(meta(url, LARGE))
        finally:
            cs._META_FIELDS = fields
        assert not hasattr(pickle.loads(data), "length")
    elif value == "meta with a list for a digest":
        data = pickle.dumps(dataclasses.replace(meta(url, LARGE), digest=["x"]))
    else:
        data = pickle.dumps(value)
    db = sqlite3.connect(tmp_path / "cache.db")
    with db:
        db.execute("UPDATE Cache SET value = ?, mode = 4 WHERE key = ?", (data, f"m|-|{url}"))
    db.close()
    s = disk_store(tmp_path)
    try:
        assert s.get(url, "-") == (None, cs.SWAPFAIL)
        assert "dropped a damaged disk metadata" in caplog.text
        s.disk.flush()
        assert s.get(url, "-") == (None, None)  # removed
        new = b"n" * 100
        s.put(url, meta(url, new), new)
        s.disk.flush()
        s.mem.clear()
        assert s.get(url, "-")[0].body == new
        assert "disk write failed" not in caplog.text
    finally:
        s.close()


def test_an_index_on_disk_of_the_wrong_shape_is_dropped_and_logged(tmp_path, caplog):
    import pickle
    import sqlite3
    url = "http://a/v"
    s = disk_store(tmp_path)
    m = meta(url, SMALL, vary=("accept",), vary_key=(("accept", "a"),))
    s.put(url, m, SMALL)
    s.close()
    db = sqlite3.connect(tmp_path / "cache.db")
    with db:
        n = db.execute("UPDATE Cache SET value = ?, mode = 4 WHERE key = ?", (pickle.dumps((1, 2, 3)), f"i|{url}")).rowcount
    db.close()
    assert n == 1
    s = disk_store(tmp_path)
    try:
        assert s.vary_sets(url) == ()
        assert "dropped a damaged disk index" in caplog.text
        s.put(url, m, SMALL)
        s.disk.flush()
        s.mem.clear()
        s.vary_index.clear()
        assert s.vary_sets(url) == (("accept",),) and s.get(url, m.vhash)[0].body == SMALL
        assert "disk write failed" not in caplog.text
    finally:
        s.close()


def test_a_database_found_damaged_while_running_turns_the_tier_off_once_and_is_moved_aside_at_the_next_start(
        tmp_path, caplog):
    d = tmp_path / "cache"
    s = disk_store(d)
    for i in range(2000):
        s.put(f"http://a/{i}", meta(f"http://a/{i}", SMALL), SMALL)
    s.close()
    pages = (d / "cache.db").stat().st_size // 4096
    with open(d / "cache.db", "r+b") as f:  # the middle of the file: it opens, and some reads fail
        f.seek(pages // 2 * 4096)
        f.write(os.urandom(30 * 4096))
    s = disk_store(d)
    try:
        for i in range(0, 2000, 5):
            s.get(f"http://a/{i}", "-")
        assert s.disk.failed and caplog.text.count("is damaged") == 1
        assert s.disk.off_reason.startswith("the database is damaged")  # what cache.stats says
        assert s.get("http://a/0", "-") == (None, None)  # nothing is read from it any more
    finally:
        s.close()
    disk_store(d).close()
    assert [p.name.startswith("cache.damaged-") for p in tmp_path.iterdir()].count(True) == 1


def test_a_journal_line_cut_short_is_skipped_and_a_long_journal_becomes_a_clear(tmp_path, caplog, monkeypatch):
    s = disk_store(tmp_path)
    for name in ("a", "b", "c"):
        s.put(f"http://a/{name}", meta(f"http://a/{name}", SMALL), SMALL)
    s.close()
    (tmp_path / cs.JOURNAL).write_text('"http://a/a"\n"http://a/b')  # a crash while the last line was written
    s = disk_store(tmp_path)
    try:
        assert s.get("http://a/a", "-") == (None, None) and s.get("http://a/c", "-")[0].body == SMALL
        assert "skipped a damaged line" in caplog.text
        monkeypatch.setattr(cs, "JOURNAL_MAX", 1)
        s.disk.proc.kill()
        s.disk.proc.wait()
        s.disk.receiver.join(5)
        s.remove("http://a/b")
        s.remove("http://a/c")  # one key too many: the journal says clear
    finally:
        s.close()
    assert (tmp_path / cs.JOURNAL).read_text().splitlines()[-1] == json.dumps(cs.CLEAR)
    s = disk_store(tmp_path)
    try:
        assert s.get("http://a/c", "-") == (None, None)
    finally:
        s.close()


def test_a_damaged_cache_dir_behind_a_symbolic_link_is_moved_aside_where_the_link_points(tmp_path):
    target, link = tmp_path / "big" / "cache", tmp_path / "cache"
    target.mkdir(parents=True)
    link.symlink_to(target)
    (target / "cache.db").write_bytes(b"\x07" * 8192)
    disk_store(link).close()
    assert link.is_symlink() and (target / "cache.db").exists()
    assert len(list((tmp_path / "big").glob("cache.damaged-*"))) == 1


def test_body_files_no_entry_uses_are_swept_when_the_cache_opens(tmp_path, caplog):
    """A crash between a body file and its row (or a lost WAL) leaves files nothing would ever delete, and
    cache_dir_size does not count them."""
    big = b"B" * (64 * 1024)  # diskcache keeps bodies this large in files of their own
    s = disk_store(tmp_path)
    s.put("http://a/big", meta("http://a/big", big), big)
    s.close()
    (real,) = list(tmp_path.glob("*/*/*.val"))
    orphan = real.with_name("0" * 32 + ".val")
    orphan.write_bytes(big)
    recent = real.with_name("1" * 32 + ".val")  # as another proxy's write in flight
    recent.write_bytes(big)
    old = time.time() - 3600
    os.utime(orphan, (old, old))
    s = disk_store(tmp_path)
    try:
        s.disk.loader.join(10)
        assert not orphan.exists() and recent.exists() and real.exists()
        assert s.get("http://a/big", "-")[0].body == big
        assert "deleted 1 body files" in caplog.text
    finally:
        s.close()


def test_a_damaged_database_moved_aside_inside_its_folder_keeps_its_body_files(tmp_path, monkeypatch):
    """When the folder cannot be renamed (a mount point), the database moves into a folder inside it, and its
    body files with it: left in place, the new database would not name them, and the sweep would delete them."""
    big = b"B" * (64 * 1024)
    s = disk_store(tmp_path)
    s.put("http://a/big", meta("http://a/big", big), big)
    s.close()
    (body,) = list(tmp_path.glob("*/*/*.val"))
    old = time.time() - 3600
    os.utime(body, (old, old))
    (tmp_path / cs.DAMAGED_MARK).touch()

    def busy(self, target):
        raise OSError(16, "Device or resource busy")
    monkeypatch.setattr(cs.Path, "rename", lambda self, target: busy(self, target) if self == tmp_path.resolve()
                        else os.rename(self, target))
    s = disk_store(tmp_path)
    try:
        s.disk.loader.join(10)
    finally:
        s.close()
    (aside,) = list(tmp_path.glob("cache.db.damaged-*"))
    assert (aside / "cache.db").exists() and len(list(aside.glob("*/*/*.val"))) == 1


def test_sqlite_memory_is_bounded_also_for_a_cache_made_with_diskcaches_defaults(tmp_path):
    """SQLite's page cache and memory-mapped reads grew the writer process and the proxy by tens of MB
    as the disk tier filled (diskcache's defaults: 32 MB, 64 MB); an older cache folder has those
    defaults in its settings table."""
    import diskcache
    diskcache.Cache(str(tmp_path)).close()
    dc = cs._open(tmp_path, 1 << 30)
    try:
        pragmas = [(dc._sql("PRAGMA mmap_size").fetchone()[0], dc._sql("PRAGMA cache_size").fetchone()[0])]
        # the proxy reads from other threads, each on a connection of its own
        t = threading.Thread(target=lambda: pragmas.append(
            (dc._sql("PRAGMA mmap_size").fetchone()[0], dc._sql("PRAGMA cache_size").fetchone()[0])))
        t.start()
        t.join(10)
        assert pragmas == [(0, 1024), (0, 1024)]
        with diskcache.Cache(str(tmp_path)) as other:  # kept in the folder's settings
            assert other.sqlite_mmap_size == 0
    finally:
        dc.close()


def test_new_fields_from_a_304_are_counted_against_cache_mem():
    """A 304 may bring fields the stored response lacked: the RAM tier counts the entry anew, and
    evicts what no longer fits, instead of keeping the first count."""
    s = cs.Store(mem_limit=20_000, mem_object_max=20_000, object_max=1 << 20, disk_dir=None, disk_limit=0)
    for i in range(4):
        s.put(f"http://a/{i}", meta(f"http://a/{i}", SMALL), SMALL)
    assert len(s.mem.items) == 4 and s.mem.bytes <= 20_000
    old = s.get("http://a/3", cs.vary_hash(()))[0].meta
    fields = [*old.headers, *((f"X-Field-{k}", "v" * 200) for k in range(20))]
    new = dataclasses.replace(old, headers=fields)
    s.update_meta("http://a/3", new, SMALL)
    assert s.get("http://a/3", cs.vary_hash(()))[0].meta is new
    assert s.mem.bytes == sum(e.meta.size() for e in s.mem.items.values()) <= 20_000
    assert len(s.mem.items) < 4  # the grown entry pushed older ones out


def test_removing_a_url_from_ram_finds_its_variants_without_walking_every_entry():
    """An unsafe request's invalidation or a purge removes the URL's plain copy and each variant it has
    in RAM, and no other URL's; the index of variants follows removals and evictions."""
    mem = cs.MemTier(limit=1 << 20, object_max=10_000)
    for url in ("http://a/", "http://b/"):
        mem.put((url, cs.PLAIN), cs.Entry(meta(url, b"x"), b"x"))
        for lang in ("en", "fr"):
            vk = (("accept-language", lang),)
            m = meta(url, b"y", vary=("accept-language",), vary_key=vk)
            mem.put((url, m.vhash), cs.Entry(m, b"y"))
    assert len(mem.items) == 6 and len(mem.variants["http://a/"]) == 2
    assert mem.remove_primary("http://a/") == 3
    assert {k[0] for k in mem.items} == {"http://b/"} and "http://a/" not in mem.variants
    small = cs.MemTier(limit=1, object_max=10_000)  # every put evicts the one before
    m = meta("http://c/", b"z", vary=("accept-language",), vary_key=(("accept-language", "en"),))
    small.limit = m.size()
    small.put(("http://c/", m.vhash), cs.Entry(m, b"z"))
    small.put(("http://d/", cs.PLAIN), cs.Entry(meta("http://d/", b"z"), b"z"))
    assert list(small.items) == [("http://d/", cs.PLAIN)] and small.variants == {}


@pytest.mark.parametrize("refused_by", ["backlog", "size"])
def test_a_newer_response_the_disk_does_not_take_never_lets_the_older_copy_there_answer(tmp_path, refused_by):
    """RFC 9111 4: the newest response is the one used. A write the disk tier refuses (its writer is 64 MB
    behind, or the object is over its size limit) drops the copy it holds, which would come back as a
    fresh hit once RAM lets the newer one go."""
    s = disk_store(tmp_path, mem=1 << 20)
    url, old, new = "http://a/x", b"OLD version", b"NEW version, longer"
    s.put(url, meta(url, old), old)
    s.disk.flush()
    if refused_by == "backlog":
        s.disk.backlog = s.disk.MAX_BACKLOG
    else:
        s.disk_object_max = len(old)
    m = meta(url, new)
    assert s.put(url, m, new) == "mem"
    s.disk.backlog = 0
    assert s.get(url, m.vhash)[0].body == new
    s.mem.remove((url, m.vhash))  # evicted from RAM by other traffic
    s.disk.flush()
    assert s.get(url, m.vhash) == (None, None)
    s.close()


def test_an_object_ram_lets_go_before_its_disk_write_is_done_is_still_a_hit(tmp_path):
    """A burst of stores can push an object out of RAM before the writer has put it on disk (reads skip
    the disk for it meanwhile): it is read from the write queue, not missed (and fetched again)."""
    s = disk_store(tmp_path, mem=3 * len(LARGE) + 2000)
    urls = [f"http://a/{i}" for i in range(4)]
    os.kill(s.disk.proc.pid, signal.SIGSTOP)  # the writer falls behind
    try:
        for u in urls:
            s.put(u, meta(u, LARGE), LARGE)
        assert (urls[0], cs.PLAIN) not in s.mem.items  # pushed out of RAM by the last one
        assert s.get(urls[0], cs.PLAIN)[0].body == LARGE
    finally:
        os.kill(s.disk.proc.pid, signal.SIGCONT)
    s.disk.flush()
    assert all(s.get(u, cs.PLAIN)[0].body == LARGE for u in urls)
    assert s.disk.queued == {}
    s.close()


def test_the_disk_tier_keeps_to_the_room_its_file_system_has_and_grows_back(small_disk, caplog):
    folder = small_disk("4m")
    s = disk_store(folder / "cache", limit=2 << 20)
    try:
        def put(*names):
            store_each(s, names, b"B" * (200 * 1024))

        def held():
            return [u for u in urls if s.disk.get_entry(u, "-") is not None]
        urls = [f"http://a/{i}" for i in range(12)]
        put(*urls[:3])
        assert "room for" not in caplog.text and s.disk.room is None
        st = os.statvfs(folder)
        filler = folder / "filler"  # another user of the file system takes all but 700 KB of it
        filler.write_bytes(b"x" * (st.f_bavail * st.f_frsize - (700 << 10)))
        put(*urls[3:8])
        assert caplog.text.count("less than cache_dir_size (2 MB): the disk tier keeps within it, evicting") == 1
        assert "disk write failed" not in caplog.text and "eviction failed" not in caplog.text
        assert held() == urls[5:8]  # each stored in the room the oldest left, one object evicted for one
        assert 0 < s.disk.room < 2 << 20 and s.disk.limit_now() == s.disk.room  # what cache.stats reports
        big = b"G" * (1 << 20)  # more than the file system has room for, even with the tier emptied
        s.put("http://a/big", meta("http://a/big", big), big)
        s.disk.flush()
        assert s.disk.get_entry("http://a/big", "-") is None and held() == urls[5:8]  # nothing evicted for it
        filler.unlink()
        put(*urls[8:])
        assert caplog.text.count("has room for cache_dir_size again") == 1 and s.disk.room is None
        assert held() == urls[5:] and s.disk.limit_now() == 2 << 20
    finally:
        s.close()


def test_small_bodies_in_sqlite_keep_to_the_room_too(small_disk, caplog):
    """Bodies in the database's rows go through SQLite's write-ahead log first: it is kept small too."""
    folder = small_disk("3m")
    s = disk_store(folder / "cache", limit=3200 << 20)
    try:
        urls = [f"http://a/{i}" for i in range(3000)]
        store_each(s, urls, SMALL * 15, batch=50)
        assert caplog.text.count("less than cache_dir_size (3200 MB)") == 1
        assert "disk write failed" not in caplog.text and "eviction failed" not in caplog.text
        assert s.disk.get_entry(urls[-1], "-") is not None and s.disk.get_entry(urls[0], "-") is None
        assert (folder / "cache" / "cache.db-wal").stat().st_size <= 1 << 20
    finally:
        s.close()


def test_an_object_larger_than_the_room_is_not_stored_and_evicts_nothing(small_disk, caplog):
    folder = small_disk("2m")
    s = disk_store(folder / "cache", limit=3200 << 20)
    try:
        small = [f"http://a/{i}" for i in range(3)]
        store_each(s, small, LARGE * 6)  # ~100 KB each
        big = b"G" * (1400 << 10)  # less than the free bytes, more than the room (a 50th, 512 KB at least, kept)
        s.put("http://a/big", meta("http://a/big", big), big)
        s.disk.flush()
        assert s.disk.get_entry("http://a/big", "-") is None
        assert all(s.disk.get_entry(u, "-") for u in small)  # nothing evicted for it
        assert "is larger than the room the disk cache has" in caplog.text
        f = s.disk.new_tempfile()  # the same, streamed: its temp file goes too
        f.write(big)
        f.close()
        s.disk.put("http://a/big-streamed", meta("http://a/big-streamed", big), path=f.name)
        s.disk.flush()
        assert s.disk.get_entry("http://a/big-streamed", "-") is None and not os.path.exists(f.name)
        assert all(s.disk.get_entry(u, "-") for u in small)
    finally:
        s.close()


def test_a_304_renews_a_body_with_its_metadata_so_eviction_takes_whole_objects(tmp_path, caplog):
    s = disk_store(tmp_path, limit=800 << 10)
    try:
        body = b"B" * (200 << 10)
        metas = {u: meta(u, body) for u in ("http://a/A", "http://a/B", "http://a/C", "http://a/D")}
        for u in ("http://a/A", "http://a/B", "http://a/C"):
            s.put(u, metas[u], body)
            s.disk.flush()
        s.disk.update_meta("http://a/A", dataclasses.replace(metas["http://a/A"], lifetime=600.0))  # a 304 freshens A
        s.disk.flush()
        s.put("http://a/D", metas["http://a/D"], body)  # one object must go: B, the least recently stored
        s.disk.flush()
        entry = s.disk.get_entry("http://a/A", "-")
        assert entry is not None and entry[1] == body and entry[0].lifetime == 600.0
        assert s.disk.get_entry("http://a/B", "-") is None and s.disk.get_entry("http://a/D", "-")[1] == body
        assert "corrupt" not in caplog.text
    finally:
        s.close()


def test_a_disk_full_to_the_last_byte_is_said_once_a_minute_not_at_every_batch(small_disk, caplog):
    folder = small_disk("1m")
    s = disk_store(folder / "cache", limit=3200 << 20)
    try:
        store_each(s, ["http://a/first"], SMALL)
        fill_disk(folder)  # another program takes every byte left: SQLite cannot even delete
        urls = [f"http://a/{i}" for i in range(8)]
        store_each(s, urls[:4], LARGE)  # a batch each: files of their own
        store_each(s, urls[4:], SMALL)  # in the database's rows
        assert not any(s.disk.get_entry(u, "-") for u in urls)
        assert caplog.text.count("disk write failed") == 1 and caplog.text.count("eviction failed") <= 1
        assert s.disk.get_entry("http://a/first", "-")[1] == SMALL  # what was stored stays served
    finally:
        s.close()
