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
- Disk: diskcache (SQLite + files) bounded by `disk_limit` bytes, culled in
  least-recently-stored order after each batch of writes (diskcache's own cull
  on every write measured its volume each time: an eighth of the writer's work).
  A batch holds at most 1/16 of the limit (8 MB at most) plus one object, so the
  tier never goes over by more than that, and only until the batch is culled. A small body is stored with its
  metadata in one value (one SQLite row, one write); a larger one under its
  own key, unique per stored version, written before the metadata. The
  metadata records the body's length and BLAKE2b digest: a body that does not
  match (crash mid-write, disk damage) is dropped and logged, never served.
  The Vary index of a primary key is written only when it has Vary variants.
  Disk writes happen in one writer process (no GIL shared with the event
  loop, which never waits for the disk); disk reads are synchronous (SQLite
  lookups take microseconds). The primary keys present on disk are also
  indexed in RAM (a set of their hashes, loaded by a thread when the cache
  opens), so a miss costs no SQLite read at all; a key the set does not know
  is not on disk.
- Objects move between tiers by use: a disk hit that fits in RAM is
  promoted; RAM eviction keeps the disk copy.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import itertools
import json
import logging
import os
import pickle
import queue
import re
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field, fields as dataclass_fields
from pathlib import Path

log = logging.getLogger(__name__)

NO_VARY: tuple = ()
ONLY_NO_VARY: tuple = (NO_VARY,)  # the Vary sets of a URL whose responses have no Vary
# body ids: unique across runs (random per process) and within one (a counter), 32 hex digits like
# uuid4().hex, without a getrandom() system call per stored response
_RUN_ID = os.urandom(8).hex()
_BODY_COUNTER = itertools.count(int.from_bytes(os.urandom(4), "big"))


PLAIN = "-"  # the vary hash of a response without Vary


def vary_hash(vary_key: tuple) -> str:
    if not vary_key:
        return PLAIN
    return hashlib.blake2b(repr(vary_key).encode(), digest_size=12).hexdigest()


def digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


RAM_PER_FIELD = 290   # bytes: see Meta.size
RAM_PER_ENTRY = 1200


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
        """The RAM an entry of the memory tier takes in this process, what cache_mem bounds: the body,
        each field twice (as stored, and encoded once it answered a hit) with the objects that hold
        it, and the entry's own objects. Measured with tracemalloc (1 KB bodies, 5 and 15 fields)."""
        headers = self.headers  # summed in C, not per field in Python
        return (self.length + 2 * sum(map(len, itertools.chain.from_iterable(headers)))
                + RAM_PER_FIELD * len(headers) + RAM_PER_ENTRY)

    def __getstate__(self) -> dict:
        # What pickle stores by default (the attributes by name), built here: the default reads
        # __dict__, which makes Python create a dict for the instance that then stays with the
        # entry in RAM, one more object for every full garbage collection to walk. Only the
        # fields are kept: an attribute set outside them does not survive pickling or copying.
        return {name: getattr(self, name) for name in _META_FIELDS}

    def __setstate__(self, state: dict) -> None:
        for name, value in state.items():  # one by one, for the same reason (entries read from disk)
            object.__setattr__(self, name, value)


_META_FIELDS = tuple(f.name for f in dataclass_fields(Meta))


@dataclass
class Entry:
    meta: Meta
    body: bytes
    # what cache.py derives from meta.headers to answer hits (encoded fields...), kept with the
    # headers list it was made from; RAM only, never stored
    derived: object = field(default=None, compare=False, repr=False)
    # the bytes the RAM tier counted for it when it was put there (its meta may be replaced since)
    size: int = field(default=0, compare=False, repr=False)


@dataclass
class Pending:
    """A revalidation in flight for one flow (cache.py)."""
    key: str
    entry: Entry
    tier: str
    client_conditionals: list[tuple[str, str]]
    reload: bool = False  # the client's reload, revalidated (reload_into_ims): it asked for no stored copy


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
        # primary -> the variants held other than the plain one (vary hash "-"), so that removing a URL
        # (an unsafe request's invalidation, a purge) finds them without walking every entry; most
        # responses have no Vary, and cost nothing here
        self.variants: dict[str, set[str]] = {}
        self.on_evict = None  # called with (key, entry) for what the size limit pushes out

    def get(self, key) -> Entry | None:
        e = self.items.get(key)
        if e is not None:
            self.items.move_to_end(key)
        return e

    def fits(self, meta: Meta) -> bool:
        return meta.length <= self.object_max and meta.size() <= self.limit

    def put(self, key, entry: Entry) -> bool:
        self.remove(key)
        size = entry.meta.size()
        if entry.meta.length > self.object_max or size > self.limit:
            return False
        entry.size = size
        self.items[key] = entry
        if key[1] != PLAIN:
            self.variants.setdefault(key[0], set()).add(key[1])
        self.bytes += size
        while self.bytes > self.limit and self.items:
            old_key, old = self.items.popitem(last=False)
            self.bytes -= old.size
            self._forget_variant(old_key)
            if self.on_evict is not None:
                self.on_evict(old_key, old)
        return True

    def remove(self, key) -> bool:
        e = self.items.pop(key, None)
        if e is not None:
            self.bytes -= e.size
            self._forget_variant(key)
            return True
        return False

    def _forget_variant(self, key) -> None:
        if key[1] != PLAIN:
            held = self.variants.get(key[0])
            if held is not None:
                held.discard(key[1])
                if not held:
                    del self.variants[key[0]]

    def remove_primary(self, primary: str) -> int:
        keys = [(primary, PLAIN), *((primary, vh) for vh in self.variants.get(primary, ()))]
        return sum(self.remove(k) for k in keys)

    def clear(self) -> None:
        self.items.clear()
        self.variants.clear()
        self.bytes = 0


class DiskTier:
    """diskcache, read here and written by one writer process (_Writer).

    The writes run in a process of their own: in a thread, diskcache's Python
    code took the GIL from the event loop (misses were ~15% slower with the
    disk tier than without). The event loop only queues; a sender thread
    pickles what is queued to the writer's stdin, and a receiver thread reads
    its acknowledgements (what is committed) from its stdout.
    """

    MAX_BACKLOG = 64 * 1024 * 1024  # bytes of queued writes before new writes are dropped
    INLINE_MAX = 16 * 1024  # bodies up to this size are stored in the metadata's row
    # seconds a write waits for others to be sent and committed with it: a commit rewrites the same
    # index pages whatever the batch's size (0.2 s instead of 0.05 s: 42 instead of 65 us of the
    # writer's CPU per stored object). The entry is in RAM meanwhile, unless cache_mem is 0.
    GATHER = 0.2
    FRAME_BYTES = 2 * 1024 * 1024
    KNOWN_MIN = 100_000  # keys `known` may hold before it is rebuilt from the disk (see put)

    def __init__(self, directory: Path, limit: int):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.dc = open_or_recover(self.directory, limit)  # creates the database before the writer opens it
        try:
            self._replay()
        except Exception as e:
            self.dc.close()
            if not _damaged(e):
                raise
            (self.directory / DAMAGED_MARK).touch()  # found damaged by the replay: moved aside, started empty
            self.dc = open_or_recover(self.directory, limit)
        self.tmpdir, self.tmplock = _incoming(self.directory)
        self.opened = time.time()
        self.off_reason: str | None = None  # why the tier went off while running (cache.stats)
        self.journaled: set[str] = set()
        self.lock = threading.Lock()
        self.busy: dict[str, int] = {}   # primary -> queued puts and deletes (disk reads skip it meanwhile)
        # primary -> {vary hash: (meta, body, temp file)} of puts not yet on disk whose object is in no
        # RAM tier: read from here meanwhile (else a large object would be fetched again till it is written)
        self.queued: dict[str, dict[str, tuple[Meta, bytes | None, str | None]]] = {}
        self.clearing = 0
        self.backlog = 0
        self.dropped = 0
        self.corrupt = 0
        self.room: int | None = None  # the writer's limit where the file system has room for less than `limit`
        self.failed = False  # the writer process died: the disk tier is off (a lost delete must not be read)
        self.closing = False
        self.flushes: dict[int, threading.Event] = {}
        self.tokens = itertools.count()
        # hash() of every primary key with an entry on disk or queued; None until the loader thread has read
        # them (reads ask SQLite meanwhile; puts made meanwhile are kept in `added`). Only ever too large
        # (evicted or removed keys): never misses one.
        self.known: set[int] | None = None
        self.added: set[int] | None = set()
        self.known_limit = self.KNOWN_MIN
        self.q: queue.SimpleQueue = queue.SimpleQueue()  # operations for the sender thread
        self.hurry = threading.Event()  # set with an urgent operation: the sender stops gathering
        self.more = False               # the sender's last frame was full
        # the writer imports this module under the same name (it unpickles our Meta objects)
        root = Path(__file__).resolve().parents[__name__.count(".")]
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "import sys, importlib; sys.path.insert(0, sys.argv[1]); "
             "importlib.import_module(sys.argv[2])._writer_main(sys.argv[3], int(sys.argv[4]))",
             str(root), __name__, str(self.directory), str(limit)],
            # its own session: a Ctrl-C or hangup for the proxy is not for it. It ends when its stdin
            # does: the proxy closes it on exit, and the system does when the proxy dies.
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, start_new_session=True)
        self.sender, self.receiver, self.loader = (
            threading.Thread(target=fn, name=f"relais-cache-disk-{fn.__name__[1:]}", daemon=True)
            for fn in (self._send, self._receive, self._load))
        for t in (self.sender, self.receiver, self.loader):
            t.start()

    # keys
    @staticmethod
    def _mkey(primary: str, vh: str) -> str:
        return f"m|{vh}|{primary}"

    @staticmethod
    def _ikey(primary: str) -> str:
        return f"i|{primary}"

    # --- reads (event loop thread) ---
    def readable(self, primary: str) -> bool:
        return not self.clearing and not self.failed and primary not in self.busy

    def vary_sets(self, primary: str) -> list[tuple[str, ...]] | None:
        if not self.readable(primary):
            return None
        known = self.known
        if known is not None and hash(primary) not in known:
            return None  # never stored on disk: no SQLite read
        try:
            value = self.dc.get(self._ikey(primary))
        except Exception as e:  # a damaged database must not break requests
            self._read_failed("index", primary, e)
            return None
        idx = _index_of(value)
        if value is not None and idx is None:
            self._drop_damaged(primary, "index")
            return None
        return list(idx[0]) if idx else [NO_VARY]  # no index: the entry, if any, has no Vary

    def has(self, primary: str) -> bool:
        try:
            return (self.dc.get(self._ikey(primary)) is not None
                    or self.dc.get(self._mkey(primary, vary_hash(NO_VARY))) is not None)
        except Exception:
            return False

    def _stored(self, primary: str, vh: str):
        """What is stored on disk under (primary, vh): Meta, (Meta, small body), None, or UNREADABLE."""
        if not self.readable(primary):
            return None
        known = self.known
        if known is not None and hash(primary) not in known:
            return None  # never stored on disk: no SQLite read
        try:
            return self.dc.get(self._mkey(primary, vh))
        except Exception as e:
            self._read_failed("metadata", primary, e)
            return None if self.failed else UNREADABLE  # the database's fault, or this entry's

    def get_entry(self, primary: str, vh: str) -> tuple[Meta, bytes | None] | None:
        """The stored metadata and its verified body; None if nothing is stored; (meta, None) if the
        body could not be read or did not match (Squid's swap failure; a damaged entry is dropped)."""
        if primary in self.busy:
            return self._queued(primary, vh)
        value = self._stored(primary, vh)
        if value is None:
            return None
        if value is UNREADABLE:  # logged; the next write of the URL replaces it
            self.corrupt += 1
            return None, None
        meta = _meta_of(value)
        if meta is None:  # not what this code writes (damaged, or another program's)
            self._drop_damaged(primary, "metadata")
            return None, None
        if isinstance(value, tuple):  # small body stored with its metadata
            body = value[1]
            return (meta, body) if self._verified(meta, body) else (meta, None)
        return meta, self.get_body(meta)

    def _drop_damaged(self, primary: str, what: str) -> None:
        """A value read back whole but not of the shape written (another version's, or damaged):
        the URL's entries are removed and logged, as a body that does not match."""
        self.corrupt += 1
        log.warning("cache: dropped a damaged disk %s for %s", what, primary[:200])
        self.remove(primary)

    def _queued(self, primary: str, vh: str) -> tuple[Meta, bytes] | None:
        """An object on its way to the disk, as put (a streamed one read from its temp file, if the
        writer has not taken it yet)."""
        with self.lock:
            meta, body, path = self.queued.get(primary, {}).get(vh, (None, None, None))
        if meta is None or self.clearing or self.failed:
            return None
        if body is None and path:
            try:
                with open(path, "rb") as f:
                    body = f.read(meta.length + 1)
            except OSError:  # the writer took it meanwhile: the disk has it soon
                return None
        if body is None or len(body) != meta.length or digest(body) != meta.digest:
            return None
        return meta, body

    def body_id(self, primary: str, vh: str) -> str | None:
        """The body_id of the entry stored on disk under (primary, vh), or None."""
        return getattr(_meta_of(self._stored(primary, vh)), "body_id", None)

    def get_body(self, meta: Meta) -> bytes | None:
        """A body stored under its own key, verified against the metadata."""
        try:
            body = self.dc.get(f"b|{meta.body_id}")
        except Exception as e:
            self._read_failed("body", meta.url, e)
            return None
        return body if self._verified(meta, body) else None

    def _read_failed(self, what: str, primary: str, e: Exception) -> None:
        """A read error: one entry's (logged), or the database's (SQLite's words for a damaged file):
        then the tier is off with one error, and the folder is moved aside when the cache opens next."""
        if not _damaged(e):
            log.warning("cache: disk %s read failed for %s: %s", what, primary, e)
            return
        with self.lock:
            if self.failed:
                return
            self.failed = True
            self.off_reason = f"the database is damaged ({e})"
        try:
            (self.directory / DAMAGED_MARK).touch()
        except OSError:
            pass
        log.error("cache: the disk cache's database in %s is damaged (%s); the disk tier is off, and the "
                  "database is moved aside when the proxy starts next", self.directory, e)

    def _verified(self, meta: Meta, body: bytes | None) -> bool:
        """True if the body matches the metadata; a bad one is dropped and logged."""
        if body is None or len(body) != meta.length or digest(body) != meta.digest:
            self.corrupt += 1
            got = "missing" if body is None else f"{len(body)} bytes" if len(body) != meta.length \
                else f"{len(body)} bytes whose digest differs"
            log.warning("cache: dropped a corrupt disk entry for %s (expected %d bytes, got %s)",
                        meta.url, meta.length, got)
            self.q.put(("drop", meta))
            return False
        return True

    # --- writes (queued) ---
    def put(self, primary: str, meta: Meta, body: bytes | None = None, path: str | None = None,
            vary_sets: Sequence[tuple[str, ...]] | None = None, keep: bool = False) -> bool:
        """Queue a write; `keep`: the object is in no RAM tier, so reads get it from the queue till it
        is written (its bytes are held for the write anyway, and counted in the backlog)."""
        size = meta.length
        h = hash(primary)
        with self.lock:
            if self.failed or (self.backlog + size > self.MAX_BACKLOG and size > 0):
                self.dropped += 1
                if path:
                    _unlink(path)
                return False
            self.backlog += size
            full = self.backlog >= self.FRAME_BYTES  # a frame's worth waits: no point gathering more
            # until it is written, what the disk holds for this key is older: reads skip it meanwhile
            self.busy[primary] = self.busy.get(primary, 0) + 1
            if keep:
                self.queued.setdefault(primary, {})[meta.vhash] = (meta, body, path)
            else:  # a RAM copy answers; an older queued variant must not outlive this write
                self.queued.get(primary, {}).pop(meta.vhash, None)
            known = self.known
            if known is None:
                stored_before = True
                if self.added is not None:  # None: the keys could not be read, lookups ask SQLite
                    self.added.add(h)
            else:
                stored_before = h in known  # if not, the writer need not read what is there: nothing
                known.add(h)  # before the entry is written: the set never misses a key on disk
                if len(known) > self.known_limit:  # the keys of evicted entries pile up: read it anew
                    self._reindex(h)
        self.q.put(("put", primary, meta, body, path, vary_sets, stored_before))
        if full:
            self.hurry.set()
        return True

    def keep_until_written(self, key: tuple[str, str], entry: Entry) -> None:
        """An object RAM lets go while its write is still queued: reads get it from the queue till it
        is written (reads skip the disk meanwhile), as a put with `keep` would (its bytes are held
        for the write anyway)."""
        primary, vh = key
        if primary not in self.busy:  # written already (the usual case: no lock taken; puts come from
            return                    # this thread, so none can be queued meanwhile)
        with self.lock:
            if primary in self.busy and vh not in self.queued.get(primary, {}):
                self.queued.setdefault(primary, {})[vh] = (entry.meta, entry.body, None)

    def update_meta(self, primary: str, meta: Meta) -> None:
        with self.lock:
            variants = self.queued.get(primary, {})
            old = variants.get(meta.vhash)
            if old is not None and old[0].body_id == meta.body_id:
                variants[meta.vhash] = (meta, *old[1:])
        self.q.put(("meta", primary, meta))

    def remove(self, primary: str, urgent: bool = True) -> None:
        """Delete a URL's entries; `urgent`: sent at once (else with the next batch of writes)."""
        with self.lock:
            self.queued.pop(primary, None)
            if self.known is not None and hash(primary) not in self.known:
                return  # neither on disk nor queued (most unsafe requests' URLs): nothing to send
            if self.failed:  # no writer: done when the cache opens next (nothing is read from the disk till then)
                self._journal([primary])
                return
            self.busy[primary] = self.busy.get(primary, 0) + 1
        if urgent:
            self._urgent(("remove", primary))
        else:
            self.q.put(("remove", primary))

    def clear(self) -> None:
        with self.lock:
            if self.failed:
                self._journal([CLEAR])
                return
            self.clearing += 1
            self.queued.clear()
            if self.known is not None:
                self.known = set()
        self._urgent(("clear",))

    # --- removals the writer could not make (it died): journaled, made when the cache opens next ---
    def _journal(self, keys: list[str]) -> None:
        """Record removals for the next start (the caller holds the lock). Each key once; past
        JOURNAL_MAX keys, one clear instead; nothing for a database moved aside anyway."""
        if (self.directory / DAMAGED_MARK).exists() or CLEAR in self.journaled:
            return
        keys = [k for k in dict.fromkeys(keys) if k not in self.journaled]
        if len(self.journaled) + len(keys) > JOURNAL_MAX:
            keys = [CLEAR]
        if not keys:
            return
        self.journaled.update(keys)
        try:
            with open(self.directory / JOURNAL, "a", encoding="ascii") as f:
                f.write("".join(json.dumps(k) + "\n" for k in keys))  # JSON: any URL, surrogates included
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            log.error("cache: cannot record removals for the next start in %s (%s): the disk may answer "
                      "with responses purged since the writer exited", self.directory / JOURNAL, e)

    def _replay(self) -> None:
        """The journal's removals, made before the writer starts; an error goes up (the disk tier stays
        off rather than serve what was removed)."""
        path = self.directory / JOURNAL
        if not path.exists():
            return
        keys = []
        for line in path.read_text(encoding="ascii", errors="replace").splitlines():
            try:
                keys.append(json.loads(line))
            except ValueError:  # a line cut short by a crash while it was written
                log.warning("cache: skipped a damaged line of %s: %r", path, line[:200])
        writer = _Writer(self.dc, None, None)
        if CLEAR in keys:
            writer._apply(("clear",))
        else:
            with self.dc.transact():
                for primary in dict.fromkeys(keys):
                    writer._apply(("remove", primary))
        path.unlink()
        log.warning("cache: made the removals recorded when the disk writer had exited (%d keys)", len(keys))

    def new_tempfile(self):
        """A file for a body being streamed, or None (logged once a minute) if none can be made: the
        body is then relayed without being stored."""
        for attempt in (1, 2):
            try:
                return tempfile.NamedTemporaryFile(dir=self.tmpdir, delete=False, prefix="body-")
            except FileNotFoundError as e:  # incoming/ was removed under us: made anew once
                error = e
                if attempt == 1:
                    try:
                        self.tmplock.close()
                        self.tmpdir, self.tmplock = _incoming(self.directory)
                    except OSError as e2:
                        error = e2
                        break
            except OSError as e:  # a full disk, no inodes left, no permission
                error = e
                break
        warn_now_and_then("tempfile", "cache: cannot create a file for a streamed body in %s (%s); such bodies "
                          "are relayed without being stored meanwhile", self.tmpdir, error)
        return None

    def flush(self, timeout: float = 30.0) -> None:
        """Wait until queued writes are on disk and the keys on disk are indexed (tests, shutdown)."""
        end = time.monotonic() + timeout
        self.loader.join(timeout)
        done = threading.Event()
        with self.lock:
            if self.failed:
                return
            token = next(self.tokens)
            self.flushes[token] = done
        self._urgent(("flush", token))
        done.wait(max(0.0, end - time.monotonic()))

    def close(self) -> None:
        self.flush()
        self.closing = True
        self._urgent(None)  # the sender closes the writer's stdin: it writes what it has, then exits
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for t in (self.sender, self.receiver, self.loader):
            t.join(5)
        self.dc.close()
        shutil.rmtree(self.tmpdir, ignore_errors=True)
        self.tmplock.close()

    def limit_now(self) -> int:
        """The size the tier keeps to: cache_dir_size, or the room its file system has, if less."""
        return int(self.dc.size_limit) if self.room is None else self.room

    def volume(self) -> int:
        if self.clearing:  # a clear the writer has not made yet: nothing is served from the disk meanwhile
            return 0
        try:
            return self.dc.volume()
        except Exception:
            return 0

    def count(self) -> int:
        """Entries on disk: one indexed count (cache.stats runs on the event loop, and diskcache's
        iterkeys() reads a key per SQLite query: 40 s for 200,000 entries)."""
        if self.clearing:  # (as volume)
            return 0
        try:
            try:
                (n,), = self.dc._sql("SELECT COUNT(*) FROM Cache WHERE raw = 1 AND key >= 'm|' AND key < 'm}'")
                return n
            except Exception:  # another diskcache layout: the public iterator
                return sum(1 for k in self.dc.iterkeys() if _is_meta_key(k))
        except Exception:
            return 0

    # --- helper threads ---
    def _send(self) -> None:
        """Queued operations to the writer process; what is queued together goes in one write."""
        pipe = self.proc.stdin
        while True:
            ops = self._gather()
            end = ops[-1] is None
            try:
                if len(ops) > end:
                    pipe.write(self._encode(ops[:-1] if end else ops))
                    pipe.flush()
            except (OSError, ValueError):  # the writer is gone: _receive says so
                pass
            if end:
                try:  # closed even when the writer is gone, or the unsent bytes fail again when collected
                    pipe.close()
                except (OSError, ValueError):
                    pass
                return

    def _gather(self) -> list:
        """The next operations to send in one write (and commit in one transaction): those queued
        within GATHER seconds of the first, up to FRAME_BYTES of bodies (a frame is in memory twice,
        pickled here and unpickled in the writer); a flush or the end goes at once."""
        ops = [self.q.get()]
        if ops[0] is not None and ops[0][0] not in URGENT and not self.more:
            # one wake-up per batch (a thread that wakes takes the GIL from the event loop); an urgent
            # operation, or a frame's worth of bodies, queued meanwhile ends the wait
            self.hurry.wait(self.GATHER)
        self.hurry.clear()
        size = _body_bytes(ops[0])
        while ops[-1] is not None and ops[-1][0] not in URGENT and size < self.FRAME_BYTES:
            try:
                op = self.q.get_nowait()
            except queue.Empty:
                break
            ops.append(op)
            size += _body_bytes(op)
        self.more = size >= self.FRAME_BYTES  # a full frame: the next one is sent without waiting
        return ops

    def _urgent(self, op) -> None:
        self.q.put(op)
        self.hurry.set()

    def _encode(self, ops: list) -> bytes:
        try:
            return _frame(ops)
        except Exception:  # an op that cannot be pickled is dropped alone, as a failed write is
            good = []
            for op in ops:
                try:
                    pickle.dumps(op, pickle.HIGHEST_PROTOCOL)
                    good.append(op)
                except Exception as e:
                    log.warning("cache: disk write failed (%s): %s", op[0], e)
                    self._acknowledge([ack for ack in [_ack_of(op)] if ack])
            return _frame(good)

    def _receive(self) -> None:
        """The writer's acknowledgements, until it exits."""
        pipe = self.proc.stdout
        while True:
            try:
                acks = _read_frame(pipe)
            except Exception:
                acks = None
            if acks is None:
                break
            self._acknowledge(acks)
        if not self.closing:
            log.error("cache: the disk writer process exited (code %s); the disk cache is off until restart",
                      self.proc.wait())
        with self.lock:
            self.failed = True
            self.off_reason = self.off_reason or "the disk writer process exited"
            # writes and removals in flight may be lost: their keys are removed at the next start
            lost = [*self.busy, *([CLEAR] if self.clearing else [])]
            if lost:
                self._journal(lost)
            self.busy.clear()
            self.queued.clear()
            self.clearing = 0
            for done in self.flushes.values():
                done.set()
            self.flushes.clear()

    def _acknowledge(self, acks: list) -> None:
        """Operations done (committed or failed): committed puts free the backlog, removes and clears end."""
        for ack in acks:  # before flushes end, so whoever waited on one sees what the writer said
            if ack[0] == "log":
                log.warning(ack[1])
            elif ack[0] == "room":
                self.room = ack[1]
        with self.lock:
            for ack in acks:
                kind = ack[0]
                if kind == "put":
                    self.backlog -= ack[1]
                if kind in ("put", "remove"):
                    primary = ack[-1]
                    n = self.busy.get(primary, 1) - 1
                    if n <= 0:
                        self.busy.pop(primary, None)
                        self.queued.pop(primary, None)  # written: read from the disk now
                    else:
                        self.busy[primary] = n
                elif kind == "clear":
                    self.clearing -= 1
                elif kind == "flush":
                    done = self.flushes.pop(ack[1], None)
                    if done is not None:
                        done.set()

    def _reindex(self, h: int) -> None:
        """Rebuild `known` from the disk in the background (the caller holds the lock), once the writer
        has written what is queued: puts from now on are kept in `added` meanwhile."""
        self.known, self.added = None, {h}
        token, written = next(self.tokens), threading.Event()
        self.flushes[token] = written
        self._urgent(("flush", token))  # behind every put queued so far (that of h is in `added`)
        self.loader = threading.Thread(target=self._load, args=(written,), name="relais-cache-disk-load",
                                       daemon=True)
        self.loader.start()

    def _load(self, written: threading.Event | None = None) -> None:
        try:
            self._load_keys(written)
        finally:
            # diskcache opened a connection for this thread: closed now, not whenever the garbage collector
            # gets to it (left open, it keeps the store's last close from checkpointing the WAL into cache.db)
            self.dc.close()

    def _load_keys(self, written: threading.Event | None = None) -> None:
        """hash() of the primary keys with an entry (m|<vary hash>|<primary>) on disk."""
        if written is not None:
            written.wait(60)  # set when the writer has written what was queued before, or is gone
        try:
            try:  # diskcache stores str keys raw: one indexed range scan
                keys = [k for (k,) in self.dc._sql(
                    "SELECT key FROM Cache WHERE raw = 1 AND key >= 'm|' AND key < 'm}'").fetchall()]
            except Exception:  # another diskcache layout: the public iterator
                keys = list(self.dc.iterkeys())
            known = {hash(k.split("|", 2)[2]) for k in keys if _is_meta_key(k)}
        except Exception as e:
            log.warning("cache: cannot index the disk keys (%s); lookups read the disk", e)
            with self.lock:
                self.added = None
            return
        with self.lock:
            self.known = known | self.added
            self.added = set()
            self.known_limit = max(self.KNOWN_MIN, 2 * len(self.known))
        if written is None:  # the load when the cache opens
            self._sweep(self.opened)

    def _sweep(self, before: float) -> None:
        """Delete the body files no row names, left by a crash between a file and its row (or a lost
        WAL): nothing else ever would, and cache_dir_size does not count them. Only files older than a
        minute before the cache opened: a newer one may be another proxy's write in flight."""
        swept = 0
        try:
            named = {f for (f,) in self.dc._sql("SELECT filename FROM Cache WHERE filename IS NOT NULL").fetchall()}
            for top in os.scandir(self.directory):  # diskcache's layout: ab/cd/<hex>.val
                if not _body_folder(top):
                    continue
                for sub in os.scandir(top.path):
                    if not _body_folder(sub):
                        continue
                    for f in os.scandir(sub.path):
                        if f.name.endswith(".val") and os.path.join(top.name, sub.name, f.name) not in named:
                            try:
                                if f.stat().st_mtime < before - 60:
                                    os.unlink(f.path)
                                    swept += 1
                            except FileNotFoundError:  # evicted meanwhile
                                pass
        except Exception as e:  # another diskcache layout, an unreadable folder: nothing is lost by stopping
            log.warning("cache: could not sweep orphan body files in %s: %s", self.directory, e)
        if swept:
            log.warning("cache: deleted %d body files no entry used (left by a crash)", swept)


