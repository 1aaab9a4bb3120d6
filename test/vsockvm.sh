#!/usr/bin/env bash
# vsockvm.sh COMMAND [ARGS...] -- run COMMAND, in the current directory, inside a throwaway QEMU
# guest whose only vsock transport is vsock_loopback, and exit with its status.
#
# This machine is itself a VM guest without vsock loopback: AF_VSOCK here would reach the
# hypervisor. Inside the guest booted here, with no vsock device from QEMU, the kernel routes
# CID 1 and CID 2 to loopback, so the real AF_VSOCK code runs with nothing leaving the guest.
# The guest sees this machine's root read-only over 9p, with a tmpfs overlay on top: the tox
# venv that called us is there, at the same path.
#
# Env: VSOCKVM_DIR (cache, default /tmp/vtunnel-vsockvm), VSOCKVM_TIMEOUT (seconds, default 600),
#      VSOCKVM_ACCEL (auto|kvm|tcg; auto = kvm only when /proc/cpuinfo has vmx or svm).
# Exit: the command's status; 124 guest timed out; 125 guest failed to run the command.
set -euo pipefail
DIR=${VSOCKVM_DIR:-/tmp/vtunnel-vsockvm}
TIMEOUT=${VSOCKVM_TIMEOUT:-600}
ACCEL=${VSOCKVM_ACCEL:-auto}
MODULES="virtio_pci 9pnet_virtio 9p overlay vsock_loopback"
say() { echo "vsockvm: $*" >&2; }

install_tools() {
  # grep without -q: an early exit would SIGPIPE busybox and fail the pipeline (pipefail)
  command -v qemu-system-x86_64 >/dev/null && /bin/busybox --list 2>/dev/null | grep -x cpio >/dev/null && return
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    say "skipped: needs qemu-system-x86_64 and /bin/busybox (as root on Debian or Ubuntu this script installs"
    say "qemu-system-x86 and busybox-static itself; or install them, then run tox -e vsock)"
    exit 0
  fi
  say "installing qemu-system-x86 and busybox-static"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    qemu-system-x86 busybox-static >/dev/null
}

kernel_version() {  # the one Debian's generic amd64 meta-package points at (cloud-amd64 lacks 9p)
  local v
  v=$(apt-cache depends linux-image-amd64 2>/dev/null | sed -n 's/.*Depends: linux-image-//p' | head -1)
  if [ -z "$v" ]; then apt-get update -qq; v=$(apt-cache depends linux-image-amd64 | sed -n 's/.*Depends: linux-image-//p' | head -1); fi
  echo "$v"
}

fetch_kernel() {  # $1 = version; unpacks vmlinuz and the few module trees we need
  local k=$DIR/kernel-$1 m=./lib/modules/$1/kernel
  [ -f "$k/vmlinuz" ] && return
  say "fetching linux-image-$1"
  rm -rf "$k" "$DIR/dl" && mkdir -p "$k" "$DIR/dl"
  (cd "$DIR/dl" && apt-get download -qq "linux-image-$1" 2>/dev/null)
  dpkg-deb --fsys-tarfile "$DIR"/dl/linux-image-"$1"_*.deb | tar -x -C "$k" --wildcards \
    "./boot/vmlinuz-$1" "$m/drivers/virtio/*" "$m/net/9p/*" "$m/fs/9p/*" "$m/fs/fscache/*" \
    "$m/fs/netfs/*" "$m/fs/overlayfs/*" "$m/net/vmw_vsock/*"
  mv "$k/boot/vmlinuz-$1" "$k/vmlinuz"
  rm -rf "$DIR/dl"
}

guest_init() { cat <<'INIT'
#!/bin/sh
export PATH=/bin
/bin/busybox --install -s /bin
mount -t proc proc /proc; mount -t sysfs sysfs /sys; mount -t devtmpfs devtmpfs /dev
ip link set lo up  # TCP to 127.0.0.1 fails without it
for w in $(cat /proc/cmdline); do case $w in vsockvm_out=*) OUT=${w#vsockvm_out=};; esac; done
modprobe -a MODULES || echo "vsockvm: modprobe failed"
o9p=trans=virtio,version=9p2000.L,msize=262144
mount -t 9p -o $o9p,ro,cache=loose hostroot /lower &&
mount -t tmpfs -o size=60% tmpfs /rw && mkdir -p /rw/u /rw/w &&
mount -t overlay overlay -o lowerdir=/lower,upperdir=/rw/u,workdir=/rw/w /newroot &&
mount -t proc proc /newroot/proc && mount -t sysfs sysfs /newroot/sys &&
mount -t devtmpfs devtmpfs /newroot/dev && mkdir -p /newroot/dev/pts /newroot/dev/shm &&
mount -t devpts devpts /newroot/dev/pts && mount -t tmpfs tmpfs /newroot/dev/shm &&
mount -t 9p -o $o9p vsockvm_out "/newroot$OUT" || echo "vsockvm: mounting the root failed"
stty -F /dev/console -onlcr 2>/dev/null
chroot /newroot /bin/sh "$OUT/cmd.sh" </dev/console >/dev/console 2>&1
echo "$?" > "/newroot$OUT/rc"; umount "/newroot$OUT"; sync
poweroff -f
INIT
}

