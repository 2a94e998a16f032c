"""``python -m mesa_stability``: the ``mesa`` command (:mod:`mesa_stability.cli`)."""

import sys

from .cli import main

sys.exit(main())
