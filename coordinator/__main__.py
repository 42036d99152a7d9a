"""`python -m caravan.coordinator` and the `caravan` console script."""

import sys

from caravan.pipeline.catalog import default_cache_dir
from caravan.pipeline.numba_config import keep_compiled_kernels_in
from caravan.proto.polling import poll_sockets_in_place


def main() -> int:
    keep_compiled_kernels_in(default_cache_dir())  # before the kernels are imported
    poll_sockets_in_place()  # before grpc is imported
    try:
        from caravan.coordinator.cli import main as cli_main
    except KeyboardInterrupt:  # Ctrl-C while numba and the pipeline are still importing
        return 130
    return cli_main()


if __name__ == "__main__":
    sys.exit(main())
