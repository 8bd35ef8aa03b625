"""``python -m hdlm ...`` (and ``torchrun -m hdlm train ...``): the ``hdlm`` command line."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
