"""Unit tests of addons/rfc9111.py, section by section of RFC 9111 (and RFC 5861)."""
from __future__ import annotations

import pytest

from addons import rfc9111 as r

NOW = 1_800_000_000.0
DATE = r.format_http_date(NOW)


def H(**kw):
    """Header list from keyword args (underscores become dashes); list values repeat the field."""
    out = []
    for k, v in kw.items():
        name = k.replace("_", "-")
        for value in (v if isinstance(v, list) else [v]):
            out.append((name, value))
    return out


# --- 1.2.2 delta-seconds ----------------------------------------------------

class TestDeltaSeconds:
    def test_plain(self):
        assert r.parse_cache_control("max-age=60").delta("max-age") == 60

    def test_overflow_capped_at_2_31(self):
        assert r.parse_cache_control("max-age=99999999999999999999").delta("max-age") == 2147483648

    @pytest.mark.parametrize("value", ["max-age=-1", "max-age=abc", "max-age", "max-age="])
    def test_invalid(self, value):
        assert r.parse_cache_control(value).delta("max-age") is r.INVALID

    def test_values_too_large_to_represent_are_2_to_the_31(self):
        # 1.2.2; Python's int() refuses more than 4300 digits
        assert r.parse_cache_control("max-age=" + "9" * 5000).delta("max-age") == 2 ** 31
        assert r.parse_cache_control("s-maxage=99999999999").delta("s-maxage") == 2 ** 31
        assert r.age_value(H(age="9" * 5000)) == 2 ** 31
        assert r.parse_cache_control("max-age=" + "0" * 5000 + "60").delta("max-age") == 60  # not large


# --- 5.2 Cache-Control parsing ------------------------------------------------

class TestCacheControlParsing:
    def test_case_insensitive_names_and_lists(self):
        cc = r.parse_cache_control(["Max-Age=5, No-Cache", "PUBLIC"])
        assert cc.delta("max-age") == 5 and "no-cache" in cc and "public" in cc

    def test_quoted_argument_with_comma(self):
        cc = r.parse_cache_control('no-cache="set-cookie, x-foo", max-age=3')
        assert cc.field_names("no-cache") == ["set-cookie", "x-foo"]
        assert cc.delta("max-age") == 3

    def test_quoted_delta_accepted(self):
        assert r.parse_cache_control('max-age="10"').delta("max-age") == 10

    def test_duplicate_same_value_is_fine(self):
        assert r.parse_cache_control("max-age=5, max-age=5").delta("max-age") == 5

    def test_duplicates_first_occurrence_wins(self):
        # 4.2.1: "either the first occurrence should be used or the response should be considered stale"
        assert r.parse_cache_control("max-age=5, max-age=60").delta("max-age") == 5
        assert r.parse_cache_control(["max-age=60", "max-age=5"]).delta("max-age") == 60

    @pytest.mark.parametrize("value, expected", [("3600a", 3600), ("3600.5", 3600), ("3600.0", 3600),
                                                 ("a3600", r.INVALID), ("-5", r.INVALID), ("", r.INVALID)])
    def test_leading_digits_as_squid(self, value, expected):
        assert r.parse_cache_control(f"max-age={value}").delta("max-age") is expected or \
            r.parse_cache_control(f"max-age={value}").delta("max-age") == expected

    @pytest.mark.parametrize("value", ["max-age =3600", "max-age= 3600", "max-age = 3600"])
    def test_whitespace_around_equals_makes_the_directive_invalid(self, value):
        assert r.parse_cache_control(value).delta("max-age") is r.INVALID

    def test_unknown_extensions_ignored(self):
        cc = r.parse_cache_control("foo=bar, max-age=1, baz")
        assert cc.delta("max-age") == 1 and "foo" in cc


# --- RFC 9110 5.6.7 dates ------------------------------------------------------

class TestDates:
    def test_three_formats(self):
        t = 784111777.0
        assert r.parse_http_date("Sun, 06 Nov 1994 08:49:37 GMT") == t
        assert r.parse_http_date("Sunday, 06-Nov-94 08:49:37 GMT") == t
        assert r.parse_http_date("Sun Nov  6 08:49:37 1994") == t

    @pytest.mark.parametrize("bad", ["0", "-1", "tomorrow", "Sun, 06 Nov 1994 08:49:37 PST", "", None,
                                     "Sun, 32 Nov 1994 08:49:37 GMT", "Thu, 18  Aug  2050 02:01:18 GMT",
                                     "Sun,  06 Nov 1994 08:49:37 GMT", "Sun Nov 6 08:49:37 1994"])
    def test_invalid(self, bad):
        assert r.parse_http_date(bad) is None

    def test_roundtrip(self):
        assert r.parse_http_date(r.format_http_date(NOW)) == NOW

    def test_a_remembered_date_is_the_same_and_rfc850_years_follow_today(self):
        imf = "Sun, 06 Nov 1994 08:49:37 GMT"
        assert r.parse_http_date(imf) == r.parse_http_date(imf) == 784111777.0
        rfc850 = "Sunday, 06-Nov-94 08:49:37 GMT"  # two-digit year: 1994 seen from 2026, 2094 from 2060
        assert r.parse_http_date(rfc850, now=1_800_000_000) == 784111777.0
        import calendar
        assert r.parse_http_date(rfc850, now=2_840_000_000) == calendar.timegm((2094, 11, 6, 8, 49, 37, 0, 0, 0))


