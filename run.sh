#!/usr/bin/env bash
# Relais launcher.
#   ./run.sh [mitmproxy args...]   forward proxy on 127.0.0.1:3128 (or the --mode you give)
#   ./run.sh web [args...]         the same addons in mitmweb
#   ./run.sh test [pytest args...] install what the tests need and run the whole suite, on the
#                                  mitmproxy that pyproject.toml installs, then on NEWER_MITMPROXY
#   ./run.sh bench                 the benchmarks (ratios against a baseline run in the same invocation)
# Environment:
#   RELAIS_USER   user mitmproxy runs as when started as root (Squid's cache_effective_user); default nobody
#   RELAIS_HOST   listen address of the default mode, and of modes given without one (socks5@1080);
#                 default 127.0.0.1
#   RELAIS_NEWER  0: `test` skips the run on the newer mitmproxy; default 1
set -euo pipefail
cd "$(dirname "$0")"
ROOT=$PWD
VENV=$ROOT/.venv
RELAIS_USER=${RELAIS_USER:-nobody}

# need_venv EXTRAS [PYTHON [REQUIREMENT]]: $VENV with Relais installed (and REQUIREMENT, a pin).
need_venv() {
  local extras=$1 py=${2:-} pin=${3:-}
  local stamp="$VENV/.relais-installed$extras$pin"
  if [ ! -x "$VENV/bin/python" ]; then
    if [ -z "$py" ]; then
      # As root, build the venv on the system interpreter: pyenv's lives under /root,
      # which the unprivileged RELAIS_USER cannot read.
      py=${PYTHON:-python3}
      if [ "$(id -u)" = 0 ] && [ -x /usr/bin/python3 ] && /usr/bin/python3 -c 'import sys, venv, ensurepip; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
        py=/usr/bin/python3
      fi
    fi
    "$py" -m venv --clear "$VENV"  # (a venv whose interpreter went away is rebuilt whole)
    rm -f "$VENV"/.relais-installed*
  fi
  if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    "$VENV/bin/pip" install -q --upgrade pip >/dev/null 2>&1 || true
    echo "run.sh: installing Relais${pin:+ and $pin} into ${VENV#"$ROOT"/} (log: ${VENV#"$ROOT"/}/pip.log)" >&2
    "$VENV/bin/pip" install -e ".$extras" $pin > "$VENV/pip.log" 2>&1 || { tail -30 "$VENV/pip.log" >&2; exit 1; }
    touch "$stamp"
  fi
}

# The suite also runs on a newer mitmproxy than the one Python 3.11 gets, so that Relais, which
# reaches into mitmproxy's HTTP layer, keeps working there. Pinned: a new release is taken on
# deliberately, not by surprise in CI. It needs Python 3.12 or newer: python3.13, python3.12, or pyenv's.
NEWER_MITMPROXY=mitmproxy==12.3.1
newer_python() {
  local py pyenvs=()
  # pyenv's releases, newest first (not -dev or rc builds, which may lack wheels for mitmproxy's dependencies)
  mapfile -t pyenvs < <(printf '%s\n' "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.*/bin/python3 |
    grep -E '/versions/3\.[0-9]+\.[0-9]+/bin/python3$' | sort -rV)
  for py in python3.13 python3.12 "${pyenvs[@]}"; do
    if command -v "$py" >/dev/null && "$py" -c 'import sys, venv, ensurepip; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; then
      echo "$py"
      return
    fi
  done
}

run_suite() {
  set +e
  "$VENV/bin/python" -m pytest tests --ignore=tests/bench -p no:cacheprovider "$@"
  local rc=$?
  set -e
  [ $rc -eq 5 ] && { echo "run.sh: no tests were collected" >&2; return 1; }
  return $rc
}

# System packages the tests use: real peers (squid, squidclient), log readers (goaccess, calamaris),
# network namespaces and iptables for transparent mode.
need_system_packages() {
  local missing=()
  command -v curl >/dev/null || missing+=(curl)
  command -v openssl >/dev/null || missing+=(openssl)
  # squid-openssl (Conflicts: squid, replaces it): the differential test needs ssl::* acls
  case "$({ squid -v || /usr/sbin/squid -v; } 2>/dev/null)" in
    *--with-openssl*) ;;
    *) missing+=(squid-openssl) ;;
  esac
  command -v squidclient >/dev/null || missing+=(squidclient)
  command -v goaccess >/dev/null || missing+=(goaccess)
  command -v calamaris >/dev/null || missing+=(calamaris)
  command -v iptables >/dev/null || [ -x /usr/sbin/iptables ] || missing+=(iptables)
  command -v ip >/dev/null || [ -x /usr/sbin/ip ] || missing+=(iproute2)
  command -v setpriv >/dev/null || missing+=(util-linux)
  command -v node >/dev/null || missing+=(nodejs)
  command -v npm >/dev/null || missing+=(npm)
  if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ]; then
      echo "run.sh: installing ${missing[*]}" >&2
      apt-get update -qq
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    else
      echo "run.sh: missing system packages (install them as root): ${missing[*]}" >&2
    fi
  fi
}

