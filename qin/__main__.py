import sys

from qin.cli import main

sys.exit(main())
