"""``python -m cl_bench`` (and ``torchrun ... -m cl_bench``): the ``clbench`` command line."""

import sys

from cl_bench.cli import main

sys.exit(main())
