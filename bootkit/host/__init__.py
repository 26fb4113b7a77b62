"""Host-side bootkit: the command line, the initramfs builder, the PXE configuration generator and the
helpers they use. Python >= 3.11 and the declared dependencies; nothing here goes into the initramfs."""
