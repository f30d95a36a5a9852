"""``python -m selma_backend`` is the same as the ``selma`` command."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
