"""``python -m rkv_local``: the ``rkv-local`` command."""
import sys

from .cli import main

sys.exit(main())
