"""Boot orchestration that runs inside the initramfs: kernel command line, root selection, the boot sequence.

Runs inside the initramfs: standard library only, Python >= 3.9.
"""
