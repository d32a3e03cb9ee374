"""Storage: the DuckDB catalog and the fsspec object store (no Dagster here)."""

from calibri_pipeline.storage.catalog import (
    SCHEMA_DOC,
    TABLES,
    Catalog,
    CatalogError,
    ReplaceResult,
    check_read_only_sql,
)
from calibri_pipeline.storage.object_store import ObjectStateStore, ObjectStore, ObjectStoreError, validate_key
from calibri_pipeline.storage.paths import calibri_home, default_catalog_path, default_object_store_url

__all__ = [
    "SCHEMA_DOC",
    "TABLES",
    "Catalog",
    "CatalogError",
    "ObjectStateStore",
    "ObjectStore",
    "ObjectStoreError",
    "ReplaceResult",
    "calibri_home",
    "check_read_only_sql",
    "default_catalog_path",
    "default_object_store_url",
    "validate_key",
]
