"""`python -m caravan.node`: a worker node (also `caravan node`)."""

import sys

from caravan.pipeline.catalog import default_cache_dir
from caravan.pipeline.numba_config import keep_compiled_kernels_in
from caravan.proto.polling import poll_sockets_in_place

keep_compiled_kernels_in(default_cache_dir())  # before the kernels are imported
poll_sockets_in_place()  # before grpc is imported

from caravan.node.cli import main  # noqa: E402

sys.exit(main())
