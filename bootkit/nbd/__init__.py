"""bootkit's NBD side: a read-only server for an open image, and the kernel attach that serves it as /dev/nbdN.

- ``protocol``: constants and wire structures (NetworkBlockDevice/nbd doc/proto.md)
- ``server``: ``NBDServer``: what is served, its limits, one connection from start to end
- ``handshake``: fixed newstyle negotiation, under one deadline
- ``receiver``: buffered reads from a client
- ``scheduler``: the threads of a connection (leader/follower, the queue of one-cluster reads, polling)
- ``replies``: answers and how they go out (send lock, buffers, sparse reads, sendfile)
- ``budget``: the bound on large reply buffers, shared out between connections
- ``transport``: Unix/TCP listeners, socket activation, the accept loop
- ``kernel``: ``attach()``/``detach()`` over generic netlink (the daemon that serves it: ``bootkit.daemon``)

Runs inside the initramfs: standard library only, Python >= 3.9.
"""

from __future__ import annotations
