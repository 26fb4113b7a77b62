#!/bin/sh
# dracut cmdline hook (network-legacy; sourced, so no exit): a UKI started by UEFI HTTP Boot has ip=dhcp and
# no BOOTIF= (no boot loader hands one over), so dracut would run DHCP on every NIC. The firmware's UEFI
# variables name the NIC it booted from (bootkit/boot/efiboot.py): this hands it to dracut as BOOTIF=, in
# /etc/cmdline.d (which dracut's getarg reads), before parse-ip-opts.sh (cmdline 20) and net-genrules.sh
# bring up that NIC only. The systemd flavour does the same in bootkit-bootif-generator.sh.
# Only with a plain ip=dhcp and neither BOOTIF= nor ifname=; only a well-formed BOOTIF value is written.

bootkit_efi_bootif() {
    _efivars=/sys/firmware/efi/efivars
    [ "$(getargs ip=)" = dhcp ] || return 0
    getarg BOOTIF= > /dev/null && return 0
    getarg ifname= > /dev/null && return 0
    [ -d "$_efivars" ] || return 0
    if ! [ -e "$_efivars/BootCurrent-8be4df61-93ca-11d2-aa0d-00e098032b8c" ]; then
        modprobe -q efivarfs
        mount -t efivarfs efivarfs "$_efivars" 2> /dev/null || return 0
    fi
    _v=$(/usr/lib/bootkit/bootkit-efi-bootif --efivars "$_efivars") || return 0
    case "$_v" in
        01-[0-9a-f][0-9a-f]-[0-9a-f][0-9a-f]-[0-9a-f][0-9a-f]-[0-9a-f][0-9a-f]-[0-9a-f][0-9a-f]-[0-9a-f][0-9a-f]) ;;
        *) return 0 ;;
    esac
    mkdir -p /etc/cmdline.d
    echo "BOOTIF=$_v" > /etc/cmdline.d/90-bootkit-efi-bootif.conf
    echo "bootkit: boot interface from the UEFI variables: BOOTIF=$_v" > /dev/console
}

bootkit_efi_bootif
unset -f bootkit_efi_bootif
unset _efivars _v
