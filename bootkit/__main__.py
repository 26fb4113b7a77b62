import sys

from bootkit.cli import main

sys.exit(main())
