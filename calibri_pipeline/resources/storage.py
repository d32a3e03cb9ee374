"""Dagster resources for the object store and the catalog.

Both wrap our own classes (:class:`~calibri_pipeline.storage.ObjectStore`,
:class:`~calibri_pipeline.storage.Catalog`) rather than ``dagster-duckdb``'s ``DuckDBResource``:
that resource hands out a raw connection, so the schema, the one-transaction partition replace and
the cross-process lock that lets parallel steps and ``calibri sql`` share the file would all have
to be rebuilt on top of it anyway, and the CLI and tests would take a different code path than the
assets. Configuration holds only a URL / path: credentials never appear in resource config.
"""

from __future__ import annotations

import dagster as dg
from pydantic import Field, PrivateAttr

from calibri_pipeline.storage.catalog import Catalog
from calibri_pipeline.storage.object_store import ObjectStore
from calibri_pipeline.storage.paths import default_catalog_path, default_object_store_url


class ObjectStoreResource(dg.ConfigurableResource):
    """Where images, tensors and CMA-ES state go: a directory path, ``file://`` or ``s3://`` URL."""

    url: str | None = Field(
        default=None,
        description="directory, file:///path or s3://bucket/prefix (None: $CALIBRI_OBJECT_STORE or <CALIBRI_HOME>/objects); "
        "S3 credentials come from the AWS_* environment variables only",
    )
    _store: ObjectStore | None = PrivateAttr(default=None)

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        # Build the store at step start so a bad URL or missing S3 credentials fail before any work.
        self._store = ObjectStore(self.url or default_object_store_url())

    @property
    def store(self) -> ObjectStore:
        if self._store is None:
            self._store = ObjectStore(self.url or default_object_store_url())
        return self._store


class CatalogResource(dg.ConfigurableResource):
    """The DuckDB catalog file (created with its schema on first use)."""

    path: str | None = Field(
        default=None, description="catalog file (None: $CALIBRI_CATALOG or <CALIBRI_HOME>/catalog.duckdb)"
    )
    lock_timeout: float = Field(default=120.0, description="seconds a write waits for the catalog lock")
    _catalog: Catalog | None = PrivateAttr(default=None)

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        self._catalog = Catalog(self.path or default_catalog_path(), lock_timeout=self.lock_timeout)

    @property
    def catalog(self) -> Catalog:
        if self._catalog is None:
            self._catalog = Catalog(self.path or default_catalog_path(), lock_timeout=self.lock_timeout)
        return self._catalog
