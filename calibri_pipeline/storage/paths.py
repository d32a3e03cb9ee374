"""Where the pipeline keeps its files when nobody says otherwise.

Everything lives under ``CALIBRI_HOME`` (default ``./.calibri``, resolved against the working
directory at the moment of the call):

- the catalog: ``CALIBRI_CATALOG`` or ``<CALIBRI_HOME>/catalog.duckdb``
- the object store: ``CALIBRI_OBJECT_STORE`` (a path, ``file://`` or ``s3://`` URL) or
  ``<CALIBRI_HOME>/objects``
"""

from __future__ import annotations

import os
from pathlib import Path


def calibri_home() -> Path:
    """The pipeline's home directory (not created here), as an absolute path."""
    return Path(os.environ.get("CALIBRI_HOME") or ".calibri").expanduser().resolve()


def default_catalog_path() -> Path:
    """``$CALIBRI_CATALOG`` if set, else ``<CALIBRI_HOME>/catalog.duckdb``."""
    explicit = os.environ.get("CALIBRI_CATALOG")
    if explicit:
        return Path(explicit).expanduser().resolve()
    return calibri_home() / "catalog.duckdb"


def default_object_store_url() -> str:
    """``$CALIBRI_OBJECT_STORE`` if set, else the local directory ``<CALIBRI_HOME>/objects``."""
    explicit = os.environ.get("CALIBRI_OBJECT_STORE")
    if explicit:
        return explicit
    return str(calibri_home() / "objects")
