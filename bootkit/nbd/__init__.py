"""bootkit's NBD side: a read-only server for an open image, and the kernel attach that serves it as /dev/nbdN.

- ``protocol``: constants and wire structures (NetworkBlockDevice/nbd doc/proto.md)
- ``server``: ``NBDServer`` (handshake, transmission, threads)
- ``transport``: Unix/TCP listeners, socket activation, the accept loop
- ``kernel``: ``attach()``/``detach()`` over generic netlink, and the daemon bits

Runs inside the initramfs: standard library only, Python >= 3.9.
"""

from __future__ import annotations
