"""The real S3 server of the test fixtures: devtools/s3server.py's SeaweedFS, which the
benchmarks use too. Here a missing `weed` skips the test (and fails it under CI)."""
from __future__ import annotations

from devtools.s3server import S3_ENV
from devtools.s3server import SeaweedS3 as _SeaweedS3

from . import require_binary

__all__ = ["SeaweedS3", "S3_ENV"]


class SeaweedS3(_SeaweedS3):
    def __init__(self, *args, **kwargs):
        require_binary("weed")
        super().__init__(*args, **kwargs)
