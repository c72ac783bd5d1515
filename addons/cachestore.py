"""Storage for the cache addon: a RAM tier and a diskcache tier.

Not an addon and no mitmproxy dependency: the cache addon (cache.py) owns
the HTTP decisions (rfc9111.py) and uses this for bytes.

- Entries are keyed by (primary key, variant hash): the primary key is the
  absolute URL with explicit port, the variant hash digests the Vary fields
  and their normalized request values (RFC 9111 4.1). The list of Vary field
  sets seen for a primary key is kept too, so a lookup knows which request
  fields to hash.
- RAM: an LRU of whole entries bounded by `mem_limit` bytes, objects larger
  than `mem_object_max` never kept there.
- Disk: diskcache (SQLite + files) bounded by `disk_limit` bytes, culled by
  diskcache in least-recently-stored order. A small body is stored with its
  metadata in one value (one SQLite row, one write); a larger one under its
  own key, unique per stored version, written before the metadata. The
  metadata records the body's length and BLAKE2b digest: a body that does not
  match (crash mid-write, disk damage) is dropped and logged, never served.
  The Vary index of a primary key is written only when it has Vary variants.
  Disk writes happen on one background thread so the event loop never waits
  for fsync; disk reads are synchronous (SQLite lookups take microseconds).
  The primary keys present on disk are also indexed in RAM (a set of their
  hashes, loaded by the writer thread when the cache opens), so a miss costs
  no SQLite read at all; a key the set does not know is not on disk.
- Objects move between tiers by use: a disk hit that fits in RAM is
  promoted; RAM eviction keeps the disk copy.
"""
from __future__ import annotations

import hashlib
import itertools
import logging
import os
import queue
import shutil
import tempfile
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

NO_VARY: tuple = ()
# body ids: unique across runs (random per process) and within one (a counter), 32 hex digits like
# uuid4().hex, without a getrandom() system call per stored response
_RUN_ID = os.urandom(8).hex()
_BODY_COUNTER = itertools.count(int.from_bytes(os.urandom(4), "big"))


def vary_hash(vary_key: tuple) -> str:
    if not vary_key:
        return "-"
    return hashlib.blake2b(repr(vary_key).encode(), digest_size=12).hexdigest()


def digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


@dataclass
class Meta:
    """Everything about a stored response except its body."""
    url: str
    status: int
    reason: str
    http_version: str
    headers: list[tuple[str, str]]
    request_time: float
    response_time: float
    lifetime: float
    lifetime_source: str
    vary: tuple[str, ...]
    vary_key: tuple
    length: int
    digest: str
    body_id: str = field(default_factory=lambda: f"{_RUN_ID}{next(_BODY_COUNTER):016x}")
    initial_age: float = 0.0  # RFC 9111 4.2.3 corrected_initial_age, computed when stored
    targeted: bool = False    # its policy came from a targeted field (RFC 9213, CDN-Cache-Control)

    def age(self, now: float) -> float:
        return self.initial_age + max(0.0, now - self.response_time)

    @property
    def vhash(self) -> str:
        return vary_hash(self.vary_key)

    def size(self) -> int:
        return self.length + sum(len(k) + len(v) + 4 for k, v in self.headers) + 256


@dataclass
class Entry:
    meta: Meta
    body: bytes
    # what cache.py derives from meta.headers to answer hits (encoded fields...), kept with the
    # headers list it was made from; RAM only, never stored
    derived: object = field(default=None, compare=False, repr=False)


@dataclass
class Pending:
    """A revalidation in flight for one flow (cache.py)."""
    key: str
    entry: Entry
    tier: str
    client_conditionals: list[tuple[str, str]]


@dataclass
class Failure:
    """An unreachable origin, remembered for negative_ttl (cache.py)."""
    until: float
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes
    page: str