def test_split_list_with_and_without_quoted_strings():  # RFC 9110 5.6.1
    assert r.split_list([" a , ,b,", "c"]) == ["a", "b", "c"]
    assert r.split_list(['a="x, y", b', ' "q\\"r" ']) == ['a="x, y"', "b", '"q\\"r"']


# --- 3 storing responses ----------------------------------------------------------

class TestStorable:
    def ok(self, status=200, req=(), resp=(), method="GET"):
        return r.storable(method, status, list(req), list(resp))[0]

    def test_explicit_freshness(self):
        assert self.ok(resp=H(cache_control="max-age=10"))
        assert self.ok(resp=H(expires=DATE))
        assert self.ok(status=302, resp=H(cache_control="max-age=10"))

    def test_heuristic_statuses(self):
        assert self.ok(200)
        assert self.ok(301)
        assert not self.ok(302)
        assert not self.ok(307)
        assert not self.ok(500)
        assert self.ok(500, resp=H(cache_control="max-age=5"))  # explicit freshness on an error is honoured

    def test_negative_statuses_follow_negative_ttl(self):
        for s in (404, 405, 410, 414, 501):
            assert r.storable("GET", s, [], [], negative_ttl=30)[0]
            assert not r.storable("GET", s, [], [], negative_ttl=0)[0]
        assert r.storable("GET", 404, [], H(cache_control="max-age=9"), negative_ttl=0)[0]

    def test_only_get(self):
        assert not self.ok(method="HEAD", resp=H(cache_control="max-age=10"))
        assert not self.ok(method="POST", resp=H(cache_control="max-age=10"))

    def test_partial_only_as_partial_and_304_never(self):  # 3.3
        assert not self.ok(206, resp=H(cache_control="max-age=10"))
        assert r.storable("GET", 206, [], H(cache_control="max-age=10"), partial=True)[0]
        assert r.storable("GET", 206, [], [], partial=True)[0]  # heuristically cacheable, as 200
        assert not r.storable("GET", 206, [], H(cache_control="no-store"), partial=True)[0]
        assert not r.storable("GET", 304, [], H(cache_control="max-age=10"), partial=True)[0]
        assert not self.ok(304, resp=H(cache_control="max-age=10"))
        assert not self.ok(100)

    def test_answers_about_the_request_are_never_stored(self):  # as Squid: they describe one request
        for status in (412, 416, 417):
            assert not self.ok(status, resp=H(cache_control="max-age=600, public"))
        assert self.ok(400, resp=H(cache_control="max-age=600"))  # explicit freshness on an error is honoured


    def test_no_store(self):  # 5.2.2.5, 5.2.1.5
        assert not self.ok(resp=H(cache_control="max-age=10, no-store"))
        assert not self.ok(req=H(cache_control="no-store"), resp=H(cache_control="max-age=10"))

    def test_private_in_shared_cache(self):  # 5.2.2.7
        assert not self.ok(resp=H(cache_control="private, max-age=10"))
        assert not self.ok(resp=H(cache_control='private="x-user", max-age=10'))

    def test_authorization(self):  # 3.5
        auth = H(authorization="Basic YTpi")
        assert not self.ok(req=auth, resp=H(cache_control="max-age=10"))
        for cc in ("public", "s-maxage=10", "must-revalidate, max-age=10"):
            assert self.ok(req=auth, resp=H(cache_control=cc))

    def test_must_understand(self):  # 5.2.2.3
        assert self.ok(resp=H(cache_control="must-understand, no-store, max-age=10"))
        assert not self.ok(299, resp=H(cache_control="must-understand, max-age=10"))

    @pytest.mark.parametrize("status", [299, 499, 599])
    def test_unknown_final_status_with_explicit_freshness_or_public(self, status):  # 3
        assert self.ok(status, resp=H(cache_control="max-age=10"))
        assert self.ok(status, resp=H(cache_control="public", last_modified=DATE))
        assert not self.ok(status, resp=H(last_modified=DATE))

    def test_vary_star(self):
        assert not self.ok(resp=H(cache_control="max-age=10", vary="*"))

    def test_storable_headers_drop_hop_by_hop(self):
        kept = r.storable_headers(H(connection="x-hop, close", x_hop="1", keep_alive="5",
                                    transfer_encoding="chunked", content_type="a/b",
                                    cache_control='private="set-cookie"', set_cookie="a=1"))
        names = [k for k, _ in kept]
        assert names == ["content-type", "cache-control"]
        # Connection without private="...", the usual "Connection: keep-alive" of an origin
        kept = r.storable_headers(H(connection="keep-alive, x-a", x_a="1", x_c="3", cache_control="max-age=5"))
        assert [k for k, _ in kept] == ["x-c", "cache-control"]
        kept = r.storable_headers(H(cache_control='private="x-p"', x_p="1", x_c="3"))
        assert [k for k, _ in kept] == ["cache-control", "x-c"]


