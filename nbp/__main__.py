import sys

from nbp.cli import main

sys.exit(main())
