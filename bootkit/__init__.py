"""bootkit: network-boot Linux machines straight from a compressed QCOW2 image."""

__version__ = "0.1.0"
