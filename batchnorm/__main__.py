"""`python -m batchnorm` runs the command line."""

import sys

from batchnorm.cli import main

sys.exit(main())
