#!/bin/bash
# shellcheck disable=SC2154  # dracut provides initdir, moddir, systemd*dir and the inst_* functions
# dracut module "bootkit": boot the root filesystem of a QCOW2 image fetched over HTTP(S).
#
# root=qcow2:<URL> claims the root (cmdline hook), the network comes up through dracut's own network module
# (network-legacy or systemd-networkd, named by `bootkit build-initrd`), then bootkit's Python boot code
# fetches and verifies the image, serves it to the kernel NBD driver and mounts the root at the new root.
#
# Not meant to be copied into /usr/lib/dracut: `bootkit build-initrd` points dracut at it through a
# dracutbasedir overlay and passes what to install in the environment:
#   BOOTKIT_STAGE  directory prepared by bootkit.host.initrd: stdlib.list (absolute paths of the Python files and
#                  C extensions the runtime imports), site/ (bootkit's runtime modules and zstandard).

# called by dracut
check() {
    require_binaries python3 mount modprobe || return 1
    # only when asked for (-m bootkit)
    return 255
}

# called by dracut
depends() {
    echo network
    return 0
}

# called by dracut
installkernel() {
    # nbd with partitions, the overlay for the writable root, and the filesystems a root may use
    hostonly='' instmods nbd overlay ext4 xfs btrfs vfat squashfs erofs nls_cp437 nls_iso8859-1 nls_utf8 af_packet

    # vlan= and bond= (pxe-config's vlan and bond keys): dracut's stock 90kernel-network-modules installs them,
    # but `build-initrd --drivers` shadows that module with one that names only the NIC drivers. ipv6 is for
    # kernels that build it as a module (Debian's has it built in; instmods skips built-ins).
    hostonly='' instmods 8021q bonding ipv6

    # the UEFI variables (efivarfs, a module in Debian's kernel): which NIC the firmware booted from, for a UKI
    # over UEFI HTTP Boot that no boot loader hands a BOOTIF= (bootkit-efi-bootif.sh, bootkit/boot/efiboot.py)
    hostonly='' instmods efivarfs

    # The buses the NIC drivers sit on. 90kernel-network-modules (or bootkit's --drivers stand-in) installs
    # only drivers/net; the transports come with dracut's 90kernel-modules, which a bootkit initramfs leaves
    # out, and without them a NIC driver never sees its device (virtio_net without virtio_pci: no eth0).
    #   virtio: PCI (QEMU/KVM, most clouds) and MMIO (microvm, Firecracker, ARM "virt");
    #   Hyper-V: hv_netvsc pulls hv_vmbus itself; pci-hyperv carries the SR-IOV VFs of accelerated networking;
    #   Xen: nothing, xen-netfront's xenbus is built in (or is a module it depends on, installed with it);
    #   USB NICs (the NIC of many laptops and small boards, docks): the host controllers, PCI and platform.
    # instmods skips names the kernel does not have (-o is its default: the platform ones are ARM's), so a
    # kernel built without one still gives an initramfs.
    hostonly='' instmods \
        virtio_pci virtio_mmio \
        hv_vmbus pci-hyperv \
        xhci-pci xhci-hcd xhci-plat-hcd ehci-pci ehci-hcd ehci-platform ohci-pci ohci-hcd uhci-hcd

    # The local cache disk (rd.qcow2.cache=): the usual disk controllers, which dracut's 90kernel-modules would
    # bring and a bootkit initramfs leaves out (about 2.4 MB of modules before compression).
    hostonly='' instmods virtio_blk virtio_scsi nvme ahci sd_mod
}

