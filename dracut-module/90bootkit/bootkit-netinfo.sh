#!/bin/sh
# Print the IPv4 and IPv6 addresses the initramfs configured (not link-local or host scope: IPv6 site-local
# fec0::/10, QEMU's user network, counts), one line each, before the boot code starts:
#   bootkit: address: bootnet 10.0.2.15/24 static
#   bootkit: address: bootnet fec0::5054:ff:fe12:3456/64 static
# "static" is an address without a lifetime (given on the command line: the lease the boot loader handed
# over), "dynamic" one with a lifetime (from DHCP or SLAAC in the initramfs). The tests read it to prove which
# interfaces came up and how; on a real machine it says what the boot used. Interface names come from the
# kernel, and only [A-Za-z0-9._-] of them is printed.
PATH=/usr/sbin:/usr/bin:/sbin:/bin
ip -o addr show 2> /dev/null | while read -r _idx _name _family _addr _rest; do
    case "$_rest" in
        *scope\ link* | *scope\ host*) continue ;;
    esac
    case "$_rest" in
        *valid_lft\ forever*) _kind=static ;;
        *) _kind=dynamic ;;
    esac
    _name=$(printf '%s' "$_name" | tr -c 'A-Za-z0-9._-' '?')
    _addr=$(printf '%s' "$_addr" | tr -c '0-9a-f:./' '?')
    echo "bootkit: address: $_name $_addr $_kind"
done
exit 0