def _open(directory: Path, limit: int):
    import diskcache
    # SQLite's page cache at 4 MB and no memory-mapped reads, where diskcache's defaults (32 MB and
    # 64 MB) let the writer process and the proxy each grow by tens of MB as the disk tier fills:
    # memory that cache_mem does not bound and that an admin sizing the machine does not expect
    return diskcache.Cache(str(directory), size_limit=limit, eviction_policy="least-recently-stored",
                           cull_limit=10, statistics=False, sqlite_cache_size=1024, sqlite_mmap_size=0)


def _incoming(directory: Path):
    """This store's folder for bodies being streamed, incoming/<unique name>, and the open file whose lock
    (flock, held until the process ends, whatever its pid or container) marks it in use. Folders no
    live proxy holds are a previous run's incomplete bodies: removed."""
    root = directory / "incoming"
    root.mkdir(exist_ok=True)
    for p in root.iterdir():
        if not p.is_dir():
            p.unlink(missing_ok=True)
            continue
        try:
            with open(p / LOCK, "a") as f:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # held by a live proxy on the same cache_dir (or not ours to judge)
            continue
        shutil.rmtree(p, ignore_errors=True)
    mine = Path(tempfile.mkdtemp(dir=root, prefix=f"{_RUN_ID[:8]}-"))
    lock = open(mine / LOCK, "a")
    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return mine, lock