class MemTier:
    def __init__(self, limit: int, object_max: int):
        self.limit, self.object_max = limit, object_max
        self.items: OrderedDict[tuple[str, str], Entry] = OrderedDict()
        self.bytes = 0

    def get(self, key) -> Entry | None:
        e = self.items.get(key)
        if e is not None:
            self.items.move_to_end(key)
        return e

    def fits(self, meta: Meta) -> bool:
        return meta.length <= self.object_max and meta.size() <= self.limit

    def put(self, key, entry: Entry) -> bool:
        self.remove(key)
        if not self.fits(entry.meta):
            return False
        self.items[key] = entry
        self.bytes += entry.meta.size()
        while self.bytes > self.limit and self.items:
            _, old = self.items.popitem(last=False)
            self.bytes -= old.meta.size()
        return True

    def remove(self, key) -> bool:
        e = self.items.pop(key, None)
        if e is not None:
            self.bytes -= e.meta.size()
            return True
        return False

    def remove_primary(self, primary: str) -> int:
        keys = [k for k in self.items if k[0] == primary]
        for k in keys:
            self.remove(k)
        return len(keys)

    def clear(self) -> None:
        self.items.clear()
        self.bytes = 0


class DiskTier:
    """diskcache with a single writer thread."""

    MAX_BACKLOG = 64 * 1024 * 1024  # bytes of queued writes before new writes are dropped

    def __init__(self, directory: Path, limit: int):
        import diskcache
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.tmpdir = self.directory / "incoming"
        shutil.rmtree(self.tmpdir, ignore_errors=True)  # streamed bodies of a previous run: incomplete
        self.tmpdir.mkdir(parents=True, exist_ok=True)
        self.dc = diskcache.Cache(str(self.directory), size_limit=limit,
                                  eviction_policy="least-recently-stored", cull_limit=10,
                                  statistics=False)
        self.q: queue.SimpleQueue = queue.SimpleQueue()
        self.lock = threading.Lock()
        self.busy: dict[str, int] = {}   # primary -> queued deletes (disk reads skip it meanwhile)
        self.clearing = 0
        self.backlog = 0
        self.dropped = 0
        self.corrupt = 0
        # hash() of every primary key with an index on disk; None until the writer thread has read them
        # (reads ask SQLite meanwhile). Only ever too large (evicted or removed keys): never misses one.
        self.known: set[int] | None = None
        self.q.put(("load",))
        self.thread = threading.Thread(target=self._run, name="relais-cache-disk", daemon=True)
        self.thread.start()

    # keys
    @staticmethod
    def _mkey(primary: str, vh: str) -> str:
        return f"m|{vh}|{primary}"

    @staticmethod
    def _ikey(primary: str) -> str:
        return f"i|{primary}"

    # --- reads (event loop thread) ---
    def readable(self, primary: str) -> bool:
        return not self.clearing and primary not in self.busy

    def vary_sets(self, primary: str) -> list[tuple[str, ...]] | None:
        if not self.readable(primary):
            return None
        known = self.known
        if known is not None and hash(primary) not in known:
            return None  # never stored on disk: no SQLite read
        try:
            idx = self.dc.get(self._ikey(primary))
            return idx[0] if idx else [NO_VARY]  # no index: the entry, if any, has no Vary
        except Exception as e:  # a damaged database must not break requests
            log.warning("cache: disk index read failed for %s: %s", primary, e)
            return None

    def has(self, primary: str) -> bool:
        try:
            return (self.dc.get(self._ikey(primary)) is not None
                    or self.dc.get(self._mkey(primary, vary_hash(NO_VARY))) is not None)
        except Exception:
            return False

    def get_entry(self, primary: str, vh: str) -> tuple[Meta, bytes] | None:
        """The stored metadata and its verified body, or None."""
        if not self.readable(primary):
            return None
        try:
            value = self.dc.get(self._mkey(primary, vh))
        except Exception as e:
            log.warning("cache: disk metadata read failed for %s: %s", primary, e)
            return None
        if value is None:
            return None
        if isinstance(value, tuple):  # small body stored with its metadata
            meta, body = value
            return (meta, body) if self._verified(meta, body) else None
        body = self.get_body(value)
        return None if body is None else (value, body)

    def get_body(self, meta: Meta) -> bytes | None:
        """A body stored under its own key, verified against the metadata."""
        try:
            body = self.dc.get(f"b|{meta.body_id}")
        except Exception as e:
            body = None
            log.warning("cache: disk body read failed for %s: %s", meta.url, e)
        return body if self._verified(meta, body) else None

    def _verified(self, meta: Meta, body: bytes | None) -> bool:
        """True if the body matches the metadata; a bad one is dropped and logged."""
        if body is None or len(body) != meta.length or digest(body) != meta.digest:
            self.corrupt += 1
            got = "missing" if body is None else f"{len(body)} bytes"
            log.warning("cache: dropped a corrupt disk entry for %s (expected %d bytes, got %s)",
                        meta.url, meta.length, got)
            self.q.put(("drop", meta))
            return False
        return True

    # --- writes (queued) ---
    def put(self, primary: str, meta: Meta, body: bytes | None = None, path: str | None = None,
            vary_sets: list | None = None) -> bool:
        size = meta.length
        with self.lock:
            if self.backlog + size > self.MAX_BACKLOG and size > 0:
                self.dropped += 1
                if path:
                    _unlink(path)
                return False
            self.backlog += size
        self.q.put(("put", primary, meta, body, path, vary_sets))
        return True

    def update_meta(self, primary: str, meta: Meta) -> None:
        self.q.put(("meta", primary, meta))

    def remove(self, primary: str) -> None:
        with self.lock:
            self.busy[primary] = self.busy.get(primary, 0) + 1
        self.q.put(("remove", primary))

    def clear(self) -> None:
        with self.lock:
            self.clearing += 1
        self.q.put(("clear",))

    def new_tempfile(self):
        return tempfile.NamedTemporaryFile(dir=self.tmpdir, delete=False, prefix="body-")

    def flush(self, timeout: float = 30.0) -> None:
        """Wait until queued writes are on disk (tests, shutdown)."""
        done = threading.Event()
        self.q.put(("flush", done))
        done.wait(timeout)

    def close(self) -> None:
        self.flush()
        self.q.put(None)
        self.thread.join(5)
        self.dc.close()

    def volume(self) -> int:
        try:
            return self.dc.volume()
        except Exception:
            return 0

    def count(self) -> int:
        try:
            return sum(1 for k in self.dc.iterkeys() if isinstance(k, str) and k.startswith("m|"))
        except Exception:
            return 0

    # --- writer thread ---
    BATCHED = frozenset({"put", "meta", "drop", "remove"})  # ops applied together in one SQLite transaction
    INLINE_MAX = 16 * 1024  # bodies up to this size are stored in the metadata's row
    BATCH_OPS = 64
    BATCH_BYTES = 8 * 1024 * 1024
    COALESCE = 0.0  # seconds a write may wait for others to share its transaction (0: only what is queued)

    def _run(self) -> None:
        while True:
            op = self.q.get()
            if op is None:
                return
            if op[0] not in self.BATCHED:
                self._apply_one(op)
                continue
            # What is queued is written in one transaction (one commit instead of one per key);
            # an op that is not a plain write ends the batch and runs after the commit.
            batch, size, tail = [op], (op[2].length if op[0] == "put" else 0), _NO_OP
            if self.COALESCE and self.q.qsize() < self.BATCH_OPS:
                time.sleep(self.COALESCE)  # let the writes of concurrent requests gather: fewer commits
            while len(batch) < self.BATCH_OPS and size < self.BATCH_BYTES:
                try:
                    nxt = self.q.get_nowait()
                except queue.Empty:
                    break
                if nxt is None or nxt[0] not in self.BATCHED:
                    tail = nxt
                    break
                batch.append(nxt)
                if nxt[0] == "put":
                    size += nxt[2].length
            try:
                with self.dc.transact():
                    for one in batch:
                        try:
                            self._apply(one)
                        except Exception as e:
                            log.warning("cache: disk write failed (%s): %s", one[0], e)
            except Exception as e:
                log.warning("cache: disk write failed (commit of %d operations): %s", len(batch), e)
            finally:
                for one in batch:
                    self._done(one)
            if tail is None:  # close()
                return
            if tail is not _NO_OP:
                self._apply_one(tail)

    def _apply_one(self, op) -> None:
        try:
            self._apply(op)
        except Exception as e:
            log.warning("cache: disk write failed (%s): %s", op[0], e)
        finally:
            self._done(op)

    def _done(self, op) -> None:
        """Bookkeeping once an op is committed (or failed): backlog, pending removals, clears."""
        if op[0] == "put":
            with self.lock:
                self.backlog -= op[2].length
        elif op[0] == "remove":
            with self.lock:
                n = self.busy.get(op[1], 1) - 1
                if n <= 0:
                    self.busy.pop(op[1], None)
                else:
                    self.busy[op[1]] = n
        elif op[0] == "clear":
            with self.lock:
                self.clearing -= 1

    def _load_known(self) -> set[int]:
        """hash() of the primary keys with an entry (m|<vary hash>|<primary>) on disk."""
        try:  # diskcache stores str keys raw: one indexed range scan
            keys = [k for (k,) in self.dc._sql(
                "SELECT key FROM Cache WHERE raw = 1 AND key >= 'm|' AND key < 'm}'").fetchall()]
        except Exception:  # another diskcache layout: the public iterator
            keys = list(self.dc.iterkeys())
        return {hash(k.split("|", 2)[2]) for k in keys if isinstance(k, str) and k.startswith("m|")}

    def _apply(self, op) -> None:
        kind = op[0]
        dc = self.dc
        if kind == "put":
            _, primary, meta, body, path, vary_sets = op
            known = self.known
            h = hash(primary)
            # a primary the index of the disk keys does not know has nothing on disk: nothing to read
            stored_before = known is None or h in known
            mkey = self._mkey(primary, meta.vhash)
            old = _meta_of(dc.get(mkey)) if stored_before else None
            if path:
                with open(path, "rb") as f:
                    dc.set(f"b|{meta.body_id}", f, read=True)
                _unlink(path)
                value = meta
            elif len(body) <= self.INLINE_MAX:
                value = (meta, body)
            else:
                dc.set(f"b|{meta.body_id}", body)
                value = meta
            sets = list(vary_sets or [NO_VARY])
            idx = dc.get(self._ikey(primary)) if stored_before else None
            if idx is not None or sets != [NO_VARY]:
                vhs = list(idx[1]) if idx else [vary_hash(NO_VARY)]  # a no-Vary entry may be there
                if meta.vhash not in vhs:
                    vhs.append(meta.vhash)
                dc.set(self._ikey(primary), (sets, vhs))
            if known is not None:
                known.add(h)  # before the entry is written: the set never misses a key on disk
            dc.set(mkey, value)  # last: makes the entry visible
            if old is not None and old.body_id != meta.body_id:
                dc.delete(f"b|{old.body_id}")
        elif kind == "meta":
            _, primary, meta = op
            mkey = self._mkey(primary, meta.vhash)
            cur = dc.get(mkey)
            old = _meta_of(cur)
            if old is not None and old.body_id == meta.body_id:
                dc.set(mkey, (meta, cur[1]) if isinstance(cur, tuple) else meta)
        elif kind == "drop":
            meta = op[1]
            primary = meta.url
            old = _meta_of(dc.get(self._mkey(primary, meta.vhash)))
            if old is not None and old.body_id == meta.body_id:
                dc.delete(self._mkey(primary, meta.vhash))
            dc.delete(f"b|{meta.body_id}")
        elif kind == "remove":
            primary = op[1]
            idx = dc.get(self._ikey(primary))
            dc.delete(self._ikey(primary))
            for vh in (idx[1] if idx else [vary_hash(NO_VARY)]):
                old = _meta_of(dc.get(self._mkey(primary, vh)))
                dc.delete(self._mkey(primary, vh))
                if old is not None:
                    dc.delete(f"b|{old.body_id}")
        elif kind == "clear":
            dc.clear()
            if self.known is not None:
                self.known = set()
        elif kind == "load":
            self.known = self._load_known()
        elif kind == "flush":
            op[1].set()