def test_which_newer_responses_replace_what_is_stored():  # 4: the most recent response is the one to use
    for status in (200, 203, 204, 300, 301, 302, 307, 308, 404, 410):
        assert r.supersedes(status, [])
    for status in (206, 304, 400, 403, 412, 416, 500, 503):
        assert not r.supersedes(status, [])
    assert not r.supersedes(200, H(authorization="Basic x"))  # a user's own view (3.5)


def test_requests_that_no_stored_response_answers():  # 5.2.1: what a collapsed request could not use
    assert r.reuses_nothing(H(cache_control="no-cache"))
    assert r.reuses_nothing(H(cache_control="no-store"))
    assert r.reuses_nothing(H(cache_control="max-age=0"))
    assert r.reuses_nothing(H(pragma="no-cache"))
    assert not r.reuses_nothing(H(cache_control="max-age=60"))
    assert not r.reuses_nothing(H(cache_control="max-stale"))
    assert not r.reuses_nothing([])


# --- 4.2.1 freshness lifetime -----------------------------------------------------

class TestFreshnessLifetime:
    def lt(self, resp, status=200, **kw):
        return r.freshness_lifetime(status, resp, NOW, **kw)[0]

    def test_s_maxage_beats_max_age_beats_expires(self):
        exp = r.format_http_date(NOW + 1000)
        assert self.lt(H(date=DATE, cache_control="s-maxage=5, max-age=50", expires=exp)) == 5
        assert self.lt(H(date=DATE, cache_control="max-age=50", expires=exp)) == 50
        assert self.lt(H(date=DATE, expires=exp)) == 1000

    def test_s_maxage_ignored_by_private_cache(self):
        assert r.freshness_lifetime(200, H(cache_control="s-maxage=5, max-age=50"), NOW, shared=False)[0] == 50

    def test_invalid_max_age_is_stale(self):
        assert self.lt(H(cache_control="max-age=abc")) == 0
        assert self.lt(H(cache_control="max-age=1, max-age=100")) == 1  # 4.2.1: the first occurrence

    def test_expires_relative_to_date(self):
        assert self.lt(H(date=r.format_http_date(NOW - 100), expires=r.format_http_date(NOW))) == 100

    def test_expires_without_date_uses_response_time(self):
        assert self.lt(H(expires=r.format_http_date(NOW + 30))) == 30

    def test_invalid_expires_means_past(self):  # 5.3
        assert self.lt(H(date=DATE, expires="0")) == 0
        assert self.lt(H(date=DATE, expires="garbage")) == 0

    def test_expires_in_the_past(self):
        assert self.lt(H(date=DATE, expires=r.format_http_date(NOW - 50))) == 0


# --- 4.2.2 heuristic freshness (Squid refresh_pattern) ------------------------------

