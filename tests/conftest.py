"""Shared fixtures. The S3 server fixtures live in tests/support/s3server.py."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from support.s3server import *  # noqa: E402,F401,F403  (pytest fixtures: s3_server, s3_uri, ...)
