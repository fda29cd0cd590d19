"""``python -m acon.doctor``: see :mod:`acon.doctor`."""

import sys

from acon.doctor import main

if __name__ == "__main__":
    sys.exit(main())
