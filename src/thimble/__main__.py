import sys

from thimble.cli import main

sys.exit(main())