class TestHeuristics:
    def test_ten_percent_of_last_modified_age(self):
        resp = H(date=DATE, last_modified=r.format_http_date(NOW - 10000))
        lt, source = r.freshness_lifetime(200, resp, NOW)
        assert lt == pytest.approx(1000) and "heuristic" in source

    def test_no_last_modified_uses_min(self):
        assert r.freshness_lifetime(200, H(date=DATE), NOW)[0] == 0
        rule = r.parse_refresh_pattern(". 5 10% 60")
        assert r.freshness_lifetime(200, H(date=DATE), NOW, url="http://a/", rules=[rule])[0] == 300

    def test_bounded_by_max_and_min(self):
        resp = H(date=DATE, last_modified=r.format_http_date(NOW - 10_000_000))
        rule = r.parse_refresh_pattern(". 0 10% 60")
        assert r.freshness_lifetime(200, resp, NOW, url="http://a/", rules=[rule])[0] == 3600
        rule = r.parse_refresh_pattern(". 10 10% 60")
        resp = H(date=DATE, last_modified=r.format_http_date(NOW - 100))
        assert r.freshness_lifetime(200, resp, NOW, url="http://a/", rules=[rule])[0] == 600

    def test_first_matching_rule(self):
        rules = [r.parse_refresh_pattern(r"-i \.JPG$ 60 50% 120"), r.parse_refresh_pattern(". 0 10% 10")]
        resp = H(date=DATE, last_modified=r.format_http_date(NOW - 1000))
        assert r.freshness_lifetime(200, resp, NOW, url="http://a/b.jpg", rules=rules)[0] == 3600
        assert r.freshness_lifetime(200, resp, NOW, url="http://a/b.png", rules=rules)[0] == 100

    def test_not_for_non_heuristic_status(self):
        resp = H(date=DATE, last_modified=r.format_http_date(NOW - 10000))
        assert r.freshness_lifetime(302, resp, NOW)[0] == 0
        assert r.freshness_lifetime(302, resp + H(cache_control="public"), NOW)[0] == pytest.approx(1000)

    def test_negative_ttl_for_errors(self):
        assert r.freshness_lifetime(404, H(date=DATE), NOW, negative_ttl=30) == (30, "negative_ttl")
        assert r.freshness_lifetime(404, H(date=DATE, cache_control="max-age=5"), NOW, negative_ttl=30)[0] == 5

    @pytest.mark.parametrize("line", ["", "a b", ". x 10% 1", ". 1 10% -1", "( 1 1% 1"])
    def test_bad_refresh_pattern(self, line):
        with pytest.raises(ValueError):
            r.parse_refresh_pattern(line)


# --- 4.2.3 age ------------------------------------------------------------------------

class TestAge:
    def test_resident_time(self):
        assert r.current_age(H(date=DATE), NOW, NOW, NOW + 10) == 10

    def test_age_header_and_response_delay(self):
        assert r.current_age(H(date=DATE, age="100"), NOW - 2, NOW, NOW) == 102

    def test_apparent_age_from_date(self):
        assert r.current_age(H(date=r.format_http_date(NOW - 50)), NOW, NOW, NOW) == 50

    def test_date_in_future_is_not_negative(self):
        assert r.current_age(H(date=r.format_http_date(NOW + 50)), NOW, NOW, NOW) == 0

    def test_invalid_age_ignored(self):  # 5.1
        assert r.age_value(H(age="abc")) == 0
        assert r.age_value(H(age="-5")) == 0
        assert r.age_value(H(age="99999999999999")) == 2147483648
        assert r.age_value(H(age="7200.0")) == 0

    @pytest.mark.parametrize("value, expected", [("7200, 0", 7200), ("0, 7200", 0), ("7200;foo=bar", 7200),
                                                 ("7200;foo=111", 7200), ("0, 0", 0)])
    def test_first_member_of_a_list_parameters_ignored(self, value, expected):  # 5.1
        assert r.age_value(H(age=value)) == expected
        assert r.age_value([("Age", value), ("Age", "99")]) == expected

    def test_age_header_value(self):
        assert r.age_header(12.9) == "12"


# --- 4 / 5.2.1 request directives and serving -----------------------------------------

