"""`python -m jaxlora ...`: the `jaxlora` command (see `jaxlora.cli`).

Example:
    $ python -m jaxlora --help
    $ python -m jaxlora demo
"""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
