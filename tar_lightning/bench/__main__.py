"""Entry point of ``python -m tar_lightning.bench``."""

import logging
import sys

from tar_lightning.bench.cli import main

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)
main()