class TestDecide:
    def d(self, req=(), resp=(), age=0.0, lifetime=100.0):
        return r.decide(list(req), list(resp), age, lifetime)

    def test_fresh_and_stale(self):
        assert self.d(age=10).action == r.FRESH
        assert self.d(age=200).action == r.REVALIDATE

    def test_request_no_cache_and_pragma(self):  # 5.2.1.4, 5.4
        assert self.d(H(cache_control="no-cache")).action == r.RELOAD
        assert self.d(H(pragma="no-cache")).action == r.RELOAD
        assert self.d(H(pragma="no-cache", cache_control="max-stale")).action == r.FRESH

    def test_response_no_cache_always_revalidates(self):  # 5.2.2.4
        assert self.d(resp=H(cache_control="no-cache, max-age=100")).action == r.REVALIDATE

    def test_qualified_no_cache_only_drops_the_named_fields(self):  # 5.2.2.4
        resp = H(cache_control='no-cache="set-cookie, x-a", max-age=100', set_cookie="a=1", x_a="1", x_b="2")
        assert self.d(resp=resp, age=10).action == r.FRESH
        assert [k for k, _ in r.storable_headers(resp)] == ["cache-control", "x-b"]
        malformed = H(cache_control='no-cache = "x-a", max-age=100', x_a="1")
        assert self.d(resp=malformed, age=10).action == r.REVALIDATE  # malformed: the plain, stricter form

    def test_request_max_age(self):  # 5.2.1.1
        assert self.d(H(cache_control="max-age=5"), age=10).action == r.REVALIDATE
        assert self.d(H(cache_control="max-age=0"), age=0.5).action == r.REVALIDATE
        assert self.d(H(cache_control="max-age=50"), age=10).action == r.FRESH

    def test_min_fresh(self):  # 5.2.1.3
        assert self.d(H(cache_control="min-fresh=50"), age=60).action == r.REVALIDATE
        assert self.d(H(cache_control="min-fresh=50"), age=40).action == r.FRESH

    def test_max_stale(self):  # 5.2.1.2
        assert self.d(H(cache_control="max-stale"), age=1000).action == r.STALE_OK
        assert self.d(H(cache_control="max-stale=50"), age=140).action == r.STALE_OK
        assert self.d(H(cache_control="max-stale=50"), age=160).action == r.REVALIDATE

    @pytest.mark.parametrize("cc", ["must-revalidate", "proxy-revalidate", "s-maxage=100"])
    def test_must_revalidate_forbids_stale(self, cc):  # 5.2.2.2, 5.2.2.8, 5.2.2.10
        assert self.d(H(cache_control="max-stale"), H(cache_control=cc), age=200).action == r.REVALIDATE

    def test_stale_while_revalidate(self):  # RFC 5861 3
        resp = H(cache_control="max-age=100, stale-while-revalidate=30")
        assert self.d(resp=resp, age=120).action == r.SWR
        assert self.d(resp=resp, age=140).action == r.REVALIDATE

    def test_only_if_cached(self):  # 5.2.1.7
        assert r.only_if_cached(H(cache_control="only-if-cached"))
        assert not r.only_if_cached(H(cache_control="max-age=1"))

    def test_stale_if_error(self):  # RFC 5861 4
        assert r.stale_if_error_ok([], H(cache_control="max-age=1, stale-if-error=60"), 30)
        assert not r.stale_if_error_ok([], H(cache_control="max-age=1, stale-if-error=60"), 90)
        assert r.stale_if_error_ok(H(cache_control="stale-if-error=60"), H(cache_control="max-age=1"), 30)
        assert not r.stale_if_error_ok([], H(cache_control="max-age=1"), 30)
        assert not r.stale_if_error_ok([], H(cache_control="max-age=1, must-revalidate, stale-if-error=60"), 30)

    def test_the_operators_max_stale(self):  # Squid's max_stale; RFC 9111 4.2.4's out-of-band contract
        assert r.stale_if_error_ok([], H(cache_control="max-age=1"), 30, max_stale=60)
        assert not r.stale_if_error_ok([], H(cache_control="max-age=1"), 90, max_stale=60)
        assert not r.stale_if_error_ok([], H(cache_control="max-age=1, must-revalidate"), 30, max_stale=60)
        assert not r.stale_if_error_ok([], H(cache_control="max-age=1, s-maxage=1"), 30, max_stale=60)
        assert not r.stale_if_error_ok([], H(cache_control="max-age=1"), 30, max_stale=0)
        # the origin's own stale-if-error bounds it (as in Squid); a client's max-stale still may allow more
        assert not r.stale_if_error_ok([], H(cache_control="max-age=1, stale-if-error=0"), 30, max_stale=60)
        assert r.stale_if_error_ok([], H(cache_control="max-age=1, stale-if-error=40"), 30, max_stale=60)
        assert r.stale_if_error_ok(H(cache_control="max-stale=50"), H(cache_control="max-age=1, stale-if-error=0"),
                                   30, max_stale=60)


# --- 4.1 Vary ------------------------------------------------------------------------------

class TestVary:
    def test_fields_sorted_lowercase(self):
        assert r.vary_fields(H(vary=["Accept-Encoding, User-Agent", "accept"])) == (
            "accept", "accept-encoding", "user-agent")

    def test_star(self):
        assert r.vary_fields(H(vary="accept, *")) is None

    def test_normalisation(self):
        a = r.vary_values(("accept-encoding",), H(accept_encoding="GZIP,  br"))
        b = r.vary_values(("accept-encoding",), H(accept_encoding=["gzip", "br"]))
        assert a == b

    def test_absent_differs_from_empty(self):
        assert r.vary_values(("accept",), []) != r.vary_values(("accept",), H(accept=""))

    def test_different_values(self):
        assert r.vary_values(("accept-language",), H(accept_language="fr")) != \
            r.vary_values(("accept-language",), H(accept_language="en"))


