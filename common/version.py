"""The package version, from installed metadata."""

from __future__ import annotations

from importlib import metadata


def version() -> str:
    try:
        return metadata.version("oobleck")
    except metadata.PackageNotFoundError:  # running from a source tree without install
        return "0+unknown"
