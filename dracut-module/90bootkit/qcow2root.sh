#!/bin/bash
# netroot handler for root=qcow2:<URL> (shell initramfs, network-legacy): called by /sbin/netroot as
#   qcow2root <netif> <netroot> <NEWROOT>
# once an interface is up. The boot code has been running since the cmdline hook (parse-qcow2.sh), with the
# command line checked and the runtime imported: this tells it that the network is up and waits until it has
# finished. It fetches, verifies, attaches and mounts; it leaves its exit status in /run/bootkit/done (which
# ends dracut's main loop) and, on failure, its one-line cause in /run/bootkit/failed for the pre-mount hook
# to die with.

PATH=/usr/sbin:/usr/bin:/sbin:/bin

netif=$1

# several interfaces may come up: the first one that gets here boots
mkdir -p /run/bootkit
mkdir /run/bootkit/started 2> /dev/null || exit 0
# what dracut's info does (its dracut-lib.sh is not sourced for this one line: a large script to parse on
# a slow CPU); the name is the kernel's
echo "<30>dracut: bootkit: network up on $netif" > "${BOOTKIT_KMSG:-/dev/kmsg}"
[ "$DRACUT_QUIET" = no ] && echo "dracut: bootkit: network up on $netif" >&2

: > /run/bootkit/network-up
# the boot code holds this lock until it exits (the NBD server it leaves behind does not)
flock /run/bootkit/boot.lock true
if ! [ -e /run/bootkit/done ]; then
    echo "FAILED at start: the boot code ended without a result (see the console above)" > /run/bootkit/failed
    echo 1 > /run/bootkit/done
fi
exit 0