# --- 4.3 validation ----------------------------------------------------------------------------

class TestValidation:
    def test_validators(self):  # 4.3.1
        lm = r.format_http_date(NOW - 10)
        assert r.validators(H(etag='"a"', last_modified=lm)) == [("If-None-Match", '"a"'),
                                                                ("If-Modified-Since", lm)]
        assert r.validators(H(last_modified="junk")) == []

    def test_conditional_inm(self):  # 4.3.2
        stored = H(etag='"v1"', last_modified=r.format_http_date(NOW - 10))
        assert r.conditional_result("GET", H(if_none_match='"v1"'), stored) == "INM"
        assert r.conditional_result("GET", H(if_none_match='W/"v1"'), stored) == "INM"  # weak comparison
        assert r.conditional_result("GET", H(if_none_match='"x", "v1"'), stored) == "INM"
        assert r.conditional_result("GET", H(if_none_match="*"), stored) == "INM"
        assert r.conditional_result("GET", H(if_none_match='"v2"'), stored) is None
        # If-None-Match present: If-Modified-Since is not evaluated
        assert r.conditional_result("GET", H(if_none_match='"v2"', if_modified_since=DATE), stored) is None
        assert r.conditional_result("POST", H(if_none_match='"v1"'), stored) is None

    def test_conditional_ims(self):
        stored = H(last_modified=r.format_http_date(NOW - 10), date=DATE)
        assert r.conditional_result("GET", H(if_modified_since=DATE), stored) == "IMS"
        assert r.conditional_result("HEAD", H(if_modified_since=DATE), stored) == "IMS"
        assert r.conditional_result("GET", H(if_modified_since=r.format_http_date(NOW - 20)), stored) is None
        assert r.conditional_result("GET", H(if_modified_since="junk"), stored) is None
        # no Last-Modified: Date of the stored response
        assert r.conditional_result("GET", H(if_modified_since=DATE), H(date=DATE)) == "IMS"

    def test_origin_only_preconditions_are_forwarded(self):
        assert not r.cache_can_evaluate(H(if_match='"a"'))
        assert not r.cache_can_evaluate(H(if_unmodified_since=DATE))
        assert r.cache_can_evaluate(H(if_none_match='"a"'))

    def test_freshen_from_304(self):  # 3.2 / 4.3.4
        stored = H(content_type="text/plain", content_length="5", cache_control="max-age=1", etag='"a"', x_old="1")
        new = H(cache_control="max-age=100", content_length="0", connection="close", etag='"a"')
        out = dict((k.lower(), v) for k, v in r.freshen_headers(stored, new))
        assert out["cache-control"] == "max-age=100"
        assert out["content-length"] == "5"
        assert "connection" not in out and out["x-old"] == "1"

    def test_freshen_keeps_out_what_storage_keeps_out(self):  # 3.2 -> 3.1
        stored = H(cache_control="max-age=1", etag='"a"', set_cookie="sid=FIRST", x_build="1")
        new = H(cache_control='max-age=100, no-cache="Set-Cookie"', set_cookie="sid=ALICE", connection="X-Hop",
                x_hop="alice", x_build="2", etag='"a"')
        out = dict((k.lower(), v) for k, v in r.freshen_headers(stored, new))
        assert out == {"cache-control": 'max-age=100, no-cache="Set-Cookie"', "etag": '"a"', "x-build": "2"}

    def test_validator_mismatch(self):
        assert r.validator_mismatch(H(etag='"a"'), H(etag='"b"'))
        assert not r.validator_mismatch(H(etag='"a"'), H(etag='"a"'))
        assert not r.validator_mismatch(H(etag='"a"'), [])
        jan1, jan2 = "Wed, 01 Jan 2025 00:00:00 GMT", "Thu, 02 Jan 2025 00:00:00 GMT"
        assert r.validator_mismatch(H(last_modified=jan1), H(last_modified=jan2))  # modified at another time
        assert not r.validator_mismatch(H(last_modified=jan1), H(last_modified=jan1))
        assert not r.validator_mismatch(H(last_modified=jan1), H())  # no validator: the stored one is selected
        assert not r.validator_mismatch(H(etag='"a"', last_modified=jan1), H(etag='"a"', last_modified=jan2))
        # a strong ETag the stored response lacks selects no stored response; a weak one may
        assert r.validator_mismatch(H(last_modified=jan1), H(etag='"new"'))
        assert not r.validator_mismatch(H(last_modified=jan1), H(etag='W/"new"'))


# --- 4.4 invalidation ----------------------------------------------------------------------------

