"""Boot configuration generation: iPXE script, GRUB network configs and dnsmasq from one description.

``settings`` declares every key once, with the parser of its value (``values``); ``table`` reads TOML tables
against them, ``resolve`` turns paths into URLs and local files, and ``load`` holds the rules of each table and
turns a TOML file (or command-line flags) into a frozen :class:`~bootkit.host.pxecfg.model.Config`; ``cmdline``
builds the kernel command line of an entry (the one place; the contract itself is
:mod:`bootkit.boot.cmdline`); ``render`` makes the text files from Jinja2 templates; ``grub`` builds GRUB's
TFTP tree with ``grub-mknetdir``; ``output`` writes the output directory; ``check`` verifies over HTTP that
everything the result points to is served, with the pinned sizes and hashes.

Host side only (Python 3.11, jinja2, requests).
"""
