"""addons/suite.py: several addons run as one, with mitmproxy's own rules (order, awaiting, errors)."""
from __future__ import annotations

import asyncio
import logging

import pytest
from mitmproxy import command, exceptions, http
from mitmproxy.flow import Error
from mitmproxy.test import taddons, tflow

from addons import meta
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


def test_an_error_is_logged_the_later_members_run_and_the_request_is_refused(caplog):
    """As if each member were loaded by itself: the later members (anonymization, the access log) still
    run; and a request some member failed to handle is not forwarded as if judged (fail closed)."""
    calls = []
    s = Suite(Recorder("before", calls), Broken(), Recorder("after", calls))
    f = tflow.tflow()
    with caplog.at_level(logging.ERROR):
        assert s.requestheaders(f) is None
    assert calls == [("before", None), ("after", "before")]
    assert "Addon error: boom" in caplog.text and "ValueError" in caplog.text
    assert f.response.status_code == 500 and f.response.headers["X-Squid-Error"] == "ERR_GATEWAY_FAILURE 0"
    assert f.metadata[meta.LOCAL] == "suite" and f.metadata[meta.CODE] == "NONE_NONE"
    assert "boom" not in f.response.get_text()  # the client learns nothing of the proxy's insides


class BrokenLater(Slow):
    def requestheaders(self, flow):
        async def later():
            raise ValueError("late boom")
        return later()


def test_an_error_in_an_awaited_hook_lets_the_later_members_run_too(caplog):
    calls = []
    s = Suite(BrokenLater("x", calls), Recorder("after", calls))
    f = tflow.tflow()
    with caplog.at_level(logging.ERROR):
        asyncio.run(s.requestheaders(f))
    assert calls == [("after", None)] and "Addon error: late boom" in caplog.text
    assert f.response.status_code == 500


def test_an_answer_already_given_is_kept_when_a_later_member_fails():
    class Answers:
        def requestheaders(self, flow):
            flow.response = http.Response.make(403)
    f = tflow.tflow()
    Suite(Answers(), Broken()).requestheaders(f)
    assert f.response.status_code == 403


def test_a_raw_stream_whose_hook_failed_is_killed():
    class BrokenStream:
        def tcp_message(self, flow):
            raise ValueError("boom")
    f = tflow.ttcpflow()
    Suite(BrokenStream()).tcp_message(f)
    assert f.error and f.error.msg == Error.KILLED_MESSAGE


def test_an_error_in_a_response_hook_refuses_nothing_and_the_log_still_runs():
    calls = []

    class BrokenResponse:
        def response(self, flow):
            raise ValueError("boom")

    class Logger:
        def response(self, flow):
            calls.append(flow.response.status_code)
    f = tflow.tflow(resp=True)
    Suite(BrokenResponse(), Logger()).response(f)
    assert calls == [200] and f.response.status_code == 200


class AsyncRunning:
    async def running(self):
        pass


def test_a_coroutine_lifecycle_hook_is_refused():
    with pytest.raises(TypeError, match="AsyncRunning.running"):
        Suite(AsyncRunning())


class Cache:  # named like the real one: mitmproxy knows addons by their lower-cased class name
    pass


def test_members_are_known_to_mitmproxy_by_name_and_not_loaded_twice():
    member = Cache()
    with taddons.context(Suite(member, Recorder("x", []))) as tctx:
        assert tctx.master.addons.get("cache") is member
        with pytest.raises(exceptions.AddonManagerError, match="'cache' already exists"):
            tctx.master.addons.add(Cache())  # -s addons/all.py -s addons/cache.py
    alone = Cache()
    with taddons.context(alone) as tctx:
        with pytest.raises(exceptions.AddonManagerError, match="'cache' already exists"):
            tctx.master.addons.add(Suite(Cache(), Recorder("x", [])))  # the other order
        assert tctx.master.addons.get("cache") is alone and tctx.master.addons.get("recorder") is None


def test_done_takes_the_members_names_back():
    s = Suite(Cache())
    with taddons.context(s) as tctx:
        tctx.master.addons.remove(s)
        assert tctx.master.addons.get("cache") is None
        tctx.master.addons.add(Suite(Cache()))  # as a script reload does


