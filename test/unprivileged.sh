#!/usr/bin/env bash
# unprivileged.sh PYTEST_ARGS... -- run pytest the way most users run vtunnel: as a user who is not
# root, with a soft limit of 1024 open files (a login shell's, a systemd user unit's).
#
# Root is exempt from the kernel's per-user pipe quota (fs.pipe-user-pages-soft) and CI has a huge
# descriptor limit, so a suite run as root cannot see what such a user meets. Run as root (CI), this
# creates the user vtunnel-test if it is missing, copies the tree to a directory that user can read,
# builds a venv there with the system's python3 (root's own Python may sit under /root, which the user
# cannot enter), and runs the tests as that user. Run as any other user, it only lowers the limit and
# runs pytest with $VTUNNEL_PYTHON (tox sets it to this stage's own Python, which has the test tools).
set -euo pipefail
cd "$(dirname "$0")/.."
LIMIT=1024
if [ "$(id -u)" != 0 ]; then
  ulimit -Sn "$LIMIT"
  exec "${VTUNNEL_PYTHON:-python3}" -m pytest -p no:cacheprovider "$@"
fi

USER_NAME=${VTUNNEL_TEST_USER:-vtunnel-test}
WORK=${VTUNNEL_UNPRIVILEGED_DIR:-/tmp/vtunnel-unprivileged}
PYTHON=${VTUNNEL_UNPRIVILEGED_PYTHON:-/usr/bin/python3}
say() { echo "unprivileged: $*" >&2; }

id -u "$USER_NAME" >/dev/null 2>&1 || { say "creating the user $USER_NAME"; useradd --system --no-create-home --shell /usr/sbin/nologin "$USER_NAME"; }
if ! "$PYTHON" -c "import venv, ensurepip" 2>/dev/null; then
  say "installing python3-venv"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3-venv >/dev/null
fi
mkdir -p "$WORK" && chmod 755 "$WORK"
if [ ! -x "$WORK/venv/bin/python" ]; then
  "$PYTHON" -m venv "$WORK/venv"
fi
"$WORK/venv/bin/pip" install --quiet --disable-pip-version-check "gevent>=23.9,<27" "pyyaml>=6.0" "docopt-ng>=0.9" \
  "prometheus_client>=0.17" "pytest>=7" "pytest-xdist>=3"
rm -rf "$WORK/tree" && mkdir "$WORK/tree"
git ls-files -z --cached --others --exclude-standard | xargs -0 cp --parents -t "$WORK/tree"
chmod -R a+rX "$WORK"
say "pytest $* as $USER_NAME, soft limit $LIMIT open files (hard: $(ulimit -Hn))"
cd "$WORK/tree"
exec runuser -u "$USER_NAME" -- bash -c 'ulimit -Sn "$0" && exec "$1" -m pytest -p no:cacheprovider "${@:2}"' \
  "$LIMIT" "$WORK/venv/bin/python" "$@"