LOCK = "in-use"  # in each folder of incoming/: locked while the proxy that streams into it runs
JOURNAL = "pending-removals"  # keys (JSON lines) to remove when the cache opens next
JOURNAL_MAX = 10_000  # keys journaled in one run; past that the journal says clear
CLEAR = "\x00clear"  # in the journal: remove everything
UNREADABLE = object()  # DiskTier._stored: the entry's value could not be read back
SWAPFAIL = "swapfail"  # the tier Store.get names for an entry whose body could not be read or was wrong
DAMAGED_MARK = "damaged"  # left by a run that found the database damaged: moved aside at the next open
URGENT = frozenset({"flush", "remove", "clear"})  # sent to the writer at once, not after GATHER seconds


DAMAGED = ("file is not a database", "database disk image is malformed")  # SQLite's words for a damaged file


def _damaged(e: Exception) -> bool:
    """True for SQLite's errors about a damaged database file."""
    return any(words in str(e) for words in DAMAGED)


def _body_folder(entry) -> bool:
    """One of diskcache's folders of body files (ab/ and ab/cd/: two hex digits), a Path or a DirEntry."""
    return len(entry.name) == 2 and all(c in "0123456789abcdef" for c in entry.name) and entry.is_dir()


def open_or_recover(directory: Path, limit: int):
    """_open(), after moving a damaged database aside (the folder, renamed <name>.damaged-<time>, or
    its cache.db files if the folder cannot be renamed): the disk cache starts empty, and what was
    there is kept for whoever wants to look, the newest copy only (a disk that keeps damaging the
    cache must not fill up with copies). Other failures (a full or read-only disk) go up."""
    try:
        if (directory / DAMAGED_MARK).exists():
            raise sqlite3.DatabaseError(f"{DAMAGED[1]} (found so by the previous run)")
        return _open(directory, limit)
    except Exception as e:
        if not _damaged(e):
            raise
        damaged = e
    stamp = time.strftime("%Y%m%d-%H%M%S")
    try:
        real = directory.resolve()  # a symbolic link: its target moves aside, and a new one is made there
        aside = real.with_name(f"{real.name}.damaged-{stamp}")
        real.rename(aside)
        real.mkdir()
    except (OSError, ValueError):  # a mount point, "/", no write access above it: the database files alone
        aside = directory / f"cache.db.damaged-{stamp}"
        aside.mkdir()
        for name in ("cache.db", "cache.db-wal", "cache.db-shm", DAMAGED_MARK):
            if (directory / name).exists():
                (directory / name).rename(aside / name)
        for sub in directory.iterdir():  # its body files (ab/cd/...), which the new database would not name
            if _body_folder(sub):
                sub.rename(aside / sub.name)
    log.warning("cache: the disk cache's database in %s is damaged (%s); moved aside to %s, the disk cache "
              "starts empty", directory, damaged, aside)
    _remove_older_copies(aside)
    return _open(directory, limit)


