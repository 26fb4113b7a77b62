#!/bin/sh
# ifup of bootkit's shell initramfs, in front of network-legacy's (moved to /usr/lib/bootkit/ifup).
#
# For the boot loader's lease as `bootkit pxe-config` hands it over (docs/pxe.md, "The lease") and nothing
# else that configures the network, this brings up the boot NIC the way network-legacy's ifup would, with
# the same result and the same state files, but in a handful of commands: network-legacy's ifup, setup_net
# and their helpers run about a hundred (a getarg per option, per interface), which under an emulated CPU
# cost 3-4 s of a 20 s boot (docs/initramfs.md, "Network bring-up time"). Any other call, any other form of
# the command line (DHCP, IPv6, VLAN, bond, bridge, team, rd.route=, rd.net.*, nameserver=, quotes, an
# /etc/cmdline.d file that is not bootkit's), and any step that does not go as expected runs the real ifup,
# which starts over: nothing here is a second implementation of dracut's options.
#
# The lease form: ip=<addr>::<gateway>:<netmask>:[<hostname>]:bootnet:none[:<dns1>[:<dns2>]]
# with ifname=bootnet:<MAC>. Values are numeric (pxe-config takes only numbers from DHCP); the hostname
# comes from the TOML; each is checked again here before it is used.

PATH=/usr/sbin:/usr/bin:/sbin:/bin
# BOOTKIT_*: other places to read, write and run (the host tests; as systemd's SYSTEMD_PROC_CMDLINE)
_real=${BOOTKIT_IFUP:-/usr/lib/bootkit/ifup}

_full() {
    exec "$_real" "$@"
}

if [ "$#" != 1 ] || [ "$1" != bootnet ]; then
    _full "$@"
fi
[ -e "${BOOTKIT_STATE:-/tmp}/net.bootnet.did-setup" ] && exit 0

_cmdline=
read -r _cmdline < "${BOOTKIT_PROC_CMDLINE:-/proc/cmdline}" || [ -n "$_cmdline" ] || _full "$@"
_sys=${BOOTKIT_SYS_NET:-/sys/class/net}/bootnet
_tmp=${BOOTKIT_STATE:-/tmp}
_etc=${BOOTKIT_ETC:-/etc}

for _f in "${BOOTKIT_CMDLINE_D:-/etc/cmdline.d}"/*.conf; do
    case "$_f" in
        */\*.conf | */90bootkit-neednet.conf) ;;
        *) _full "$@" ;;
    esac
done
case "$_cmdline" in
    *[\"\'\\]*) _full "$@" ;;
esac

set -f
_ip='' _mac=''
for _w in $_cmdline; do
    case "$_w" in
        ip=*)
            [ -z "$_ip" ] || _full "$@"
            _ip=${_w#ip=}
            ;;
        ifname=bootnet:*)
            [ -z "$_mac" ] || _full "$@"
            _mac=${_w#ifname=bootnet:}
            ;;
        ifname=* | vlan=* | bond=* | bridge=* | team=* | rd.route=* | rd.net.* | nameserver=* | BOOTIF=* \
            | rd.bootif=* | rd.peerdns=* | biosdevname=* | net.ifnames=*) _full "$@" ;;
    esac
done
set +f

# <addr>::<gateway>:<netmask>:<hostname>:bootnet:none[:<dns1>[:<dns2>]]
_rest=$_ip
_field() {
    _v=${_rest%%:*}
    case "$_rest" in
        *:*) _rest=${_rest#*:} ;;
        *) _rest='' ;;
    esac
}
_field; _addr=$_v
_field; [ -z "$_v" ] || _full "$@"
_field; _gw=$_v
_field; _mask=$_v
_field; _hostname=$_v
_field; [ "$_v" = bootnet ] || _full "$@"
_field; [ "$_v" = none ] || _full "$@"
_field; _dns1=$_v
_field; _dns2=$_v
[ -z "$_rest" ] || _full "$@"

# numbers only: a dotted quad (the netmask may be a prefix length), a MAC address, a host name
_quad() {
    case "$1" in
        *[!0-9.]* | *..* | .* | *.) return 1 ;;
        *.*.*.*.*) return 1 ;;
        *.*.*.*) return 0 ;;
    esac
    return 1
}
_quad "$_addr" || _full "$@"
[ -z "$_gw" ] || _quad "$_gw" || _full "$@"
case "$_mask" in
    '' | *[!0-9]*) _quad "$_mask" || _full "$@" ;;
    ?|[12]?|3[0-2]) ;;
    *) _full "$@" ;;
esac
for _d in "$_dns1" "$_dns2"; do
    [ -z "$_d" ] || _quad "$_d" || _full "$@"
done
case "$_hostname" in
    *[!A-Za-z0-9.-]* | -* | .*) _full "$@" ;;
