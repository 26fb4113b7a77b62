#!/usr/bin/python3 -sE
"""Entry point of bootkit's boot code in the initramfs (see bootkit/boot/main.py)."""
import sys

sys.path.insert(0, "/usr/lib/bootkit")

from bootkit.boot.main import main  # noqa: E402

sys.exit(main())
