"""``python -m hf_slim.app.cli``: the ``hf-slim`` console script without its launcher."""

import sys

from .main import main

sys.exit(main())