esac
# lower case, as iPXE's ${netX/mac} and the kernel's sysfs write it
case "$_mac" in
    [0-9a-f][0-9a-f]:[0-9a-f][0-9a-f]:[0-9a-f][0-9a-f]:[0-9a-f][0-9a-f]:[0-9a-f][0-9a-f]:[0-9a-f][0-9a-f]) ;;
    *) _full "$@" ;;
esac

# the NIC, named by dracut's ifname= rule, with the handed-over MAC
[ -e "$_sys/address" ] || _full "$@"
read -r _have < "$_sys/address"
[ "$_have" = "$_mac" ] || _full "$@"

ip link set bootnet up || _full "$@"
# the carrier, as network-legacy waits for it (rd.net.timeout.carrier, default 10 s; a set value takes the
# full path above)
_i=0
while :; do
    _carrier=0
    read -r _carrier < "$_sys/carrier" 2> /dev/null
    [ "$_carrier" = 1 ] && break
    _i=$((_i + 1))
    [ "$_i" -le 100 ] || _full "$@"
    sleep 0.1
done

# no duplicate-address check: the firmware has just used this lease on this network (bootkit-arping.sh)
ip addr add "$_addr/$_mask" brd + dev bootnet || _full "$@"
if [ -n "$_gw" ] && ! ip route replace default via "$_gw" dev bootnet; then
    # network-legacy starts over from an interface without the address (its ifup refuses one that has it)
    ip addr del "$_addr/$_mask" dev bootnet
    _full "$@"
fi
if [ -n "$_hostname" ]; then
    echo "$_hostname" > "${BOOTKIT_PROC_HOSTNAME:-/proc/sys/kernel/hostname}"
    echo "echo '$_hostname' > /proc/sys/kernel/hostname" > "$_tmp/net.bootnet.hostname"
fi

# network-legacy's state files, as its ifup and setup_net leave them (dracut's finished hooks, netroot and
# the later stages read them)
for _v in ip="$_addr" gw="$_gw" mask="$_mask" hostname="$_hostname" dns1="$_dns1" dns2="$_dns2"; do
    [ -n "${_v#*=}" ] && echo "$_v"
done > "$_tmp/net.bootnet.override"
if [ -n "$_dns1" ]; then
    for _d in "$_dns1" "$_dns2"; do
        [ -n "$_d" ] && echo "nameserver $_d"
    done > "$_tmp/net.bootnet.resolv.conf"
    while read -r _line; do echo "$_line"; done < "$_tmp/net.bootnet.resolv.conf" > "$_etc/resolv.conf"
fi
[ -n "$_gw" ] && echo "ip route replace default via '$_gw' dev 'bootnet'" > "$_tmp/net.bootnet.gw"
: > "$_tmp/net.bootnet.up"
: > "$_tmp/net.$_have.up"

# setup_net's spanning-tree wait: a switch port may hold traffic for a while after the NIC's link came up;
# the first ARP reply from the gateway says it passes (returns at once when it does)
if [ -n "$_gw" ]; then
    _arping=/usr/lib/bootkit/arping
    [ -x "$_arping" ] || _arping=arping
    "$_arping" -q -f -w 60 -I bootnet "$_gw" || echo "bootkit: resolving $_gw via ARP on bootnet failed" > /dev/kmsg
fi
: > "$_tmp/net.bootnet.did-setup"
: > "$_tmp/net.$_have.did-setup"

# what network-legacy's ifup does last: the online hooks, then dracut's netroot
_hooks=${BOOTKIT_HOOKDIR:-/lib/dracut/hooks}
for _f in "$_hooks"/initqueue/online/*.sh; do
    [ -e "$_f" ] || continue
    # shellcheck source=/dev/null
    command -v source_hook > /dev/null || . /lib/dracut-lib.sh
    source_hook initqueue/online bootnet
    break
done
# For bootkit's own root and no netroot hooks, what dracut's netroot would do comes down to running the
# handler and recording the interface (save_netinfo): done here, without netroot's library and getarg
# processes (about a second on an emulated CPU). Anything else goes through netroot.
# shellcheck disable=SC2154  # netroot and NEWROOT: exported by dracut's init
case "$netroot" in
    qcow2:*)
        for _f in "$_hooks"/netroot/*.sh; do
            [ -e "$_f" ] && exec "${BOOTKIT_NETROOT:-/sbin/netroot}" bootnet
        done
        [ -d "${NEWROOT:-/sysroot}/proc" ] && exit 0
        "${BOOTKIT_QCOW2ROOT:-/sbin/qcow2root}" bootnet "$netroot" "${NEWROOT:-/sysroot}"
        # save_netinfo: the interface that booted first in /tmp/net.ifaces
        _ifaces=bootnet _old=
        [ -e "$_tmp/net.ifaces" ] && read -r _old < "$_tmp/net.ifaces"
        for _i in $_old; do
            [ "$_i" = bootnet ] || _ifaces="$_ifaces $_i"
        done
        echo "$_ifaces" > "$_tmp/net.ifaces"
        exit 0
        ;;
esac
exec "${BOOTKIT_NETROOT:-/sbin/netroot}" bootnet
