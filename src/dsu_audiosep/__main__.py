"""``python -m dsu_audiosep`` is the same as the ``dsu-audiosep`` command."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
