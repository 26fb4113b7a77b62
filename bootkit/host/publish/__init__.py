"""``bootkit publish``: images, kernels and initramfs files into a docroot under content-addressed names.

``publish.py`` the steps, ``docroot.py`` immutable placement, ``backing.py`` the overlay's backing name,
``tomledit.py`` the pxe-config entry, ``prune.py`` old versions.
"""
