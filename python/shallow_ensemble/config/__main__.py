"""``python -m shallow_ensemble.config [PATH]``: write the configuration reference."""

import sys

from .reference import main


sys.exit(main())
