#!/bin/bash
# Starts bootkit's boot code (bootkit/boot/main.py) with argv[0] '@bootkit': the NBD server it leaves behind
# is a root storage daemon that nothing modelled on systemd's killing spree may kill (systemd
# docs/ROOT_STORAGE_DAEMONS.md). Python finds its prefix without a path in argv[0].
exec -a @bootkit /usr/bin/python3 -S -E /usr/lib/bootkit/bootkit-boot "$@"
