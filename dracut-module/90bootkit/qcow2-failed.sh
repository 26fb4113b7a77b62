#!/bin/sh
# pre-mount hook: if bootkit's boot code failed, follow dracut's failure path with its one-line cause.
# Sourced by dracut: return, never exit. root and NEWROOT are exported by dracut's init.
# shellcheck disable=SC2154

# shellcheck source=/dev/null
command -v die > /dev/null || . /lib/dracut-lib.sh

# dracut's die writes its message into hooks/emergency/01-die.sh, which is sourced later: it gets fixed text
# only. The cause may quote a web server (a reason phrase, a redirect target); the boot code has printed it on
# the console already, as its one "FAILED at <stage>: ..." line, and left it in /run/bootkit/failed.
if [ -e /run/bootkit/failed ]; then
    die "bootkit: the root was not mounted (the FAILED line above and /run/bootkit/failed name the cause)"
elif [ "$root" = qcow2 ] && ! ismounted "$NEWROOT"; then
    die "bootkit: the root filesystem was not mounted"
fi