class TestInvalidation:
    def test_unsafe_success_invalidates_target_and_same_origin_locations(self):
        t = r.invalidation_targets("POST", 201, "http://a:80/x",
                                   H(location="/y", content_location="http://a/z"))
        assert t == ["http://a:80/x", "http://a:80/y", "http://a/z"]

    def test_other_origin_location_not_invalidated(self):
        assert r.invalidation_targets("PUT", 200, "http://a/x", H(location="http://b/y")) == ["http://a/x"]

    @pytest.mark.parametrize("location", ["http://[::1", "http://a:99999/y", "http://a:1:2/y", "http://a:" + "9" * 5000])
    def test_a_location_that_is_no_url_invalidates_the_target_alone(self, location):
        assert r.invalidation_targets("POST", 201, "http://a:80/x", H(location=location)) == ["http://a:80/x"]

    def test_safe_methods_and_errors_do_not_invalidate(self):
        assert r.invalidation_targets("GET", 200, "http://a/x", []) == []
        assert r.invalidation_targets("DELETE", 500, "http://a/x", []) == []
        assert r.invalidation_targets("PATCH", 204, "http://a/x", []) == ["http://a/x"]
        assert r.invalidation_targets("FOO", 200, "http://a/x", []) == ["http://a/x"]


# --- RFC 9110 14 ranges --------------------------------------------------------------------------

class TestRanges:
    def test_single_ranges(self):
        assert r.parse_range("bytes=0-9", 100) == (0, 9)
        assert r.parse_range("bytes=90-", 100) == (90, 99)
        assert r.parse_range("bytes=-10", 100) == (90, 99)
        assert r.parse_range("bytes=50-500", 100) == (50, 99)

    def test_unsatisfiable(self):
        assert r.parse_range("bytes=100-", 100) == r.UNSATISFIABLE
        assert r.parse_range("bytes=-0", 100) == r.UNSATISFIABLE

    @pytest.mark.parametrize("v", ["items=0-1", "bytes=5-1", "bytes=a-b", "bytes=0-1,5-6", "bytes", None,
                                   "bytes=\u00b2-", "bytes=-\u00b2", "bytes=0-\u00b2", "bytes=\u0661-"])
    def test_ignored(self, v):  # "²" and other non-ASCII digits pass str.isdigit() but not int()
        assert r.parse_range(v, 100) is None

    def test_positions_with_more_digits_than_int_takes(self):
        many = "9" * 5000
        assert r.parse_range(f"bytes={many}-", 100) == r.UNSATISFIABLE
        assert r.parse_range(f"bytes=10-{many}", 100) == (10, 99)
        assert r.parse_range(f"bytes=-{many}", 100) == (0, 99)
        assert r.parse_range("bytes=" + "0" * 5000 + "5-" + "0" * 30 + "9", 100) == (5, 9)  # leading zeros

    def test_content_range(self):  # RFC 9110 14.4
        assert r.content_range("bytes 4-9/10") == (4, 9, 10)
        assert r.content_range("  BYTES 0-0/1 ") == (0, 0, 1)
        for v in (None, "", "bytes 4-9/*", "bytes */10", "bytes 9-4/10", "bytes 4-10/10", "items 0-1/2",
                  "bytes 4-9", "bytes 4-/10", "bytes -9/10", "bytes 4-9/10, bytes 0-1/10", "bytes ²-9/10"):
            assert r.content_range(v) is None, v
        many = "9" * 5000  # more digits than int() takes: capped, never converted
        assert r.content_range(f"bytes 0-1/{many}") == (0, 1, r.POSITION_MAX)

    def test_if_range(self):
        lm = r.format_http_date(NOW - 10)
        stored = H(etag='"a"', last_modified=lm)
        assert r.if_range_ok(None, stored)
        assert r.if_range_ok('"a"', stored)
        assert not r.if_range_ok('W/"a"', stored)
        assert not r.if_range_ok('"b"', stored)
        assert r.if_range_ok(lm, stored)
        assert not r.if_range_ok(DATE, stored)


# --- RFC 9213 targeted cache control -------------------------------------------------