# The public HTTP caching test suite (cache-tests.fyi) that tests/test_conformance.py runs against
# Relais: from npm into .venv (git-ignored), never part of the project. Same version as the test.
CACHE_TESTS=http-cache-tests@0.4.5
need_cache_tests() {
  local dir="$VENV/cache-tests"
  command -v npm >/dev/null || return 0  # need_system_packages said so; the conformance test fails, saying why
  grep -qs "\"version\": \"${CACHE_TESTS#*@}\"" "$dir/node_modules/${CACHE_TESTS%@*}/package.json" && return 0
  echo "run.sh: installing $CACHE_TESTS into .venv/cache-tests (log: .venv/npm.log)" >&2
  npm install --no-save --no-audit --no-fund --prefix "$dir" "$CACHE_TESTS" > "$VENV/npm.log" 2>&1 ||
    { tail -30 "$VENV/npm.log" >&2; exit 1; }
}

# Start mitmdump/mitmweb with the whole suite. As root, drop to RELAIS_USER, which owns var/.
start() {
  local tool=$1; shift
  need_venv ""
  mkdir -p var/log var/cache var/mitmproxy
  local args=(-s "$ROOT/addons/all.py" --set confdir="$ROOT/var/mitmproxy")
  case " $* " in
    *" --mode "*|*" -m "*|*" --mode="*) ;;
    *) args+=(--mode "regular@${RELAIS_HOST:-127.0.0.1}:3128") ;;
  esac
  # a mode given without an address (socks5@1080) listens there too, not on every interface
  case " $* " in
    *listen_host*|*--listen-host*) ;;
    *) args+=(--set listen_host="${RELAIS_HOST:-127.0.0.1}") ;;
  esac
  # Bodies over maximum_object_size_in_memory's default stream through, as in Squid (mitmproxy
  # alone holds each whole body in memory first; the cache copies streamed ones to disk).
  case " $* " in
    *stream_large_bodies*) ;;
    *) args+=(--set stream_large_bodies=512k) ;;
  esac
  if [ "$(id -u)" = 0 ] && [ "$RELAIS_USER" != root ]; then
    chown -R "$RELAIS_USER" var
    exec setpriv --reuid="$RELAIS_USER" --regid="$(id -g "$RELAIS_USER")" --init-groups \
      --inh-caps=+net_bind_service --ambient-caps=+net_bind_service \
      env HOME="$ROOT/var" "$VENV/bin/$tool" "${args[@]}" "$@"
  fi
  exec "$VENV/bin/$tool" "${args[@]}" "$@"
}

case "${1:-}" in
  test)
    shift
    need_system_packages
    need_venv "[test]"
    need_cache_tests
    rc=0
    run_suite "$@" || rc=$?
    case $rc in 2|3|4) exit $rc ;; esac  # interrupted (Ctrl-C), pytest's own error, bad arguments: no second run
    [ "${RELAIS_NEWER:-1}" = 0 ] && exit $rc
    py=$(newer_python)
    if [ -z "$py" ]; then
      echo "run.sh: FAILED: no Python 3.12 or newer for the run on $NEWER_MITMPROXY (RELAIS_NEWER=0 skips it)" >&2
      exit 1
    fi
    echo "run.sh: the suite again, on $NEWER_MITMPROXY ($("$py" -V))" >&2
    VENV=$ROOT/.venv-newer
    need_venv "[test]" "$py" "$NEWER_MITMPROXY"
    rc2=0
    # test_runsh.py tests run.sh itself, which uses .venv whatever runs pytest: once is enough
    run_suite --ignore=tests/test_runsh.py "$@" || rc2=$?
    echo "run.sh: exit codes: $rc on .venv's mitmproxy, $rc2 on $NEWER_MITMPROXY (0: passed)" >&2
    [ $rc -ne 0 ] && exit $rc
    exit $rc2
    ;;
  bench)
    shift
    need_venv "[test]"
    exec "$VENV/bin/python" -m pytest tests/bench -p no:cacheprovider -s "$@"
    ;;
  web)
    shift
    start mitmweb "$@"
    ;;
  *)
    start mitmdump "$@"
    ;;
esac
