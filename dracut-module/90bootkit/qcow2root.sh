#!/bin/bash
# netroot handler for root=qcow2:<URL> (shell initramfs, network-legacy): called by /sbin/netroot as
#   qcow2root <netif> <netroot> <NEWROOT>
# once an interface is up. The boot code fetches, verifies, attaches and mounts; it leaves its exit status
# in /run/bootkit/done (which ends dracut's main loop) and, on failure, its one-line cause in
# /run/bootkit/failed for the pre-mount hook to die with.

PATH=/usr/sbin:/usr/bin:/sbin:/bin
# shellcheck source=/dev/null
command -v info > /dev/null || . /lib/dracut-lib.sh

netif=$1
newroot=${3:-/sysroot}

# several interfaces may come up: the first one that gets here boots
mkdir -p /run/bootkit
mkdir /run/bootkit/started 2> /dev/null || exit 0
info "bootkit: network up on $netif"
/usr/lib/bootkit/bootkit-netinfo

# argv[0] '@bootkit': the NBD server this leaves behind is a root storage daemon that nothing modelled on
# systemd's killing spree may kill (systemd docs/ROOT_STORAGE_DAEMONS.md). Python finds its prefix without
# a path in argv[0].
(exec -a @bootkit /usr/bin/python3 -s -E /usr/lib/bootkit/bootkit-boot --newroot "$newroot")
echo $? > /run/bootkit/done
exit 0