class TestTargeted:
    @pytest.mark.parametrize("value, expected", [
        ("max-age=3600", "max-age=3600"), ("foobar, max-age=3600", "foobar, max-age=3600"),
        ("no-store", "no-store"), ("private;x=1", "private"), ("max-age=99999999999", "max-age=99999999999"),
        ('max-age="10000"', None),          # a string: ignored, and no directive is left: the field is ignored
        ("no-cache=?0, no-store=?1", "no-store"),
        ("MaX-aGe=3600", None), ("max-age=10000, &&&&&", None), ("max-age =100", None), ("max-age= 100", None)])
    def test_structured_dictionary(self, value, expected):
        assert r.targeted_directives([value]) == expected

    def test_view_replaces_cache_control_and_expires(self):
        h = [("Cache-Control", "no-store"), ("Expires", "0"), ("CDN-Cache-Control", "max-age=60"), ("X", "1")]
        view = r.targeted_view(h, ["cdn-cache-control"])
        assert view == [("CDN-Cache-Control", "max-age=60"), ("X", "1"), ("Cache-Control", "max-age=60")]
        assert r.freshness_lifetime(200, view, NOW)[0] == 60
        assert r.storable("GET", 200, {}, view)[0]

    def test_invalid_or_absent_field_leaves_headers_alone(self):
        h = [("Cache-Control", "max-age=5"), ("CDN-Cache-Control", "max-age=&")]
        assert r.targeted_view(h, ["cdn-cache-control"]) is h
        assert r.targeted_view(h, []) is h

    @pytest.mark.parametrize("value", ["", " ", 'max-age="600"'])
    def test_an_empty_field_leaves_headers_alone(self, value):  # RFC 9213 2.1: "valid, non-empty"
        h = [("Cache-Control", "private, max-age=600"), ("CDN-Cache-Control", value)]
        assert r.targeted_view(h, ["cdn-cache-control"]) is h
        assert r.storable("GET", 200, {}, r.targeted_view(h, ["cdn-cache-control"])) == (False, "private")

    def test_first_valid_target_wins(self):
        h = [("A-Cache-Control", "max-age=1"), ("CDN-Cache-Control", "max-age=2")]
        assert r.cache_control(r.targeted_view(h, ["a-cache-control", "cdn-cache-control"])).delta("max-age") == 1
        h = [("A-Cache-Control", "max-age=&"), ("CDN-Cache-Control", "max-age=2")]
        assert r.cache_control(r.targeted_view(h, ["a-cache-control", "cdn-cache-control"])).delta("max-age") == 2


# --- 4.3.5 HEAD ----------------------------------------------------------------------

def test_head_mismatch():
    stored = H(etag='"a"', last_modified=DATE, content_length="10")
    assert not r.head_mismatch(stored, H(etag='"a"', content_length="10"))
    assert not r.head_mismatch(stored, H(cache_control="max-age=5"))   # nothing to compare: it describes it
    assert r.head_mismatch(stored, H(etag='"b"'))
    assert r.head_mismatch(stored, H(content_length="11"))
    assert r.head_mismatch(stored, H(last_modified=r.format_http_date(NOW + 5)))


def test_fields_index_answers_like_a_scan():
    items = [("Cache-Control", "max-age=5"), ("X-A", "1"), ("cache-control", "public"), ("Vary", "Accept")]
    f = r.Fields(items)
    assert f == items and r.get_all(f, "CACHE-CONTROL") == r.get_all(items, "cache-control") == ["max-age=5", "public"]
    assert r.get_all(f, "missing") == [] and r.cache_control(f).delta("max-age") == 5
    assert r.storable_headers(f) == r.storable_headers(items)
    fresh = r.Fields(items)
    r.get_all(fresh, "cache-control").append("no-store")  # a caller's list is its own
    assert r.get_all(fresh, "cache-control") == ["max-age=5", "public"] and "no-store" not in r.cache_control(fresh)


def test_revalidation_headers_are_the_clients_but_its_own_preconditions_and_hop_by_hop_fields():
    req = [("User-Agent", "ua/1"), ("Accept", "text/html"), ("Accept", "*/*"), ("Cookie", "a=1"), ("Cookie", "b=2"),
           ("If-None-Match", '"client"'), ("If-Modified-Since", "Mon, 01 Jan 2024 00:00:00 GMT"), ("Range", "bytes=0-1"),
           ("If-Range", '"client"'), ("Host", "example.org"), ("Connection", "keep-alive, X-Hop"), ("X-Hop", "1"),
           ("Proxy-Authorization", "Basic eDp5"), ("Cache-Control", "max-stale"), ("Pragma", "no-cache"),
           ("Content-Length", "0"), ("TE", "trailers"), ("Authorization", "Bearer t")]
    stored = [("ETag", '"v1"'), ("Last-Modified", "Tue, 02 Jan 2024 00:00:00 GMT")]
    assert r.revalidation_headers(req, stored) == {
        "User-Agent": "ua/1", "Accept": "text/html, */*", "Cookie": "a=1; b=2", "Authorization": "Bearer t",
        "If-None-Match": '"v1"', "If-Modified-Since": "Tue, 02 Jan 2024 00:00:00 GMT"}
    assert r.revalidation_headers([("if-none-match", '"c"')], []) == {}  # no validator stored: none sent
