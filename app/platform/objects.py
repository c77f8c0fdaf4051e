"""Object storage: one API over a local directory and an S3-compatible bucket (obstore).

`ObjectStore` puts, gets and deletes whole objects by key, and signs a GET URL
when the backend can (S3). The embedded default is a local directory
(`OBJECT_STORE_LOCAL_PATH`), so `make run` needs nothing; production uses a
bucket (`OBJECT_STORE_BACKEND=s3`, any S3-compatible server). Both are
`obstore` stores (Rust `object_store` underneath): the same calls, the same
errors, whichever backend (docs/decisions.md, "Pictures in object storage").

Every call is bounded by `OBJECT_STORE_TIMEOUT_SECONDS`. A store that does not
answer, refuses our credentials or errs is an `ObjectStoreUnavailableError`;
a key that is not there is `None` from `get` and nothing from `delete`.
Objects are written whole (a put is atomic on both backends: a reader never
sees half a picture). Nothing here knows what the objects are.
"""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta

import obstore
from obstore.store import LocalStore, S3Store

from app.platform.config import ObjectStoreSettings


class ObjectStoreUnavailableError(Exception):
    """The object store did not answer or refused the call: nothing was changed."""


class ObjectStore:
    """Whole objects by key, on a local directory or an S3-compatible bucket."""

    def __init__(
        self, store: LocalStore | S3Store, *, backend: str, timeout_seconds: float = 10.0
    ) -> None:
        self._store = store
        self.backend = backend
        self._timeout = timeout_seconds

    @classmethod
    def from_settings(cls, settings: ObjectStoreSettings) -> ObjectStore:
        if settings.backend == "local":
            settings.local_path.mkdir(parents=True, exist_ok=True)
            local = LocalStore(settings.local_path.resolve(), mkdir=True)
            return cls(local, backend="local", timeout_seconds=settings.timeout_seconds)
        assert settings.s3_bucket is not None  # checked by the settings
        credentials: dict[str, str] = {}
        if settings.s3_access_key_id is not None and settings.s3_secret_access_key is not None:
            credentials = {
                "access_key_id": settings.s3_access_key_id.get_secret_value(),
                "secret_access_key": settings.s3_secret_access_key.get_secret_value(),
            }
        endpoint = str(settings.s3_endpoint).rstrip("/") if settings.s3_endpoint else None
        s3 = S3Store(
            settings.s3_bucket,
            region=settings.s3_region,
            virtual_hosted_style_request=not settings.s3_path_style,
            client_options={
                "allow_http": bool(endpoint and endpoint.startswith("http://")),
                "timeout": f"{settings.timeout_seconds}s",
                "connect_timeout": f"{min(settings.timeout_seconds, 5.0)}s",
            },
            # One retry layer: ours (the caller's lease and attempts), not the client's.
            retry_config={"max_retries": 1, "retry_timeout": timedelta(seconds=5)},
            **({"endpoint": endpoint} if endpoint else {}),  # type: ignore[arg-type]
            **credentials,  # type: ignore[arg-type]
        )
        return cls(s3, backend="s3", timeout_seconds=settings.timeout_seconds)

    async def put(self, key: str, data: bytes) -> None:
        try:
            async with asyncio.timeout(self._timeout):
                await obstore.put_async(self._store, key, data)
        except Exception as error:
            raise ObjectStoreUnavailableError(f"put {key}: {error!r}") from error

    async def get(self, key: str) -> bytes | None:
        try:
            async with asyncio.timeout(self._timeout):
                result = await obstore.get_async(self._store, key)
                return bytes(await result.bytes_async())
        except FileNotFoundError:
            return None
        except Exception as error:
            raise ObjectStoreUnavailableError(f"get {key}: {error!r}") from error

    async def delete(self, key: str) -> None:
        """Deletes `key`; one that is not there is no error."""
        try:
            async with asyncio.timeout(self._timeout):
                await obstore.delete_async(self._store, key)
        except FileNotFoundError:
            return
        except Exception as error:
            raise ObjectStoreUnavailableError(f"delete {key}: {error!r}") from error

    async def signed_url(self, key: str, seconds: int) -> str | None:
        """A URL anyone holding it may GET `key` with for `seconds`; None for a local store."""
        if not isinstance(self._store, S3Store):
            return None
        try:
            async with asyncio.timeout(self._timeout):
                return await obstore.sign_async(self._store, "GET", key, timedelta(seconds=seconds))
        except Exception as error:
            raise ObjectStoreUnavailableError(f"sign {key}: {error!r}") from error

    async def keys(self, prefix: str = "") -> list[str]:
        """Every key under `prefix` (backups and tests; not on a request path)."""
        try:
            async with asyncio.timeout(self._timeout * 6):
                found: list[str] = []
                async for batch in obstore.list(self._store, prefix or None):
                    found.extend(meta["path"] for meta in batch)
                return found
        except Exception as error:
            raise ObjectStoreUnavailableError(f"list {prefix}: {error!r}") from error

    async def ping(self) -> float:
        """One round trip (a HEAD of a key that need not exist); milliseconds."""
        started = time.perf_counter()
        try:
            async with asyncio.timeout(self._timeout):
                await obstore.head_async(self._store, ".ping")
        except FileNotFoundError:
            pass
        except Exception as error:
            raise ObjectStoreUnavailableError(f"ping: {error!r}") from error
        return (time.perf_counter() - started) * 1000
