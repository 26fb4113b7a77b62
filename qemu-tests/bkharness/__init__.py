"""bootkit's end-to-end test harness: build a root image, make the QCOW2, build the initrd, render the boot
configuration, serve it, boot QEMU, read the serial console.

Used by the QEMU tests (qemu-tests/test_*.py), by bench/boot.py and by the README demo (bkharness/demo.py).
Each step is a function or a context manager named after the step, so a test reads as the boot story::

    image = qcow2_image(root_image("busybox").raw, compression="deflate")
    with http_server(www, log_dir=d) as web, qemu_pxe(tftp, "boot.ipxe", log_dir=d) as vm:
        proof = expect_proof(vm)
"""

from bkharness.guest import Firmware, Guest, GuestError, Nic, qemu_direct, qemu_pxe, qemu_pxe_netdev
from bkharness.images import RootImage, qcow2_image, root_image
from bkharness.pieces import MissingPiece, initrd, kernel, pxe_tree
from bkharness.proof import Proof, expect_boot_failure, expect_clean_poweroff, expect_proof
from bkharness.servers import WebServer, http_server, nginx_server

__all__ = [
    "Firmware",
    "Guest",
    "GuestError",
    "MissingPiece",
    "Nic",
    "Proof",
    "RootImage",
    "WebServer",
    "expect_boot_failure",
    "expect_clean_poweroff",
    "expect_proof",
    "http_server",
    "initrd",
    "kernel",
    "nginx_server",
    "pxe_tree",
    "qcow2_image",
    "qemu_direct",
    "qemu_pxe",
    "qemu_pxe_netdev",
    "root_image",
]
