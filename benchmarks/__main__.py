"""`python -m benchmarks`: see `benchmarks/__init__.py` and BENCHMARKS.md."""

import sys

from benchmarks import main

sys.exit(main())
