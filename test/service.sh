#!/usr/bin/env bash
# service.sh -- the README's "Running as a service" steps, as written, under a real systemd.
#
# Boots the machine's own systemd as PID 1 of a throwaway namespace (its own PIDs, mounts, network with
# only loopback, host name; /etc, /opt, /home, /root, /srv and /var are overlays whose writes go to a
# temporary directory, so nothing here changes the machine), then runs each line of the README's two
# lists (system unit, user unit), read from README.md so the two cannot drift apart, and checks what a
# user would: the unit verifies once installed, starts (Type=notify: systemd sees READY=1), carries a
# request, reloads, puts a peer-socket where its sandbox allows, and says where when one is put elsewhere.
#
# What is not as on a user's machine, and why:
# - the namespace has no network: pip installs from a wheelhouse downloaded first (PIP_NO_INDEX,
#   PIP_FIND_LINKS), and the lines run as root with `sudo` a shell function that runs its command
#   (sudo is not installed here);
# - both ends run in one machine, and a vsock connection must never be opened here: before the line that
#   starts the unit, a drop-in adds `--vsock tcp:127.0.0.1` to its ExecStart, and the host end runs as a
#   transient unit beside it. The unit is verified before the drop-in exists.
set -euo pipefail
cd "$(dirname "$0")/.."
say() { echo "service: $*" >&2; }
skip() { say "skipped: $*"; exit 0; }

[ "$(id -u)" = 0 ] || skip "needs root (it boots systemd in a namespace of its own)"
for tool in unshare nsenter systemctl systemd-analyze runuser useradd; do
  command -v "$tool" >/dev/null || skip "needs $tool (Debian: systemd, util-linux, passwd)"
done
[ -x /lib/systemd/systemd ] || skip "needs /lib/systemd/systemd (Debian: systemd)"
SYSTEM_PYTHON=/usr/bin/python3
if ! "$SYSTEM_PYTHON" -c "import venv, ensurepip" 2>/dev/null; then
  command -v apt-get >/dev/null || skip "needs $SYSTEM_PYTHON with venv"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    python3 python3-venv >/dev/null
fi

