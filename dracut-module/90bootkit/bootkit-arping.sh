#!/bin/sh
# arping of bootkit's shell initramfs, in front of iputils' (moved to /usr/lib/bootkit/arping).
# network-legacy's ifup checks a static address for duplicates before it configures it (arping -D -c 2:
# two probes a second apart, about 2 s; exit status 0 means no duplicate). For the address the boot loader
# handed over (ip=<addr>::...:bootnet:none, docs/pxe.md "The lease") the firmware has just used that lease
# on this network, so the check answers "no duplicate" at once. Every other call (a DHCP address, another static
# address, resolving the gateway) runs the real arping unchanged.
_dad=0 _last=
for _a in "$@"; do
    [ "$_a" = -D ] && _dad=1
    _last=$_a
done
if [ "$_dad" = 1 ] && [ -n "$_last" ]; then
    # BOOTKIT_PROC_CMDLINE: another file to read the command line from (the host tests; as systemd's
    # SYSTEMD_PROC_CMDLINE)
    read -r _cmdline < "${BOOTKIT_PROC_CMDLINE:-/proc/cmdline}"
    # quoted, so $_last matches itself only (no glob); the word must be the handed-over form on bootnet
    case " $_cmdline " in
        *" ip=$_last::"*":bootnet:none"*) exit 0 ;;
    esac
fi
exec /usr/lib/bootkit/arping "$@"
