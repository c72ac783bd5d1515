"""YAML policy files with line numbers: what Relais's policy loaders share.

`load(text, source)` parses with PyYAML's safe loader, but mappings and sequences
remember the line of each key and item, and a duplicate key is an error (PyYAML
silently keeps the last). Every mistake is a PolicyError saying `source:N: reason`
(as the access policy's and as compilers say it: editors jump to the line).
`CheckedLoader` (also the acl loader's) refuses aliases that would expand a small file into a huge
policy (a "billion laughs"), while composing, before anything is expanded.
`Watch` tells when a policy file changed, for the addons that re-read theirs; `poll` looks
on an idle proxy too.
"""
from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import yaml


class PolicyError(ValueError):
    """A policy file mistake, with where it is."""

    def __init__(self, source: str, line: int | None, reason: str):
        self.source, self.line, self.reason = source, line, reason
        where = f"{source}:{line}" if line else source
        super().__init__(f"{where}: {reason}")


class Map(dict):
    line: int | None = None
    key_lines: dict = {}


class Seq(list):
    line: int | None = None
    item_lines: list = []


ALIAS_LIMIT = 100_000  # values YAML aliases may add to what a file spells out; reuse is far below


class AliasError(yaml.composer.ComposerError):
    """An alias that makes the document too large, or that is inside what it names."""


class CheckedLoader(yaml.SafeLoader):
    """SafeLoader that refuses an alias once the aliases so far add more than ALIAS_LIMIT values: aliases of
    aliases double at each level, and a few hundred bytes would become millions of acl lines or list
    entries to walk. Counted while composing, from each node's size once expanded (kept per node)."""

    def __init__(self, stream):
        super().__init__(stream)
        self.sizes = {}  # node -> values it stands for, once composed
        self.added = 0   # values the aliases used so far add

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            node = self.anchors.get(event.anchor)
            if node is not None:  # (an undefined alias is PyYAML's error)
                if node not in self.sizes:  # its anchor is still open: the node would contain itself
                    raise AliasError(None, None, f"alias *{event.anchor} is inside the value it names",
                                     event.start_mark)
                self.added += self.sizes[node]
                if self.added > ALIAS_LIMIT:
                    raise AliasError(None, None, f"alias *{event.anchor}: the aliases so far would add more than "
                                     f"{ALIAS_LIMIT:,} values to the policy (aliases of aliases multiply); "
                                     f"write long lists out, or put them in a file", event.start_mark)
            return super().compose_node(parent, index)
        node = super().compose_node(parent, index)
        if isinstance(node, yaml.SequenceNode):
            self.sizes[node] = 1 + sum(self.sizes[n] for n in node.value)
        elif isinstance(node, yaml.MappingNode):
            self.sizes[node] = 1 + sum(self.sizes[k] + self.sizes[v] for k, v in node.value)
        else:
            self.sizes[node] = 1
        return node


class _Loader(CheckedLoader):
    """CheckedLoader whose mappings and sequences remember their line numbers."""


def _construct_map(loader: _Loader, node: yaml.MappingNode) -> Map:
    loader.flatten_mapping(node)
    out = Map()
    out.line = node.start_mark.line + 1
    out.key_lines = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        try:
            hash(key)
        except TypeError:
            raise PolicyError("?", key_node.start_mark.line + 1, "a mapping key must be a plain value")
        if key in out:
            raise PolicyError("?", key_node.start_mark.line + 1, f"duplicate key {key!r}")
        out[key] = loader.construct_object(value_node, deep=True)
        out.key_lines[key] = key_node.start_mark.line + 1
    return out


def _construct_seq(loader: _Loader, node: yaml.SequenceNode) -> Seq:
    out = Seq(loader.construct_object(n, deep=True) for n in node.value)
    out.line = node.start_mark.line + 1
    out.item_lines = [n.start_mark.line + 1 for n in node.value]
    return out


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_map)
_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_SEQUENCE_TAG, _construct_seq)


def load(text: str, source: str = "<policy>"):
    """The document, its mappings and sequences as Map and Seq; raises PolicyError."""
    try:
        return yaml.load(text, Loader=_Loader)
    except PolicyError as e:
        raise PolicyError(source, e.line, e.reason) from None
    except AliasError as e:  # valid YAML, refused
        raise PolicyError(source, e.problem_mark.line + 1, e.problem) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        reason = " ".join(str(p) for p in (getattr(e, "context", None), getattr(e, "problem", None)) if p) or str(e)
        raise PolicyError(source, mark.line + 1 if mark else None, f"not valid YAML: {reason}") from None
    except RecursionError:  # the parser recurses once per level of nesting
        raise PolicyError(source, None, "nested too deep to be a policy") from None


