"""`python -m caravan.coordinator`: the `caravan` command line."""

import sys

try:
    from caravan.coordinator.cli import main
except KeyboardInterrupt:  # Ctrl-C while numba and the pipeline are still importing
    sys.exit(130)

sys.exit(main())