def _remove_older_copies(aside: Path) -> None:
    """Remove the damaged copies moved aside before `aside`: its name with an earlier time stamp
    (a copy renamed by hand, or another cache's, is left alone)."""
    prefix = aside.name.rsplit("-", 2)[0] + "-"  # <name>.damaged-
    copy = re.compile(re.escape(prefix) + r"\d{8}-\d{6}")
    for old in aside.parent.iterdir():
        if (old != aside and copy.fullmatch(old.name) and old.name < aside.name
                and old.is_dir() and not old.is_symlink()):
            shutil.rmtree(old, ignore_errors=True)
            log.warning("cache: removed %s, an older damaged copy of the disk cache", old)


def _body_bytes(op) -> int:
    """Bytes of body an operation carries in memory (a put of a streamed body carries a path)."""
    return len(op[3]) if op is not None and op[0] == "put" and op[3] else 0


def _frame(obj) -> bytes:
    """obj pickled, after its length: what _read_frame reads."""
    data = pickle.dumps(obj, pickle.HIGHEST_PROTOCOL)
    return len(data).to_bytes(4, "big") + data


def _read_frame(pipe):
    """The next object written by _frame, None at the end of the stream."""
    head = pipe.read(4)
    if len(head) < 4:
        return None
    n = int.from_bytes(head, "big")
    data = pipe.read(n)
    if len(data) < n:
        return None
    return pickle.loads(data)


