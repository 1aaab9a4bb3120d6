"""Run this checkout's vtunnel under the embeddable Windows Python, whose ._pth file keeps the
script's directory off sys.path."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import vtunnel  # noqa: E402

sys.exit(vtunnel.main())