def line_of(parent, key) -> int | None:
    """The line of parent[key] (a Map key or a Seq item), else of parent itself."""
    if isinstance(parent, Map):
        return parent.key_lines.get(key, parent.line)
    if isinstance(parent, Seq) and isinstance(key, int) and key < len(parent.item_lines):
        return parent.item_lines[key]
    return getattr(parent, "line", None)


CHECK_EVERY = 1.0  # seconds between two looks at a watched policy file


def stamp(path: Path) -> tuple | None:
    """A file's (mtime, size), None if it cannot be read."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size


class Watch:
    """A policy file (and the files it includes, `also`) looked at once every CHECK_EVERY seconds,
    from a request hook (no thread)."""

    def __init__(self, path: Path | None = None, read_stamp: tuple | None = None, also=()):
        self.path, self.stamp = path, read_stamp  # the stamp taken before the file was last read
        self.also = {p: stamp(Path(p)) for p in also}  # included files and glob folders (once read)
        self.next = time.monotonic() + CHECK_EVERY
        self.gone = 0  # checks in a row that found the policy file missing

    def changed(self) -> bool:
        """True, at most once a second, when a file differs from what was last read or refused
        (a file being replaced may be missing a moment: not a change)."""
        now = time.monotonic()
        if self.path is None or now < self.next:
            return False
        self.next = now + CHECK_EVERY
        self.gone = self.gone + 1 if stamp(Path(self.path)) is None else 0
        if self.gone == 2:  # not a file being replaced: gone for a second and more
            logging.getLogger(__name__).warning("policy file %s is missing; the policy read last stays in force",
                                                self.path)
        for path, old in ((self.path, self.stamp), *self.also.items()):
            new = stamp(Path(path))
            if new is not None and new != old:
                return True
        return False

    def refused(self, also=()) -> None:
        """The files as they are now could not be read: not tried again until one changes again, or
        one of `also` (what the refused version included)."""
        self.stamp = stamp(self.path)
        self.also = {p: stamp(Path(p)) for p in [*self.also, *also]}


def poll(check) -> asyncio.Task | None:
    """Call check() every CHECK_EVERY seconds on the running event loop (None without one), so that an
    edit is applied, or refused with its error in the log, when it is saved, not at the next request."""
    async def loop():
        while True:
            await asyncio.sleep(CHECK_EVERY)
            try:
                check()
            except Exception:  # the next look tries again; the error is the check's to report
                logging.getLogger(__name__).exception("policy check failed")
    try:
        return asyncio.get_running_loop().create_task(loop())
    except RuntimeError:
        return None


class AclNames:
    """Rules of another Relais policy naming an acl the access policy lacks (a typo) never match, so
    they are warned of: once per access policy, and again after either policy changes (`reset`).
    `uses()`: the (where, acl name) pairs of the rules in force; `warn`: a logger's warning, given
    the sentences of undefined_acls. `check` takes what a request brings: relais.acl_names (a tuple
    of the access policy's acl names) and relais.acl (the verdict, which names the policy's file)."""

    def __init__(self, uses, warn):
        self.uses, self.warn = uses, warn
        self.reset()

    def reset(self) -> None:
        self.seen = None  # the acl names of the last request (a check costs a look-up when they are the same)
        self.checked: set[tuple] = set()  # all those the rules were checked against

    def check(self, defined: tuple | None, verdict: dict | None) -> None:
        if defined is None or defined is self.seen:
            return
        self.seen = defined
        if defined in self.checked:  # (requests judged before and after a reload of the access policy)
            return
        self.checked.add(defined)
        for msg in undefined_acls(self.uses(), defined, (verdict or {}).get("policy", "")):
            self.warn(msg)


def undefined_acls(uses, defined, access: str) -> list[str]:
    """Squid refuses a rule that names an acl it does not know. Rules of other Relais policies name the
    access policy's acls, known only when a request brings their names (relais.acl_names): `uses` are
    (where, acl name) pairs, `defined` those names, `access` the access policy's file. One sentence per
    unknown name, for a warning (such a rule never matches)."""
    return [f"{where} names acl {name!r}, which {access} does not define: it never matches"
            for where, name in uses if name not in defined]
