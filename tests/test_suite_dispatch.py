"""addons/suite.py: several addons run as one, with mitmproxy's own rules (order, awaiting, errors)."""
from __future__ import annotations

import asyncio
import logging

import pytest
from mitmproxy import command, exceptions
from mitmproxy.test import taddons, tflow

from addons.suite import Suite


class Recorder:
    def __init__(self, name: str, calls: list):
        self.name, self.calls = name, calls

    def requestheaders(self, flow):
        self.calls.append((self.name, flow.metadata.get("seen")))
        flow.metadata["seen"] = self.name


class Slow(Recorder):
    def requestheaders(self, flow):
        async def later():
            await asyncio.sleep(0.01)
            self.calls.append((self.name, "done"))
            flow.metadata["seen"] = self.name
        self.calls.append((self.name, "started"))
        return later()


class Broken:
    def requestheaders(self, flow):
        raise ValueError("boom")


class WithOption:
    def __init__(self):
        self.configured = []

    def load(self, loader):
        loader.add_option("suite_test_value", int, 1, "A value for the suite dispatch test.")

    def configure(self, updated):
        if "suite_test_value" in updated:
            if ctx_value() < 0:
                raise exceptions.OptionsError("suite_test_value: negative")
            self.configured.append(ctx_value())

    @command.command("suitetest.hello")
    def hello(self) -> str:
        return "hello"


def ctx_value() -> int:
    from mitmproxy import ctx
    return ctx.options.suite_test_value


def test_hooks_run_in_member_order():
    calls = []
    s = Suite(Recorder("a", calls), Recorder("b", calls))
    f = tflow.tflow()
    assert s.requestheaders(f) is None
    assert calls == [("a", None), ("b", "a")]


def test_only_hooks_some_member_has_are_exposed():
    s = Suite(Recorder("a", []))
    assert hasattr(s, "requestheaders") and not hasattr(s, "response") and not hasattr(s, "addons")


def test_an_awaitable_hook_holds_back_the_next_member():
    calls = []
    s = Suite(Slow("slow", calls), Recorder("after", calls))
    f = tflow.tflow()
    pending = s.requestheaders(f)
    assert calls == [("slow", "started")]  # the next member waits
    asyncio.run(pending)
    assert calls == [("slow", "started"), ("slow", "done"), ("after", "slow")]


def test_an_error_is_logged_and_the_next_member_still_runs(caplog):
    calls = []
    s = Suite(Broken(), Recorder("after", calls))
    with caplog.at_level(logging.ERROR):
        s.requestheaders(tflow.tflow())
    assert calls == [("after", None)]
    assert "Addon error: boom" in caplog.text and "ValueError" in caplog.text


def test_options_configure_and_commands_of_members_reach_mitmproxy():
    member = WithOption()
    s = Suite(member, Recorder("x", []))
    with taddons.context(s) as tctx:
        tctx.configure(s, suite_test_value=5)
        assert member.configured[-1] == 5
        with pytest.raises(exceptions.OptionsError):
            tctx.configure(s, suite_test_value=-1)
        assert tctx.master.commands.call("suitetest.hello") == "hello"
