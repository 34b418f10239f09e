import sys

from m3ae.cli import main

sys.exit(main())
