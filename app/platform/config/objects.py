"""Where pictures are kept (object storage) and how they are drawn in the background."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import AnyHttpUrl, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings

from app.platform.config.base import settings_group


class ObjectStoreSettings(BaseSettings):
    """`OBJECT_STORE_*`: a local directory (the embedded default) or an S3-compatible bucket."""

    model_config = settings_group("OBJECT_STORE_")

    backend: Literal["local", "s3"] = "local"
    # backend=local: the directory pictures are kept in (created at start).
    local_path: Path = Path("data/objects")
    # backend=s3: any S3-compatible server (AWS S3, MinIO, Ceph, R2, ...).
    s3_endpoint: AnyHttpUrl | None = None  # unset: AWS S3 of the region
    s3_bucket: str | None = None
    s3_region: str = "us-east-1"
    s3_access_key_id: SecretStr | None = None  # unset: the SDK's usual chain (env, role)
    s3_secret_access_key: SecretStr | None = None
    # Path-style URLs (http://host/bucket/key): what MinIO and most S3-compatible servers use.
    s3_path_style: bool = True
    # `serve=redirect` (backend=s3 only): the illustration endpoint answers 307 to a
    # signed URL of the bucket, valid this long; `proxy`: the service sends the bytes.
    serve: Literal["proxy", "redirect"] = "proxy"
    signed_url_seconds: int = Field(default=300, ge=10, le=7 * 24 * 3600)
    # Every call to the store is bounded by this.
    timeout_seconds: float = Field(default=10.0, gt=0)

    @model_validator(mode="after")
    def _complete(self) -> ObjectStoreSettings:
        if self.backend == "s3" and not self.s3_bucket:
            raise ValueError("OBJECT_STORE_BACKEND=s3 needs OBJECT_STORE_S3_BUCKET")
        if self.serve == "redirect" and self.backend != "s3":
            raise ValueError("OBJECT_STORE_SERVE=redirect needs OBJECT_STORE_BACKEND=s3")
        if (self.s3_access_key_id is None) != (self.s3_secret_access_key is None):
            raise ValueError(
                "set both OBJECT_STORE_S3_ACCESS_KEY_ID and OBJECT_STORE_S3_SECRET_ACCESS_KEY, "
                "or neither"
            )
        return self


class IllustrationSettings(BaseSettings):
    """`ILLUSTRATION_*`: checks on a picture, and the background drawing's lease and budget."""

    model_config = settings_group("ILLUSTRATION_")

    # A picture larger than this, or wider or taller than `max_dimension`, is refused.
    max_bytes: int = Field(default=8 * 1024 * 1024, ge=1024)
    max_dimension: int = Field(default=4096, ge=16)
    # Fetching the picture from the image model's output URL (each attempt).
    fetch_timeout_seconds: float = Field(default=15.0, gt=0)
    # One attempt at drawing, fetching, checking and storing a picture.
    deadline_seconds: float = Field(default=120.0, gt=0)
    # A worker holds a pending picture on a lease this long, renewed every third of
    # it; a picture whose worker died is taken up by another after this long.
    lease_seconds: float = Field(default=30.0, gt=0)
    # Attempts per picture before it is marked failed (a killed worker's counts).
    max_attempts: int = Field(default=3, ge=1)
    # How often each worker looks for pending pictures nobody holds (and at start).
    sweep_seconds: float = Field(default=15.0, gt=0)
    # Pictures one worker draws at once (more wait, pending, for a free slot).
    concurrency: int = Field(default=4, ge=1)
    # `required`: a picture is stored and served only once OpenAI's moderation
    # passed it (no OpenAI key or MODERATION_MODE=local: no picture is drawn);
    # `off`: pictures are not checked (never in production).
    moderation: Literal["required", "off"] = "required"
