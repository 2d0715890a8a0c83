"""Data files shipped inside the package: the deploy targets (targets/*.toml) and the calibration sets (calibration/).

Read through importlib.resources so that a wheel install finds them where the package is, not beside a checkout.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def shipped_dir(name: str) -> Path:
    """The shipped folder `name` as a directory on disk (wheels install unzipped, so it always is one)."""
    folder = resources.files(__name__) / name
    if not isinstance(folder, Path) or not folder.is_dir():
        raise FileNotFoundError(f"the package's data folder '{name}' is missing from {folder} (a broken install?)")
    return folder
