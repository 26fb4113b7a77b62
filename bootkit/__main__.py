import sys

from bootkit.host.cli import main

sys.exit(main())
