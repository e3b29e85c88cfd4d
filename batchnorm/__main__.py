"""`python -m batchnorm` runs the command line."""

import sys

from batchnorm.reproduce.cli import main

sys.exit(main())
