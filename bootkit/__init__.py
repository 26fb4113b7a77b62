"""bootkit: network-boot Linux machines straight from a compressed QCOW2 image.

Layout: everything in this package runs inside the initramfs (standard library only, Python >= 3.9) —
``qcow2`` (the reader), ``nbd`` (server and kernel attach), ``fetch`` (HTTP), ``boot`` (the boot sequence),
``source``, ``run``, ``errors``, ``log`` — except ``bootkit.host`` (command line, initramfs builder, PXE
configuration, Python >= 3.11 with the declared dependencies) and ``__main__`` (``python -m bootkit``).
tests/test_layout.py derives the initramfs set from this layout and enforces it.
"""

__version__ = "0.1.0"