# The README's lists: the first ```sh block after the paragraph that starts with each heading.
steps() { awk -v start="$1" 'index($0, start) == 1 {found = 1} found && /^```sh/ {inside = 1; next}
                              inside && /^```/ {exit} inside {print}' README.md; }
mapfile -t system_steps < <(steps "As a system service")
mapfile -t user_steps < <(steps "As a user service")
[ ${#system_steps[@]} -gt 3 ] && [ ${#user_steps[@]} -gt 3 ] || { say "README.md lacks the two lists of steps"; exit 1; }

work=$(mktemp -d /tmp/vtunnel-service.XXXXXX)
pid1=
cleanup() { [ -n "$pid1" ] && kill -9 "$pid1" 2>/dev/null; sleep 0.5; rm -rf "$work"; }
trap cleanup EXIT
mkdir "$work/tree"
git ls-files -z --cached --others --exclude-standard | xargs -0 cp --parents -t "$work/tree"
chmod -R a+rX "$work"

say "0. a wheelhouse for the namespace's pip (it has no network): vtunnel's dependencies for $SYSTEM_PYTHON"
"$SYSTEM_PYTHON" -m venv "$work/download"
"$work/download/bin/pip" download --quiet --disable-pip-version-check -d "$work/wheels" \
  "$work/tree" "setuptools>=61" wheel >"$work/download.log" 2>&1 || { cat "$work/download.log" >&2; exit 1; }

say "1. booting systemd in a throwaway namespace"
# What the namespace writes lands in $work: overlays on the directories a boot and the README's lines
# write in, a /tmp of its own (with $work moved into it), and systemd-tmpfiles masked (its boot-time
# cleaning of /tmp must never reach the machine's). `container=` makes systemd leave the kernel alone
# (no udev, no sysctl), as under systemd-nspawn.
setup="mount --bind $work /mnt; "
for dir in etc opt home root srv var; do
  mkdir -p "$work/upper/$dir" "$work/scratch/$dir"
  setup+="mount -t overlay overlay -o lowerdir=/$dir,upperdir=$work/upper/$dir,workdir=$work/scratch/$dir /$dir; "
done
setup+="mount -t tmpfs -o mode=1777 tmpfs /tmp; mkdir -p $work; mount --move /mnt $work; "
mkdir -p "$work/upper/etc/systemd/system"
for unit in systemd-tmpfiles-setup.service systemd-tmpfiles-clean.service systemd-tmpfiles-clean.timer; do
  ln -s /dev/null "$work/upper/etc/systemd/system/$unit"
done
unshare --pid --fork --mount --net --uts --propagation private --mount-proc \
  env container=vtunnel-service bash -euc "$setup exec /lib/systemd/systemd --system --unit=multi-user.target" \
  >"$work/boot.log" 2>&1 &
for _ in $(seq 100); do pid1=$(pgrep -P $! 2>/dev/null || true); [ -n "$pid1" ] && break; sleep 0.1; done
[ -n "$pid1" ] || { say "systemd did not start:"; cat "$work/boot.log" >&2; exit 1; }
inside() { nsenter -t "$pid1" -a "$@"; }
for _ in $(seq 120); do  # "offline" until its private bus socket exists
  state=$(inside timeout 120 systemctl is-system-running --wait 2>/dev/null || true)
  [ "$state" != offline ] && break; sleep 0.5
done
case "$state" in
  running|degraded) say "   systemd is up ($state)";;
  *) say "systemd did not come up ($state):"; tail -30 "$work/boot.log" >&2; exit 1;;
esac

offline=(PIP_NO_INDEX=1 "PIP_FIND_LINKS=$work/wheels" PIP_DISABLE_PIP_VERSION_CHECK=1)
run_step() {  # as_user, directory, line: one README line, in a login's environment
  local as=$1 dir=$2 line=$3 home uid
  if [ "$as" = root ]; then
    inside env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 \
      "${offline[@]}" bash -euo pipefail -c 'sudo() { "$@"; }; cd "$1"; eval "$2"' _ "$dir" "$line"
  else
    home=$(inside getent passwd "$as" | cut -d: -f6); uid=$(inside id -u "$as")
    inside runuser -u "$as" -- env -i PATH=/usr/local/bin:/usr/bin:/bin HOME="$home" USER="$as" LANG=C.UTF-8 \
      XDG_RUNTIME_DIR="/run/user/$uid" "${offline[@]}" bash -euo pipefail -c 'cd "$1"; eval "$2"' _ "$dir" "$line"
  fi
}
follow() {  # as_user, directory, unit path, steps...: run each line; the stage's drop-in before the start
  local as=$1 dir=$2 unit=$3 line; shift 3
  for line in "$@"; do
    if [[ "$line" == *"enable --now"* ]]; then
      say "   (the stage's drop-in: ExecStart gets --vsock tcp:127.0.0.1; no vsock connection on this machine)"
      inside mkdir -p "$unit.d"
      inside sed -n 's/^ExecStart=\(.*\) peer /[Service]\nExecStart=\nExecStart=\1 peer --vsock tcp:127.0.0.1 /p' "$unit" \
        | inside tee "$unit.d/stage.conf" >/dev/null
    fi
    say "   \$ $line"
    run_step "$as" "$dir" "$line" >"$work/step.log" 2>&1 || { say "   failed:"; cat "$work/step.log" >&2; exit 1; }
  done
}

fetch() {  # where ("tcp:PORT" or a socket path), then the marker it must return
  inside "$SYSTEM_PYTHON" - "$1" <<'EOF'
import http.client, socket, sys
where = sys.argv[1]
if where.startswith("tcp:"):
    conn = http.client.HTTPConnection("127.0.0.1", int(where[4:]), timeout=10)
else:
    conn = http.client.HTTPConnection("localhost", timeout=10)
    conn.sock = socket.socket(socket.AF_UNIX)
    conn.sock.settimeout(10)
    conn.sock.connect(where)
conn.request("GET", "/marker.txt")
print(conn.getresponse().read().decode().strip())
EOF
}
expect_through() {  # where, what it is
  local got
  got=$(fetch "$1" 2>&1) || true
  [ "$got" = "$marker" ] || { say "   no answer through $2 ($1): $got"; inside journalctl --no-pager -n 40 >&2; exit 1; }
  say "   a request through $2 ($1) reached the upstream"
}

marker="through the service, $$"
echo "$marker" >"$work/tree/marker.txt"
inside systemd-run --quiet --unit=stage-upstream --working-directory="$work/tree" \
  "$SYSTEM_PYTHON" -m http.server 4444 --bind 127.0.0.1

say "2. the system unit, as the README lists it"
follow root "$work/tree" /etc/systemd/system/vtunnel-peer.service "${system_steps[@]}"
inside systemctl is-active --quiet vtunnel-peer || { inside systemctl status --no-pager vtunnel-peer >&2; exit 1; }
say "   systemctl: vtunnel-peer is active ($(inside systemctl show -p StatusText --value vtunnel-peer))"
inside systemd-run --quiet --unit=stage-host /opt/vtunnel/bin/vtunnel host --vsock tcp:127.0.0.1 \
  --config-path /etc/vtunnel/config.yaml
sleep 2
expect_through tcp:3030 "the system unit's tunnel"

say "3. the KVM guest's Docker recipe: a peer-socket in /run/vtunnel, then one outside it"
recipe() {  # peer-socket path: the README's recipe, with the stage's HTTP upstream in Docker's place
  cat <<EOF
  - name: docker-host
    handshake-port: 9290
    vsock-host-port: 9291
    peer-socket: $1
    upstream-server-address: 127.0.0.1:4444
EOF
}
cp "$work/upper/etc/vtunnel/config.yaml" "$work/config.yaml"
{ cat "$work/config.yaml"; recipe /run/vtunnel/docker-host.sock; } | inside tee /etc/vtunnel/config.yaml >/dev/null
inside systemctl reload vtunnel-peer && inside systemctl kill -s HUP stage-host
sleep 2
expect_through /run/vtunnel/docker-host.sock "the recipe's socket"
# In this namespace systemd cannot apply ProtectKernelTunables= and ProtectControlGroups=, and then
# silently applies none of the file system sandbox either (seen: /run stays writable). A drop-in turns
# those two off, so the sandbox the recipe is about (ProtectSystem=strict) holds, and the stage checks it.
printf '[Service]\nProtectKernelTunables=no\nProtectControlGroups=no\n' |
  inside tee /etc/systemd/system/vtunnel-peer.service.d/namespace.conf >/dev/null
{ cat "$work/config.yaml"; recipe /run/docker-host.sock; } | inside tee /etc/vtunnel/config.yaml >/dev/null
inside systemctl daemon-reload
if inside systemctl restart vtunnel-peer 2>/dev/null; then
  say "   vtunnel-peer started with a peer-socket outside /run/vtunnel:"
  inside grep -E ' /run ' "/proc/$(inside systemctl show -p MainPID --value vtunnel-peer)/mountinfo" >&2; exit 1
fi
refusal=$(inside journalctl --no-pager -o cat -u vtunnel-peer | grep -F 'cannot listen on unix:///run/docker-host.sock' || true)
case "$refusal" in
  *"read-only file system (this service may create files only under /run/vtunnel"*) say "   outside it, the unit stops: $refusal";;
  *) say "   no line naming /run/vtunnel for a socket outside it:"; inside journalctl --no-pager -u vtunnel-peer -n 20 >&2; exit 1;;
esac

say "4. socket activation, as the README lists it: the first client starts the unit"
mapfile -t socket_steps < <(steps "To start vtunnel on its first client")
[ ${#socket_steps[@]} -gt 0 ] || { say "README.md lacks the socket activation steps"; exit 1; }
inside tee /etc/vtunnel/config.yaml <"$work/config.yaml" >/dev/null
inside systemctl stop vtunnel-peer 2>/dev/null || true
inside systemctl reset-failed vtunnel-peer 2>/dev/null || true
for line in "${socket_steps[@]}"; do
  say "   \$ $line"
  run_step root "$work/tree" "$line" >"$work/step.log" 2>&1 || { say "   failed:"; cat "$work/step.log" >&2; exit 1; }
done
! inside systemctl is-active --quiet vtunnel-peer || { say "   vtunnel-peer runs before any client came"; exit 1; }
expect_through tcp:3030 "the socket unit's listener (the first client, which started vtunnel-peer)"
inside systemctl is-active --quiet vtunnel-peer || { say "   vtunnel-peer did not start"; exit 1; }
passed=$(inside journalctl --no-pager -o cat -u vtunnel-peer | grep -F 'listening on 127.0.0.1:3030 (passed by systemd)' | tail -1)
[ -n "$passed" ] || { say "   vtunnel-peer did not take the socket:"; inside journalctl --no-pager -u vtunnel-peer -n 20 >&2; exit 1; }
say "   vtunnel-peer: $passed"
inside systemctl disable --quiet --now vtunnel-peer.socket vtunnel-peer; inside systemctl stop stage-host

say "5. the user unit, as the README lists it, as a user in a login session"
inside useradd --create-home --shell /bin/bash vtunnel-user
inside loginctl enable-linger vtunnel-user
uid=$(inside id -u vtunnel-user)
for _ in $(seq 100); do inside test -S "/run/user/$uid/bus" && break; sleep 0.2; done
inside cp -r "$work/tree" /home/vtunnel-user/vtunnel && inside chown -R vtunnel-user: /home/vtunnel-user/vtunnel
follow vtunnel-user /home/vtunnel-user/vtunnel /home/vtunnel-user/.config/systemd/user/vtunnel-peer.service \
  "${user_steps[@]}"
run_step vtunnel-user / "systemctl --user is-active --quiet vtunnel-peer" || {
  run_step vtunnel-user / "systemctl --user status --no-pager vtunnel-peer" >&2; exit 1; }
say "   systemctl --user: vtunnel-peer is active"
{ inside cat /home/vtunnel-user/.config/vtunnel/config.yaml; recipe "~/agent.sock"; } >"$work/user-config.yaml"
chmod a+r "$work/user-config.yaml"
run_step vtunnel-user / "cp $work/user-config.yaml ~/.config/vtunnel/config.yaml && systemctl --user reload vtunnel-peer"
inside systemd-run --quiet --unit=stage-host /opt/vtunnel/bin/vtunnel host --vsock tcp:127.0.0.1 \
  --config-path "$work/user-config.yaml"
sleep 2
expect_through tcp:3030 "the user unit's tunnel"
expect_through /home/vtunnel-user/agent.sock "the user unit's socket in the home directory"
say "5 passed, 0 failed"
