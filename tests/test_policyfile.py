"""addons/policyfile.py: YAML aliases that would blow a small policy file up into a huge one (a "billion
laughs") are refused with file, line and reason by all three policy kinds (access, anonymize, cache),
before anything is expanded; ordinary reuse of an anchored list keeps working."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from addons import aclrules, anonrules, cache, policyfile

ROOT = Path(__file__).resolve().parents[1]
ACL_TAIL = "  loopback: src 127.0.0.1\nhttp_access:\n  - allow loopback\n"


def laughs(levels: int, top: str, item: str, tail: str = "") -> str:
    """`top:` holding b0 = [item, item] and each b<i> = [*a<i-1>, *a<i-1>]: 2**(levels+1) items from a few
    hundred bytes. Line 1 is `top:`, b<i> is on line i + 2."""
    lines = [f"{top}:", f"  b0: &a0 [{item}, {item}]"]
    lines += [f"  b{i}: &a{i} [*a{i - 1}, *a{i - 1}]" for i in range(1, levels + 1)]
    return "\n".join(lines) + "\n" + tail


# Each kind's loader, and a section of its policy where a list can stand.
KINDS = {
    "access": (lambda text: aclrules.load_yaml_text(text, "p.yaml"), "acls", '"port 80"', ACL_TAIL),
    "anonymize": (lambda text: anonrules.load_policy(text, "p.yaml"), "lists", "X-A", ""),
    "cache": (lambda text: cache.load_policy(text, "p.yaml"), "targeted_fields", "X-A", ""),
}
ERRORS = (aclrules.PolicyError, policyfile.PolicyError)


@pytest.mark.parametrize("kind", KINDS)
def test_nested_aliases_are_refused_at_the_alias_that_goes_over(kind):
    load, top, item, tail = KINDS[kind]
    with pytest.raises(ERRORS) as e:
        load(laughs(16, top, item, tail))  # 262,142 values once expanded
    # b14 = [*a13, *a13] is where the aliases pass 100,000 values: line 16, before b16
    assert e.value.line == 16
    assert "p.yaml" in str(e.value) and "alias *a13" in e.value.reason and "100,000" in e.value.reason


def test_an_alias_inside_the_value_it_names_is_refused():
    # (the other kinds refused it already, as "unconstructable"; the acl loader recursed until it crashed)
    with pytest.raises(aclrules.PolicyError) as e:
        aclrules.load_yaml_text(f"acls:\n  b0: &r [port 80, *r]\n{ACL_TAIL}", "p.yaml")
    assert e.value.line == 2 and "alias *r is inside the value it names" in e.value.reason


def test_the_limit_counts_what_aliases_add_not_what_the_file_spells_out():
    thousand = "[" + ", ".join(str(i) for i in range(1000)) + "]"
    written = "w: " + "[" + ", ".join(str(i) for i in range(5000)) + "]\n"
    text = f"{written}a: &x {thousand}\n" + "".join(f"b{i}: *x\n" for i in range(99))
    doc = policyfile.load(text, "p.yaml")  # 99 aliases add 99 * 1001 values, and 6,000 are written out
    assert len(doc) == 101 and doc["b98"] == list(range(1000))
    with pytest.raises(policyfile.PolicyError) as e:  # one more alias: 100,100 values added
        policyfile.load(text + "c: [-1, *x]\n", "p.yaml")
    assert str(e.value).startswith("p.yaml:102: alias *x: ")


def test_anchored_lists_reused_a_few_times_keep_working():
    p = aclrules.load_yaml_text("acls:\n  web: &web [port 80, port 443]\n  also: [*web, *web, port 8080]\n"
                                "http_access:\n  - allow also\n", "p.yaml")
    req = dict(src="127.0.0.1")
    assert p.check(aclrules.Request(port=443, **req)).allowed and p.check(aclrules.Request(port=8080, **req)).allowed
    assert not p.check(aclrules.Request(port=22, **req)).allowed
    shipped = anonrules.load_policy((ROOT / "policies" / "anonymize.yaml").read_text(), "anonymize.yaml")
    assert "x-forwarded-for" in shipped.levels["anonymous"].remove  # from `*client_address`
    c = cache.load_policy('cache: &rules ["deny QUERY"]\nstore_miss: *rules\n<<: {send_hit: *rules}\n', "p.yaml")
    assert c.access["cache"] == c.access["store_miss"] == c.access["send_hit"]


def test_check_command_refuses_a_500_byte_alias_bomb_quickly(tmp_path):
    policy = tmp_path / "laughs.yaml"
    policy.write_text(laughs(18, "acls", '"port 80"', ACL_TAIL))
    assert policy.stat().st_size < 600
    out = subprocess.run([sys.executable, "-m", "addons.aclrules", "check", str(policy)], cwd=ROOT,
                         capture_output=True, text=True, timeout=20)
    assert out.returncode == 1, out.stdout
    assert out.stderr.startswith(f"{policy}:16: YAML: alias *a13: ") and "100,000 values" in out.stderr


def test_a_watched_policy_file_that_goes_missing_is_reported_once(tmp_path, caplog):
    path = tmp_path / "p.yaml"
    path.write_text("a: 1\n")
    watch = policyfile.Watch(path, policyfile.stamp(path))
    path.unlink()
    for _ in range(4):
        watch.next = 0  # (checked at most once a second)
        assert not watch.changed()  # nothing to read: the policy in force stays
    assert caplog.text.count(f"policy file {path} is missing") == 1
    path.write_text("a: 2\n")
    watch.next = 0
    assert watch.changed()


def test_acl_names_warns_of_an_undefined_acl_once_per_access_policy_and_again_after_a_reset():
    warned = []
    names = policyfile.AclNames(lambda: [("cache.yaml:3: cache deny QEURY", "QEURY"), ("cache.yaml:4", "all")],
                                warned.append)

    def request(defined):
        return defined, {"action": "allow", "rule": "http_access allow all", "policy": "access.yaml"}

    first, second = ("QUERY", "all"), ("QEURY", "all")
    names.check(None, None)  # no access policy judged it: nothing to check against
    names.check(*request(first))
    names.check(*request(first))
    assert warned == ["cache.yaml:3: cache deny QEURY names acl 'QEURY', which access.yaml does not define: "
                      "it never matches"]
    names.check(*request(second))  # the access policy defines it now
    names.check(*request(first))   # back to the first one: already said
    assert len(warned) == 1
    names.reset()                 # the rules changed
    names.check(*request(first))
    assert len(warned) == 2