build_initramfs() {  # $1 = version; prints the path
  local k=$DIR/kernel-$1 ir=$DIR/initramfs-build
  local out=$k/initramfs-$(guest_init | md5sum | cut -c1-8).cpio.gz
  if [ ! -f "$out" ]; then
    rm -rf "$ir" "$k"/initramfs-*
    mkdir -p "$ir"/{bin,dev,proc,sys,lower,rw,newroot,lib/modules}
    cp /bin/busybox "$ir/bin/busybox" && ln -s busybox "$ir/bin/sh"
    cp -a "$k/lib/modules/$1" "$ir/lib/modules/"
    /bin/busybox depmod -b "$ir" "$1"
    guest_init | sed "s/MODULES/$MODULES/" > "$ir/init" && chmod +x "$ir/init"
    (cd "$ir" && find . | /bin/busybox cpio -o -H newc -R 0:0 2>/dev/null | gzip -1) > "$out.tmp"
    mv "$out.tmp" "$out" && rm -rf "$ir"
  fi
  echo "$out"
}

boot() {  # $1 = kvm|tcg
  local accel=(-accel tcg -cpu max)
  [ "$1" = kvm ] && accel=(-accel kvm -cpu host)
  # vsockvm_guest=1 is the marker the vsock tests look for before they touch AF_VSOCK.
  timeout --foreground -k 5 "$TIMEOUT" qemu-system-x86_64 "${accel[@]}" \
    -M pc -bios /usr/share/qemu/qboot.rom -m 1024 -smp 2 \
    -nodefaults -no-user-config -nographic -serial stdio -monitor none -net none -no-reboot \
    -kernel "$KDIR/vmlinuz" -initrd "$INITRD" \
    -append "console=ttyS0 panic=-1 quiet loglevel=0 mitigations=off vsockvm_guest=1 vsockvm_out=$OUT" \
    -fsdev local,id=r,path=/,security_model=none,readonly=on,multidevs=remap \
    -device virtio-9p-pci,fsdev=r,mount_tag=hostroot \
    -fsdev local,id=o,path="$OUT",security_model=none \
    -device virtio-9p-pci,fsdev=o,mount_tag=vsockvm_out </dev/null
}

[ $# -ge 1 ] || { echo "usage: $0 COMMAND [ARGS...]" >&2; exit 2; }
mkdir -p "$DIR"
exec 9>"$DIR/.lock"; flock 9  # one build at a time; parallel runs wait
install_tools
VERSION=$(kernel_version)
fetch_kernel "$VERSION"
KDIR=$DIR/kernel-$VERSION
INITRD=$(build_initramfs "$VERSION")
exec 9>&-
OUT=$(mktemp -d "$DIR/run.XXXXXX"); trap 'rm -rf "$OUT"' EXIT
{ echo "export PATH=$(printf %q "$PATH") HOME=/root LANG=C.UTF-8"
  echo "cd $(printf %q "$PWD") || exit 125"
  printf 'exec'; printf ' %q' "$@"; echo; } > "$OUT/cmd.sh"
if [ "$ACCEL" = auto ]; then
  ACCEL=tcg; [ -w /dev/kvm ] && grep -qwE 'vmx|svm' /proc/cpuinfo && ACCEL=kvm
fi
say "booting linux $VERSION ($ACCEL)"
status=0
boot "$ACCEL" | grep --line-buffered -v -E '^(\[ *[0-9]+\.[0-9]+\] |reboot: )' || status=${PIPESTATUS[0]}
if [ ! -f "$OUT/rc" ] && [ "$ACCEL" = kvm ]; then
  say "KVM could not boot the guest; using TCG"
  status=0
  boot tcg | grep --line-buffered -v -E '^(\[ *[0-9]+\.[0-9]+\] |reboot: )' || status=${PIPESTATUS[0]}
fi
[ "$status" = 124 ] && { say "the guest timed out after ${TIMEOUT}s"; exit 124; }
[ -f "$OUT/rc" ] || { say "the guest did not run the command (qemu status $status)"; exit 125; }
exit "$(cat "$OUT/rc")"
