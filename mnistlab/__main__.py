import sys

from mnistlab.cli import main

sys.exit(main())
