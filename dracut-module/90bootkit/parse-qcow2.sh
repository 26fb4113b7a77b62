#!/bin/sh
# cmdline hook: claim root=qcow2:<URL> (dracut's rootok/netroot model) and start bootkit's boot code.
# Sourced by dracut: return, never exit.

# shellcheck source=/dev/null
command -v getarg > /dev/null || . /lib/dracut-lib.sh

[ -z "$root" ] && root=$(getarg root=)
case "$root" in
    qcow2:*) ;;
    *) return 0 ;;
esac
mkdir -p /run/bootkit

if [ -z "$DRACUT_SYSTEMD" ]; then
    # Shell initramfs: one Python process for the whole boot, started now (docs/initramfs.md, "One Python
    # process"). It checks every rd.qcow2.* option (a typo fails the boot before the network is up: it leaves
    # its FAILED line in /run/bootkit/failed and its status in /run/bootkit/done, which ends dracut's main
    # loop, and the pre-mount hook dies) and imports the runtime while udev and the network come up; then it
    # waits for /run/bootkit/network-up, which the netroot handler (qcow2root) creates. It holds the lock on
    # /run/bootkit/boot.lock until it exits, which is how qcow2root waits for it; the lock is taken here,
    # before the process starts, so that no netroot handler can miss it.
    exec 7> /run/bootkit/boot.lock
    flock 7
    # shellcheck disable=SC2154  # NEWROOT is set by dracut's init
    /usr/lib/bootkit/bootkit-start --newroot "${NEWROOT:-/sysroot}" --wait-for /run/bootkit/network-up \
        --status-file /run/bootkit/done --lock-fd 7 &
    exec 7>&-
fi
# systemd initramfs: bootkit-root.service runs the same one process, started right after this hook's service
# (dracut-cmdline.service): it checks every rd.qcow2.* option before the network is up, and a bad one fails
# the unit, which isolates emergency.target.

# read by dracut's init and /sbin/netroot
# shellcheck disable=SC2034
netroot=$root
root=qcow2
# shellcheck disable=SC2034
rootok=1
# the network must come up even without rd.neednet=1
echo "rd.neednet=1" > /etc/cmdline.d/90bootkit-neednet.conf
# shell initramfs: the main loop ends when the root is mounted, or when the boot code gave up (then the
# pre-mount hook dies); under systemd, bootkit-root.service orders itself before initrd-root-fs.target
if [ -z "$DRACUT_SYSTEMD" ]; then
    # shellcheck disable=SC2154  # hookdir is set by dracut
    echo "[ -e /run/bootkit/done ]" > "$hookdir/initqueue/finished/90-bootkit.sh"
fi
