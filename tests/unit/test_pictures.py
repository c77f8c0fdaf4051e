"""A picture's checks (no network), and the settings that guard pictures."""

from __future__ import annotations

import io

import pytest
from PIL import Image
from pydantic import ValidationError

from app.platform.config import IllustrationSettings, ObjectStoreSettings, Settings
from app.providers.pictures import PictureRefusedError, inspect_picture, sniff
from app.services.illustrations import etag_matches


def encoded(fmt: str, size: tuple[int, int] = (40, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (10, 120, 200)).save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("fmt", "media_type"),
    [("PNG", "image/png"), ("JPEG", "image/jpeg"), ("WEBP", "image/webp"), ("GIF", "image/gif")],
)
def test_a_picture_is_known_by_its_bytes_and_measured_from_the_file(
    fmt: str, media_type: str
) -> None:
    picture = inspect_picture(encoded(fmt), max_bytes=1 << 20, max_dimension=100)

    assert (picture.media_type, picture.width, picture.height) == (media_type, 40, 30)
    assert len(picture.sha256) == 64


@pytest.mark.parametrize(
    "data",
    [
        b"<html>not a picture</html>",
        b"",
        b"\x89PNG\r\n\x1a\n" + b"\x00" * 64,  # a PNG signature on garbage
        b"RIFF\x10\x00\x00\x00WEBP" + b"\x00" * 16,
        encoded("PNG")[:60],  # cut short
    ],
    ids=["html", "empty", "png-garbage", "webp-garbage", "truncated"],
)
def test_anything_else_is_refused(data: bytes) -> None:
    with pytest.raises(PictureRefusedError):
        inspect_picture(data, max_bytes=1 << 20, max_dimension=100)


def test_a_picture_too_large_or_too_wide_is_refused() -> None:
    with pytest.raises(PictureRefusedError, match="bytes"):
        inspect_picture(encoded("PNG"), max_bytes=50, max_dimension=100)
    with pytest.raises(PictureRefusedError, match="200x30"):
        inspect_picture(encoded("PNG", (200, 30)), max_bytes=1 << 20, max_dimension=100)


def test_the_header_never_decides_the_type() -> None:
    assert sniff(b"GIF89a....") == ("image/gif", "GIF", "gif")
    assert sniff(b"image/png") is None


@pytest.mark.parametrize(
    ("header", "matches"),
    [('"abc"', True), ('W/"abc"', True), ('"x", "abc"', True), ("*", True), ('"x"', False)],
)
def test_if_none_match_uses_the_weak_comparison(header: str, matches: bool) -> None:
    assert etag_matches(header, '"abc"') is matches
    assert etag_matches(None, '"abc"') is False


def test_object_store_settings_refuse_what_cannot_work() -> None:
    with pytest.raises(ValidationError, match="OBJECT_STORE_S3_BUCKET"):
        ObjectStoreSettings(_env_file=None, backend="s3")
    with pytest.raises(ValidationError, match="OBJECT_STORE_BACKEND=s3"):
        ObjectStoreSettings(_env_file=None, serve="redirect")
    with pytest.raises(ValidationError, match="both"):
        ObjectStoreSettings(
            _env_file=None, backend="s3", s3_bucket="b", s3_access_key_id="only-the-id"
        )


def test_unchecked_pictures_are_refused_in_production() -> None:
    with pytest.raises(ValidationError, match="ILLUSTRATION_MODERATION=off"):
        Settings(
            _env_file=None,
            app_env="production",
            illustrations=IllustrationSettings(_env_file=None, moderation="off"),
            auth={"mode": "jwt", "jwt_secret": "s" * 40, "issuer": "i", "audience": "a"},
        )
