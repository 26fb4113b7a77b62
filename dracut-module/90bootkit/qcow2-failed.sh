#!/bin/sh
# pre-mount hook: if bootkit's boot code failed, follow dracut's failure path with its one-line cause.
# Sourced by dracut: return, never exit. root and NEWROOT are exported by dracut's init.
# shellcheck disable=SC2154

# shellcheck source=/dev/null
command -v die > /dev/null || . /lib/dracut-lib.sh

if [ -e /run/bootkit/failed ]; then
    read -r _bootkit_cause < /run/bootkit/failed
    die "bootkit: ${_bootkit_cause:-boot failed}"
elif [ "$root" = qcow2 ] && ! ismounted "$NEWROOT"; then
    die "bootkit: the root filesystem was not mounted"
fi