def _room_needed(batch: list, op_bytes: int) -> int:
    """The bytes a batch may take on the file system: its bodies, small ones twice (in SQLite's
    write-ahead log, then in the database), and its rows."""
    total = 0
    for op in batch:
        if op[0] == "put":
            length = op[2].length
            total += length * 2 if length <= DiskTier.INLINE_MAX and not op[4] else length
    return total + op_bytes * len(batch)


def _ack_of(op) -> tuple | None:
    """What the proxy is told once an op is done (committed or failed); None: nothing waits for it."""
    kind = op[0]
    if kind == "put":
        return ("put", op[2].length, op[1])
    if kind in ("remove", "flush"):
        return (kind, op[1])
    if kind == "clear":
        return ("clear",)
    return None


def _writer_main(directory: str, limit: int) -> None:
    """The writer process: operations from stdin, acknowledgements to stdout, until stdin ends."""
    dc = _open(Path(directory), limit)
    dc.cull_limit = 0  # this process only (not saved in the database): _Writer culls after each batch
    _Writer(dc, sys.stdin.buffer, sys.stdout.buffer).run()


class _Writer:
    """Applies the operations in order, a frame at a time; its writes are committed together."""

    BATCHED = frozenset({"put", "meta", "drop", "remove"})  # ops applied together in one SQLite transaction
    BATCH_OPS = 256  # a commit every 256 writes at most (about 0.2 s of misses at 1,000/s)
    BATCH_BYTES = 8 * 1024 * 1024

    # left free on the file system: a 50th of it (for the access log and others sharing it), and 512 KB
    # at least (SQLite's write-ahead log, which is kept under 256 KB while the tier is short of room)
    ROOM_KEPT, ROOM_SHARE = 512 * 1024, 50
    OP_BYTES = 2048  # a batch's rows beyond its bodies, per operation
    SHORT_WAL_PAGES = 64  # SQLite's wal_autocheckpoint while short of room (its default: 1000 pages)

    def __init__(self, dc, source, sink):
        self.dc, self.source, self.sink = dc, source, sink
        self.acks: list[tuple] = []
        self.limit = int(dc.size_limit)  # cache_dir_size; the file system may have room for less
        self.short = False  # it has: the tier keeps to that room
        self.room_all: int | None = None  # what the tier may hold on its file system, all told (last _fit)
        self.warned = NowAndThen()
        # the tier is culled after each batch: until then it may hold one batch (and one object) too many
        self.batch_bytes = min(self.BATCH_BYTES, max(1, self.limit // 16))

    def _warn(self, msg: str) -> None:
        self.acks.append(("log", msg))

    def _warn_now_and_then(self, what: str, msg: str) -> None:
        """_warn, once a minute at most for each kind of failure (a disk full to the last byte fails
        every batch)."""
        if (said := self.warned.say(what, msg)) is not None:
            self._warn(said)

    def run(self) -> None:
        try:
            self._fit()
            while True:
                try:
                    ops = _read_frame(self.source)
                except Exception:  # unreadable input: end as at EOF (the proxy logs that the writer exited)
                    ops = None
                if ops is None:
                    return
                self._apply_all(ops)
                acks, self.acks = self.acks, []
                self.sink.write(_frame(acks))
                self.sink.flush()
        finally:
            self.dc.close()

    def _apply_all(self, ops: list) -> None:
        """Consecutive writes in one transaction each (one commit instead of one per key); any other
        op (clear, flush) runs alone, after what came before it is committed."""
        i = 0
        while i < len(ops):
            if ops[i][0] not in self.BATCHED:
                self._apply_one(ops[i])
                i += 1
                continue
            batch, size = [], 0
            while i < len(ops) and ops[i][0] in self.BATCHED and len(batch) < self.BATCH_OPS \
                    and size < self.batch_bytes:
                batch.append(ops[i])
                if ops[i][0] == "put":
                    size += ops[i][2].length
                i += 1
            if self._fit(_room_needed(batch, self.OP_BYTES)):
                self._cull()  # the oldest objects make room for the batch first
            failed = []
            try:
                with self.dc.transact():
                    for one in batch:
                        try:
                            self._apply(one)
                        except Exception as e:
                            self._warn_now_and_then("write", f"cache: disk write failed ({one[0]}): {e}")
                            failed.append(one)
            except Exception as e:
                self._warn_now_and_then("write", f"cache: disk write failed (commit of {len(batch)} operations): {e}")
                failed = batch
            finally:
                self._forget_failed_puts(failed)
                for one in batch:
                    self._done(one)
            self._fit()
            self._cull()

    def _fit(self, need: int = 0) -> bool:
        """The tier's limit: cache_dir_size, or less where the file system has room for less (a small
        or shared disk), so that the oldest objects are evicted to make room instead of every write
        failing on a full disk; with `need`, room for that many bytes more (False: they would not fit
        even in an emptied tier, which is then left as it is). The tier grows back as room comes back."""
        try:
            st = os.statvfs(self.dc.directory)
            volume = self.dc.volume()
        except (OSError, sqlite3.Error):
            return False
        kept = max(self.ROOM_KEPT, st.f_blocks * st.f_frsize // self.ROOM_SHARE)
        room = volume + st.f_bavail * st.f_frsize - kept  # what the tier may hold, all told
        self.room_all = room
        if need and room < need:
            return False
        limit = max(0, min(self.limit, room - need))
        if limit != int(self.dc.size_limit):
            self.dc.reset("size_limit", limit, update=False)  # this process only: cache_dir_size stays saved
        if need:
            return True
        self.batch_bytes = min(self.BATCH_BYTES, max(1, limit // 16))
        # short again when the room comes back with a margin: a room about cache_dir_size says it once
        changed = room >= self.limit + max(self.ROOM_KEPT, self.limit // 16) if self.short else limit < self.limit
        if changed:
            self.short = not self.short
            self._short_wal(self.short)
            self._warn(f"cache: the file system of the disk cache has room for {max(0, room) >> 10} KB, less than "
                       f"cache_dir_size ({self.limit >> 20} MB): the disk tier keeps within it, evicting its "
                       "oldest objects" if self.short else "cache: the disk cache has room for cache_dir_size again")
        if self.short or changed:
            self.acks.append(("room", limit if self.short else None))  # for cache.stats
        return True

    def _short_wal(self, short: bool) -> None:
        """While the room is short, SQLite's write-ahead log is checkpointed every 256 KB and cut back
        to that size (by default it grows to 4 MB before, and keeps that size)."""
        pages, size = (self.SHORT_WAL_PAGES, self.SHORT_WAL_PAGES * 4096) if short else (1000, -1)
        try:
            self.dc._sql(f"PRAGMA wal_autocheckpoint = {pages}")
            self.dc._sql(f"PRAGMA journal_size_limit = {size}")
        except sqlite3.Error:
            pass

    def _forget_failed_puts(self, ops) -> None:
        """The copy a failed put was to replace must not answer in its place (a full disk): deleted
        if the disk lets it (else it answers, as if the failed write had come before it)."""
        for op in ops:
            if op[0] == "put":
                if op[4]:
                    _unlink(op[4])  # a streamed body's temp file the put did not take (a refused put)
                try:
                    self.dc.delete(DiskTier._mkey(op[1], op[2].vhash))
                except Exception:
                    pass

    def _cull(self) -> None:
        """Back under the size limit, least recently stored first, whole objects: a body's row goes
        with its metadata's, stored just after it (and renewed with it by a 304). (diskcache's cull
        takes ten rows at a time: five objects where one would do on a small disk, and a body
        without its metadata.)"""
        dc = self.dc
        try:
            while (over := dc.volume() - int(dc.size_limit)) > 0:
                rows = dc._sql("SELECT rowid, key, filename, size + ifnull(length(value), 0) FROM Cache "
                               "ORDER BY store_time, rowid LIMIT 32").fetchall()
                if not rows:
                    return
                gone, freed = [], 0
                for rowid, key, filename, size in rows:
                    gone.append((rowid, filename, key))
                    freed += size
                    if freed >= over and _is_meta_key(key):
                        break
                else:  # the chunk ended first: not on a body whose metadata row is the next one
                    while len(gone) > 1 and not _is_meta_key(gone[-1][2]):
                        gone.pop()
                with dc.transact():
                    dc._sql(f"DELETE FROM Cache WHERE rowid IN ({', '.join('?' * len(gone))})",
                            [rowid for rowid, _, _ in gone])
                for _, filename, _ in gone:  # after the commit, as diskcache does
                    if filename:
                        dc._disk.remove(filename)
        except Exception as e:  # (a file system full to the last byte: SQLite cannot even delete)
            self._warn_now_and_then("eviction", f"cache: disk eviction failed: {e}")

    def _apply_one(self, op) -> None:
        try:
            self._apply(op)
        except Exception as e:
            self._warn_now_and_then("write", f"cache: disk write failed ({op[0]}): {e}")
            self._forget_failed_puts([op])
        finally:
            self._done(op)

    def _get(self, key: str):
        """dc.get(key), a value that cannot be read back (damaged bytes) taken as absent: the write
        replaces it, or the removal deletes it (else the key could never be stored again)."""
        try:
            return self.dc.get(key)
        except sqlite3.Error:
            raise
        except Exception as e:
            self._warn(f"cache: an unreadable value on disk ({key[:200]!r}: {e}) is replaced")
            return None

    def _done(self, op) -> None:
        ack = _ack_of(op)
        if ack is not None:
            self.acks.append(ack)

    def _apply(self, op) -> None:
        kind = op[0]
        dc = self.dc
        mkey, ikey = DiskTier._mkey, DiskTier._ikey
        if kind == "put":
            _, primary, meta, body, path, vary_sets, stored_before = op
            # larger than the room: it would evict every other object, then itself (a streamed body's temp
            # file is already out of the free bytes that room counts)
            if self.room_all is not None and meta.length + self.OP_BYTES > self.room_all + (meta.length if path else 0):
                raise OSError(errno.ENOSPC, f"a body of {meta.length} bytes is larger than the room the disk "
                                            f"cache has ({max(0, self.room_all) >> 10} KB)")
            if path or len(body) > DiskTier.INLINE_MAX:  # a file of its own: never a part of one left on a full disk
                st = os.statvfs(dc.directory)
                if st.f_bavail * st.f_frsize < meta.length:
                    raise OSError(errno.ENOSPC, f"no room on its file system for a body of {meta.length} bytes")
            key = mkey(primary, meta.vhash)
            old = _meta_of(self._get(key)) if stored_before else None
            if path:
                with open(path, "rb") as f:
                    dc.set(f"b|{meta.body_id}", f, read=True)
                _unlink(path)
                value = meta
            elif len(body) <= DiskTier.INLINE_MAX:
                value = (meta, body)
            else:
                dc.set(f"b|{meta.body_id}", body)
                value = meta
            sets = list(vary_sets or [NO_VARY])
            idx = _index_of(self._get(ikey(primary))) if stored_before else None
            if idx is not None or sets != [NO_VARY] or meta.vhash != vary_hash(NO_VARY):  # (a partial one)
                vhs = list(idx[1]) if idx else [vary_hash(NO_VARY)]  # a no-Vary entry may be there
                if meta.vhash not in vhs:
                    vhs.append(meta.vhash)
                dc.set(ikey(primary), (sets, vhs))
            dc.set(key, value)  # last: makes the entry visible
            if old is not None and old.body_id != meta.body_id:
                dc.delete(f"b|{old.body_id}")
        elif kind == "meta":
            _, primary, meta = op
            key = mkey(primary, meta.vhash)
            cur = self._get(key)
            old = _meta_of(cur)
            if old is not None and old.body_id == meta.body_id:
                if not isinstance(cur, tuple):  # its body's row: stored anew with it (evicted with it)
                    dc._sql("UPDATE Cache SET store_time = ? WHERE key = ? AND raw = 1",
                            (time.time(), f"b|{meta.body_id}"))
                dc.set(key, (meta, cur[1]) if isinstance(cur, tuple) else meta)
        elif kind == "drop":
            meta = op[1]
            primary = meta.url
            old = _meta_of(self._get(mkey(primary, meta.vhash)))
            if old is not None and old.body_id == meta.body_id:
                dc.delete(mkey(primary, meta.vhash))
            dc.delete(f"b|{meta.body_id}")
        elif kind == "remove":
            primary = op[1]
            idx = _index_of(self._get(ikey(primary)))
            dc.delete(ikey(primary))
            for vh in (idx[1] if idx else [vary_hash(NO_VARY)]):
                old = _meta_of(self._get(mkey(primary, vh)))
                dc.delete(mkey(primary, vh))
                if old is not None:
                    dc.delete(f"b|{old.body_id}")
        elif kind == "clear":
            dc.clear()



class NowAndThen:
    """Once a minute at most for each kind of failure (a full disk fails every streamed body, every
    batch of writes): `say(what, msg)` returns the message to say now, telling how many were not since,
    or None."""

    def __init__(self) -> None:
        self.said: dict[str, tuple[float, int]] = {}  # a kind: when it was said last, and how often since

    def say(self, what: str, msg: str) -> str | None:
        now = time.monotonic()
        last, held = self.said.get(what, (-60.0, 0))
        if now - last < 60:
            self.said[what] = (last, held + 1)
            return None
        self.said[what] = (now, 0)
        return f"{msg} (and {held} more in the last minute)" if held else msg


_WARNED = NowAndThen()  # this process's (the writer process has its own)


def warn_now_and_then(what: str, msg: str, *args) -> None:
    """log.warning(msg % args), at most once a minute for each `what`."""
    if (said := _WARNED.say(what, msg % args if args else msg)) is not None:
        log.warning("%s", said)


def _is_meta_key(key) -> bool:
    """A metadata row's key (DiskTier._mkey); a body's, a Vary index's and diskcache's own are others."""
    return isinstance(key, str) and key.startswith("m|")


def _meta_of(value) -> Meta | None:
    """The metadata of a stored value: Meta, or (Meta, body) for a small body stored with it; None
    for anything else (a damaged or foreign value that unpickled: it must not break a read or a write)."""
    if isinstance(value, tuple):
        if len(value) != 2 or not isinstance(value[1], bytes):
            return None
        value = value[0]
    if not isinstance(value, Meta) or not all(hasattr(value, name) for name in _META_FIELDS):
        return None
    if not (isinstance(value.url, str) and isinstance(value.headers, list) and isinstance(value.length, int)
            and isinstance(value.digest, str) and isinstance(value.vary_key, tuple)
            and isinstance(value.body_id, str)):
        return None
    return value


def _index_of(value) -> tuple | None:
    """An index value, (Vary field sets, vary hashes), or None if it is not one."""
    if (isinstance(value, (tuple, list)) and len(value) == 2 and isinstance(value[0], (list, tuple))
            and isinstance(value[1], (list, tuple)) and all(isinstance(v, tuple) for v in value[0])
            and all(isinstance(v, str) for v in value[1])):
        return value
    return None


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
        if self.disk is not None:
            self.mem.on_evict = self.disk.keep_until_written
        # as Squid's cache_dir: an object larger than the whole tier would only evict everything else
        self.disk_object_max = min(object_max, disk_limit)
        # primary -> the Vary field sets stored for it, most recent first. Values are tuples, and
        # the common one (no Vary) is one shared object: 200,000 keys cost their strings and
        # nothing the garbage collector has to walk (a list each made every full collection slower
        # as the proxy aged).
        self.vary_index: OrderedDict[str, tuple[tuple[str, ...], ...]] = OrderedDict()
        self.VARY_INDEX_MAX = 200_000

    # --- lookups ---
    def vary_sets(self, primary: str) -> tuple[tuple[str, ...], ...]:
        sets = self.vary_index.get(primary)
        if sets is None and self.disk is not None:
            sets = self.disk.vary_sets(primary)
            if sets is not None:
                sets = self._remember_vary(primary, sets)
        return sets or ()

    def _remember_vary(self, primary: str, sets) -> tuple[tuple[str, ...], ...]:
        sets = ONLY_NO_VARY if len(sets) == 1 and sets[0] == NO_VARY else tuple(sets)
        self.vary_index[primary] = sets
        self.vary_index.move_to_end(primary)
        if len(self.vary_index) > self.VARY_INDEX_MAX:
            self.vary_index.popitem(last=False)
        return sets

    def get(self, primary: str, vh: str) -> tuple[Entry | None, str | None]:
        e = self.mem.get((primary, vh))
        if e is not None:
            return e, "mem"
        if self.disk is None:
            return None, None
        got = self.disk.get_entry(primary, vh)
        if got is None:
            return None, None
        if got[1] is None:
            return None, SWAPFAIL
        e = Entry(*got)
        self.mem.put((primary, vh), e)  # promotion by use
        return e, "disk"

    # --- writes ---
    def add_vary(self, primary: str, fields: tuple[str, ...]) -> tuple[tuple[str, ...], ...]:
        sets = self.vary_sets(primary)
        if fields not in sets:
            sets = (fields, *(s for s in sets if s != fields))
        return self._remember_vary(primary, sets)

    def put(self, primary: str, meta: Meta, body: bytes) -> str | None:
        """Store a complete response; returns the tier(s) it went to, or None if too big."""
        if meta.length > self.object_max:
            return None
        sets = self.add_vary(primary, meta.vary)
        in_mem = self.mem.put((primary, meta.vhash), Entry(meta, body))
        on_disk = self.disk.put(primary, meta, body=body, vary_sets=sets, keep=not in_mem) \
            if self.disk and meta.length <= self.disk_object_max else False
        if self.disk and not on_disk and not self.disk.failed:  # too big for it, or the writer is behind:
            self.disk.remove(primary, urgent=False)  # an older copy there must not come back (a dead writer
            # reads nothing till the next start, and what RAM holds is gone then)
        return "mem+disk" if in_mem and on_disk else "mem" if in_mem else "disk" if on_disk else None

    def put_file(self, primary: str, meta: Meta, path: str) -> bool:
        """Store a streamed body already written to `path` (disk tier only); the file is consumed."""
        if self.disk is None or meta.length > self.disk_object_max:
            _unlink(path)
            return False
        sets = self.add_vary(primary, meta.vary)
        self.mem.remove((primary, meta.vhash))
        return self.disk.put(primary, meta, path=path, vary_sets=sets, keep=True)

    def update_meta(self, primary: str, meta: Meta, body: bytes) -> None:
        """New metadata (a 304's, RFC 9111 4.3.4) for the stored response it validated; nothing for
        one that is no longer stored (replaced, purged or evicted while the origin answered)."""
        key = (primary, meta.vhash)
        e = self.mem.get(key)
        if e is not None:
            if e.meta.body_id == meta.body_id:
                self.mem.put(key, Entry(meta, e.body))  # counted anew: the new fields may weigh more
        elif self.disk is not None and self.mem.fits(meta) and self.disk.body_id(primary, meta.vhash) == meta.body_id:
            self.mem.put(key, Entry(meta, body))  # out of RAM meanwhile, still on disk: back by use
        if self.disk:
            self.disk.update_meta(primary, meta)  # the writer updates only the same body's entry

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