_NO_OP = ("none",)


def _meta_of(value) -> Meta | None:
    """The metadata of a stored value: Meta, or (Meta, body) for a small body stored with it."""
    return value[0] if isinstance(value, tuple) else value


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


class Store:
    """RAM + disk tiers behind one interface."""

    def __init__(self, mem_limit: int, mem_object_max: int, object_max: int,
                 disk_dir: str | Path | None, disk_limit: int):
        self.mem = MemTier(mem_limit, mem_object_max)
        self.object_max = object_max
        self.disk = DiskTier(Path(disk_dir), disk_limit) if disk_dir else None
        self.vary_index: OrderedDict[str, list[tuple[str, ...]]] = OrderedDict()
        self.VARY_INDEX_MAX = 200_000

    # --- lookups ---
    def vary_sets(self, primary: str) -> list[tuple[str, ...]]:
        sets = self.vary_index.get(primary)
        if sets is None and self.disk is not None:
            sets = self.disk.vary_sets(primary)
            if sets is not None:
                self._remember_vary(primary, sets)
        return sets or []

    def _remember_vary(self, primary: str, sets) -> None:
        self.vary_index[primary] = list(sets)
        self.vary_index.move_to_end(primary)
        if len(self.vary_index) > self.VARY_INDEX_MAX:
            self.vary_index.popitem(last=False)

    def get(self, primary: str, vh: str) -> tuple[Entry | None, str | None]:
        e = self.mem.get((primary, vh))
        if e is not None:
            return e, "mem"
        if self.disk is None:
            return None, None
        got = self.disk.get_entry(primary, vh)
        if got is None:
            return None, None
        e = Entry(*got)
        self.mem.put((primary, vh), e)  # promotion by use
        return e, "disk"

    # --- writes ---
    def add_vary(self, primary: str, fields: tuple[str, ...]) -> list:
        sets = self.vary_sets(primary)
        if fields not in sets:
            sets = [fields] + [s for s in sets if s != fields]
        self._remember_vary(primary, sets)
        return sets

    def put(self, primary: str, meta: Meta, body: bytes) -> str | None:
        """Store a complete response; returns the tier(s) it went to, or None if too big."""
        if meta.length > self.object_max:
            return None
        sets = self.add_vary(primary, meta.vary)
        in_mem = self.mem.put((primary, meta.vhash), Entry(meta, body))
        on_disk = self.disk.put(primary, meta, body=body, vary_sets=sets) if self.disk else False
        return "mem+disk" if in_mem and on_disk else "mem" if in_mem else "disk" if on_disk else None

    def put_file(self, primary: str, meta: Meta, path: str) -> bool:
        """Store a streamed body already written to `path` (disk tier only); the file is consumed."""
        if self.disk is None or meta.length > self.object_max:
            _unlink(path)
            return False
        sets = self.add_vary(primary, meta.vary)
        self.mem.remove((primary, meta.vhash))
        return self.disk.put(primary, meta, path=path, vary_sets=sets)

    def update_meta(self, primary: str, meta: Meta, body: bytes) -> None:
        e = self.mem.get((primary, meta.vhash))
        if e is not None and e.meta.body_id == meta.body_id:
            e.meta = meta
        elif self.mem.fits(meta):
            self.mem.put((primary, meta.vhash), Entry(meta, body))
        if self.disk:
            self.disk.update_meta(primary, meta)

    def remove(self, primary: str) -> int:
        n = self.mem.remove_primary(primary)
        known = primary in self.vary_index
        self.vary_index.pop(primary, None)
        if self.disk is not None:
            if not n and not known and self.disk.readable(primary):
                known = self.disk.has(primary)
            self.disk.remove(primary)
        return n or int(known)

    def remove_variant(self, primary: str, vh: str) -> None:
        """Drop one variant from RAM (a failed revalidation, a corrupt body)."""
        self.mem.remove((primary, vh))

    def clear(self) -> None:
        self.mem.clear()
        self.vary_index.clear()
        if self.disk:
            self.disk.clear()

    def new_tempfile(self):
        return self.disk.new_tempfile() if self.disk else None

    def close(self) -> None:
        if self.disk:
            self.disk.close()
