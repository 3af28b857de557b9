"""Benchmark of a TAR outer step against its floor; run it with ``python -m tar_lightning.bench``."""