# called by dracut
install() {
    if [[ -z $BOOTKIT_STAGE || ! -r $BOOTKIT_STAGE/stdlib.list ]]; then
        derror "bootkit: BOOTKIT_STAGE is not set: build with 'bootkit build-initrd'"
        return 1
    fi

    # The interpreter, by its real path (python3 -> python3.11), and the stdlib files the runtime imports.
    local _python _f _so _lib
    _python=$(readlink -f "$(command -v python3)")
    inst_binary "$_python"
    ln_r "$_python" /usr/bin/python3
    local -a _stdlib _sos
    mapfile -t _stdlib < "$BOOTKIT_STAGE/stdlib.list"
    for _f in "${_stdlib[@]}"; do
        inst_simple "$_f"
    done
    # bootkit's runtime package and zstandard, next to the boot entry point
    mkdir -p "$initdir/usr/lib/bootkit"
    cp -a "$BOOTKIT_STAGE/site/." "$initdir/usr/lib/bootkit/"

    # C extensions are mode 0644 and were not installed through dracut-install, so dracut does not resolve
    # their libraries (docs/initramfs.md, "Python in the initramfs"): do it here.
    mapfile -t _sos < <(grep '\.so$' "$BOOTKIT_STAGE/stdlib.list"; find "$BOOTKIT_STAGE/site" -name '*.so')
    if ((${#_sos[@]})); then
        for _lib in $(ldd "${_sos[@]}" 2> /dev/null | awk '/=> \//{print $3}' | sort -u); do
            inst_library "$_lib"
        done
    fi

    # libdeflate and libzstd, which the reader uses through ctypes when present (deflate at twice zlib's
    # speed; zstd decoded by QEMU's own loop)
    inst_libdir_file "libdeflate.so.0" "libzstd.so.1" || :

    # HTTPS: the system CA bundle, for rd.qcow2.cacert= defaults
    inst_simple -o /etc/ssl/certs/ca-certificates.crt

    # tools the boot code runs; flock: the shell flavour's netroot handler waits for the boot code with it
    inst_multiple mount umount modprobe sleep flock
    inst_multiple -o blkid
    # rd.qcow2.cache.format=auto: mkfs.ext4 (mke2fs and its e2fsprogs libraries, about 0.6 MB); the ext4
    # module is installed above. Optional: without it the boot says so and boots without the cache.
    inst_multiple -o mkfs.ext4 mke2fs
    inst_simple -o /etc/mke2fs.conf

    # the entry point (written here rather than shipped, so that everything in this directory is shell)
    cat > "$initdir/usr/lib/bootkit/bootkit-boot" << 'EOF'
#!/usr/bin/python3 -SE
"""Entry point of bootkit's boot code in the initramfs (bootkit/boot/main.py)."""
import sys

sys.path.insert(0, "/usr/lib/bootkit")
from bootkit.boot.main import entry

entry()
EOF
    chmod 0755 "$initdir/usr/lib/bootkit/bootkit-boot"
    inst_hook cmdline 90 "$moddir/parse-qcow2.sh"
    # the boot NIC's BOOTIF= from the UEFI variables (bootkit/boot/efiboot.py), for both flavours
    cat > "$initdir/usr/lib/bootkit/bootkit-efi-bootif" << 'EOF'
#!/usr/bin/python3 -SE
"""Print the BOOTIF= value of the NIC the firmware booted from (bootkit/boot/efiboot.py)."""
import sys

sys.path.insert(0, "/usr/lib/bootkit")
from bootkit.boot.efiboot import main

sys.exit(main())
EOF
    chmod 0755 "$initdir/usr/lib/bootkit/bootkit-efi-bootif"

    if dracut_module_included "systemd"; then
        inst_simple "$moddir/bootkit-root.service" "$systemdsystemunitdir/bootkit-root.service"
        inst_simple "$moddir/bootkit-network-up.service" "$systemdsystemunitdir/bootkit-network-up.service"
        inst_multiple touch
        inst_script "$moddir/bootkit-generator.sh" "$systemdutildir/system-generators/bootkit-generator"
        install_wait_online
        if dracut_module_included "systemd-networkd"; then
            inst_script "$moddir/bootkit-bootif-generator.sh" \
                "$systemdutildir/system-generators/bootkit-bootif-generator"
            # with vlan=/bond=, network-online waits for the VLAN or bond rather than --any link
            inst_script "$moddir/bootkit-top-generator.sh" "$systemdutildir/system-generators/bootkit-top-generator"
            # the lease handed over: no router solicitation of networkd's own, no wait for one
            inst_script "$moddir/bootkit-lease-generator.sh" \
                "$systemdutildir/system-generators/bootkit-lease-generator"
        fi
    else
        # before network-legacy's parse-ip-opts.sh (cmdline 20): BOOTIF= from the UEFI variables
        inst_hook cmdline 15 "$moddir/bootkit-efi-bootif.sh"
        # netroot handler: /sbin/netroot runs /sbin/<scheme>root once an interface is up
        inst_script "$moddir/qcow2root.sh" /sbin/qcow2root
        # the cmdline hook starts the boot code through this (argv[0] '@bootkit')
        inst_script "$moddir/bootkit-start.sh" /usr/lib/bootkit/bootkit-start
        inst_hook pre-mount 10 "$moddir/qcow2-failed.sh"
        install_halt
        install_arping
        install_ifup
    fi
    dracut_need_initqueue
}

# systemd flavour: network-online.target is reached through systemd-networkd-wait-online, which by default
# waits until every link networkd manages is configured. With ip=dhcp (a .network for every link) a second
# NIC without a DHCP server, or without a cable, holds the boot for its whole timeout (120 s). bootkit needs
# one working link: --any (docs/initramfs.md, "Network bring-up time"). A drop-in, so that a user's own
# drop-in for the unit (installed with the host's configuration) still applies after it.
install_wait_online() {
    dracut_module_included "systemd-networkd" || return 0
    local _dir="$initdir$systemdsystemunitdir/systemd-networkd-wait-online.service.d"
    mkdir -p "$_dir"
    cat > "$_dir/50-bootkit-any.conf" << EOF
# bootkit: one configured link is enough to fetch the root (docs/initramfs.md, "Network bring-up time")
[Service]
ExecStart=
ExecStart=$systemdutildir/systemd-networkd-wait-online --any
EOF
}

# shell flavour: skip network-legacy's duplicate-address check for the address the boot loader handed over
# (bootkit-arping.sh says why); iputils' arping moves to /usr/lib/bootkit/arping behind the wrapper.
install_arping() {
    local _arping
    _arping=$(find_binary arping) || return 0
    [[ -e $initdir$_arping && ! -L $initdir$_arping ]] || return 0
    mv "$initdir$_arping" "$initdir/usr/lib/bootkit/arping"
    inst_script "$moddir/bootkit-arping.sh" "$_arping"
}

# shell flavour: the boot loader's lease brought up in a handful of commands (bootkit-ifup.sh says why);
# network-legacy's ifup moves to /usr/lib/bootkit/ifup behind the wrapper and does everything else.
install_ifup() {
    [[ -e $initdir/sbin/ifup && ! -L $initdir/sbin/ifup ]] || return 0
    mv "$initdir/sbin/ifup" "$initdir/usr/lib/bootkit/ifup"
    inst_script "$moddir/bootkit-ifup.sh" /sbin/ifup
}

# poweroff, reboot and halt for the shell initramfs: dracut's emergency path runs the one rd.emergency= names
# (halt by default with rd.shell=0), and without them "poweroff: command not found" ends init: a kernel panic.
# No existing command fits: systemctl, sysvinit's halt and busybox's applets all ask their own init, and PID 1
# here is dracut's shell script; what is left is what their -f does, sync and the reboot(2) system call.
# Python is in the image anyway (a static busybox would add 2 MB and a build dependency).
install_halt() {
    cat > "$initdir/usr/lib/bootkit/bootkit-halt" << 'EOF'
#!/usr/bin/python3 -SE
"""poweroff, reboot, halt of bootkit's shell initramfs (by the name it is run as): sync, then reboot(2)."""
import ctypes
import os
import sys

# LINUX_REBOOT_CMD_* of <linux/reboot.h>
HOW = {"poweroff": 0x4321FEDC, "reboot": 0x01234567, "halt": 0xCDEF0123}
name = os.path.basename(sys.argv[0])
if name not in HOW:
    sys.exit(f"{name}: run me as poweroff, reboot or halt")
os.sync()
libc = ctypes.CDLL(None, use_errno=True)
libc.reboot(ctypes.c_uint(HOW[name]))
sys.exit(f"{name}: reboot(2) failed: {os.strerror(ctypes.get_errno())}")
EOF
    chmod 0755 "$initdir/usr/lib/bootkit/bootkit-halt"
    local _name
    for _name in poweroff reboot halt; do
        ln_r /usr/lib/bootkit/bootkit-halt "/usr/sbin/$_name"
    done
}
