#!/usr/bin/env bash
# newcomer.sh -- what a new user does first, as written, on a stock distribution:
#  1. the README's "Run it" command (read from README.md, so the two cannot drift apart) under `env -i`
#     (no pyenv, no virtualenv, no PATH of ours: the distribution's own python3) in a fresh copy of the
#     tree, then one request through the tunnel to the README's upstream on 127.0.0.1:4444;
#  2. `python -m build`: the sdist and the wheel each install into a fresh venv, and the installed
#     `vtunnel` runs.
# Needs the distribution's python3 with venv (python3-venv on Debian and Ubuntu): installed with apt-get
# when run as root, else this says so and skips. Talks to loopback only (and to the package index, as
# pip does).
set -euo pipefail
cd "$(dirname "$0")/.."
say() { echo "newcomer: $*" >&2; }
SYSTEM_PYTHON=/usr/bin/python3

# The README's example listens on 3030 (the tunnel) and dials 4444 (its upstream): another program on either
# would make the run fail for a reason that is not vtunnel's. Say so now, not after minutes of waiting.
for port in 3030 4444; do
  if [ -x "$SYSTEM_PYTHON" ] && ! "$SYSTEM_PYTHON" -c 'import socket, sys; socket.create_server(("127.0.0.1", int(sys.argv[1])))' "$port" 2>/dev/null; then
    say "port $port on 127.0.0.1 is taken by another program, and the README's example needs it (3030: the"
    say "tunnel, 4444: its upstream); stop that program, then run tox -e newcomer again"
    exit 1
  fi
done

if ! [ -x "$SYSTEM_PYTHON" ] || ! "$SYSTEM_PYTHON" -c "import venv, ensurepip" 2>/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    say "installing python3-venv (the README's run command needs it on Debian and Ubuntu)"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      python3 python3-venv >/dev/null
  else
    say "skipped: needs $SYSTEM_PYTHON with venv (apt install python3-venv as root), then run tox -e newcomer"
    exit 0
  fi
fi

run_command=$(awk '/^Run it/ {found = 1} found && /^```sh/ {getline; print; exit}' README.md)
[ -n "$run_command" ] || { say "README.md has no run command after 'Run it'"; exit 1; }
work=$(mktemp -d /tmp/vtunnel-newcomer.XXXXXX)
cleanup() { pkill -P $$ 2>/dev/null || true; pkill -f "$work" 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
mkdir "$work/tree"
git ls-files -z --cached --others --exclude-standard | xargs -0 cp --parents -t "$work/tree"

# A stock login's environment and nothing of ours: no pyenv, no virtualenv, a PATH of system directories.
stock=(env -i PATH=/usr/local/bin:/usr/bin:/bin HOME="$work/home" LANG=C.UTF-8)
mkdir "$work/home"
say "1. in a fresh copy, under ${stock[*]}: $run_command"
cd "$work/tree"
marker="through the tunnel, $$"
echo "$marker" > marker.txt
"${stock[@]}" bash -c "python3 -m http.server 4444 --bind 127.0.0.1" > "$work/upstream.log" 2>&1 &
upstream=$!
"${stock[@]}" bash -c "$run_command" > "$work/run.log" 2>&1 &
running=$!
fetch='import urllib.request; print(urllib.request.urlopen("http://127.0.0.1:3030/marker.txt", timeout=5).read().decode().strip())'
for _ in $(seq 300); do  # pip downloads and installs first: up to 5 minutes
  if got=$("${stock[@]}" python3 -c "$fetch" 2>/dev/null) && [ "$got" = "$marker" ]; then
    say "   a request to 127.0.0.1:3030 reached the upstream through the tunnel"
    break
  fi
  kill -0 "$running" 2>/dev/null || break  # the run command has ended: it failed
  if ! kill -0 "$upstream" 2>/dev/null; then  # not the tunnel's fault: say what the upstream said
    say "   the README's upstream (python3 -m http.server 4444) stopped:"; cat "$work/upstream.log" >&2; exit 1
  fi
  sleep 1
done
if [ "${got:-}" != "$marker" ]; then
  say "   no answer through the tunnel; the run command's output:"; cat "$work/run.log" >&2; exit 1
fi

say "2. python -m build: an sdist and a wheel, each installed into a fresh venv"
"$SYSTEM_PYTHON" -m venv "$work/build-venv"
"$work/build-venv/bin/pip" install --quiet --disable-pip-version-check build
"$work/build-venv/bin/python" -m build --outdir "$work/dist" . >"$work/build.log" 2>&1 || { cat "$work/build.log" >&2; exit 1; }
for package in "$work"/dist/*.tar.gz "$work"/dist/*.whl; do
  venv="$work/venv-$(basename "$package")"
  "$SYSTEM_PYTHON" -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check "$package"
  version=$(cd / && "$venv/bin/vtunnel" --version)
  (cd / && "$venv/bin/vtunnel" check --config-path "$work/tree/config.yaml" >/dev/null)
  say "   $(basename "$package"): installs, and vtunnel --version says '$version'"
done
echo "newcomer: 3 passed, 0 failed"
