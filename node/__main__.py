"""`python -m caravan.node`: a worker node (also `caravan node`)."""

import sys

from caravan.pipeline.catalog import default_cache_dir
from caravan.pipeline.numba_config import keep_compiled_kernels_in

keep_compiled_kernels_in(default_cache_dir())  # before the kernels are imported

from caravan.node.cli import main  # noqa: E402

sys.exit(main())