def test_options_configure_and_commands_of_members_reach_mitmproxy():
    member = WithOption()
    s = Suite(member, Recorder("x", []))
    with taddons.context(s) as tctx:
        tctx.configure(s, suite_test_value=5)
        assert member.configured[-1] == 5
        with pytest.raises(exceptions.OptionsError):
            tctx.configure(s, suite_test_value=-1)
        assert tctx.master.commands.call("suitetest.hello") == "hello"


def test_the_script_module_names_every_hook_so_mitmproxy_finds_none_missing():
    """mitmproxy looks every event up on the script module; all.py names them all, as None
    where the module has no hook of its own, and mitmproxy then calls nothing there."""
    import types

    from mitmproxy import hooks
    from addons.suite import no_missing_hooks

    ns = types.ModuleType("script")
    ns.addons = [Suite(Recorder("a", []))]
    ns.request = print  # a hook the module defines itself is kept
    no_missing_hooks(ns.__dict__)
    assert all(hasattr(ns, event) for event in hooks.all_hooks if event != "add_log")
    assert not hasattr(ns, "add_log"), "mitmproxy would warn that the add_log hook is deprecated"
    assert ns.request is print and ns.requestheaders is None and ns.update is None
    with taddons.context() as tctx:
        manager = tctx.master.addons
        called = lambda event: [a for a, _ in manager._iter_hooks(ns, event)]  # noqa: E731
        f = tflow.tflow()
        assert called(hooks.all_hooks["requestheaders"](f)) == [ns.addons[0]]
        assert called(hooks.UpdateHook([f])) == []
        assert called(hooks.all_hooks["request"](f)) == [ns]


def test_all_py_names_every_hook():
    import addons.all as suite_script
    from mitmproxy import hooks
    # the hooks registered by the modules suite.py imports (mitmproxy.log's add_log is left out)
    assert all(hasattr(suite_script, event) for event in hooks.all_hooks if event != "add_log")
    assert not hasattr(suite_script, "add_log")


class Observer(Recorder):
    first_hooks = {"requestheaders": "note", "response": "broken_note"}

    def note(self, flow):
        self.calls.append((self.name, "noted"))

    def broken_note(self, flow):
        raise ValueError("observer boom")

    def response(self, flow):
        self.calls.append((self.name, "response"))


def test_first_hooks_run_before_every_member_and_their_errors_skip_nothing(caplog):
    calls: list = []
    suite = Suite(Slow("a", calls), Observer("log", calls))
    f = tflow.tflow(resp=True)

    async def run():
        await suite.requestheaders(f)
    asyncio.run(run())
    # the observer's note came before the awaited hook; its own requestheaders ran in its place
    assert calls == [("log", "noted"), ("a", "started"), ("a", "done"), ("log", "a")]
    calls.clear()
    assert suite.response(f) is None
    assert calls == [("log", "response")] and "observer boom" in caplog.text


def test_a_first_hook_that_is_the_members_own_hook_runs_once():
    calls: list = []

    class Same(Recorder):
        first_hooks = {"requestheaders": "requestheaders"}
    suite = Suite(Recorder("a", calls), Same("b", calls))
    suite.requestheaders(tflow.tflow())
    assert calls == [("b", None), ("a", "b")]


def test_a_coroutine_first_hook_is_refused():
    class Bad:
        first_hooks = {"requestheaders": "note"}

        async def note(self, flow):
            pass
    with pytest.raises(TypeError, match="first hook"):
        Suite(Bad())


def test_an_awaitable_from_a_first_hook_is_an_error_that_skips_nothing(caplog):
    calls: list = []

    class Sneaky(Recorder):
        first_hooks = {"requestheaders": "note"}

        def note(self, flow):
            return asyncio.sleep(0)
    suite = Suite(Recorder("a", calls), Sneaky("b", calls))
    assert suite.requestheaders(tflow.tflow()) is None
    assert calls == [("a", None), ("b", "a")] and "returned an awaitable" in caplog.text
