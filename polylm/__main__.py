"""`python -m polylm` works like the `polylm` command."""

import sys

from .cli import main

sys.exit(main())
