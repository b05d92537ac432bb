"""Image input for the API: base64 / data URIs / uploaded bytes / (opt-in) URLs, with limits.

Every failure is an :class:`ImageInputError` carrying the HTTP status it maps to:
400 malformed base64, 413 too many bytes, 415 unsupported format, 422 undecodable or too many
pixels (decompression bomb), 403 URL not allowed (scheme, private / loopback / link-local
target, also after redirects), 504/502 URL timeout or failure.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import io
import ipaddress
import socket
import warnings
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

from PIL import Image

from models.preprocess import ImageDecodeError, decode_image
from service.errors import ApiError


class ImageInputError(ApiError):
    """An image the server will not take, with the HTTP status and code it is answered."""


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int
    max_pixels: int
    formats: tuple[str, ...]


def decode_base64(payload: str, max_bytes: int) -> bytes:
    """Plain base64 or a ``data:image/...;base64,`` URI -> bytes (size-checked before decoding).

    ASCII whitespace is ignored, so MIME base64 wrapped at 76 columns (what the ``base64``
    tool prints by default) decodes like the unwrapped form.
    """
    data = payload.strip()
    if data.startswith("data:"):
        head, sep, data = data.partition(",")
        if not sep or ";base64" not in head:
            raise ImageInputError(400, "bad_image_encoding", "data URI must be ';base64,' encoded")
    data = "".join(data.split())
    if len(data) * 3 // 4 > max_bytes + 3:
        raise ImageInputError(413, "image_too_large", f"image is larger than {max_bytes} bytes")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ImageInputError(
            400, "bad_image_encoding", f"image is not valid base64: {exc}"
        ) from exc
    return raw


@dataclass(frozen=True)
class ImageProbe:
    """What an image's header says, read without decoding its pixels."""

    format: str
    width: int
    height: int

    @property
    def pixels(self) -> int:
        return self.width * self.height


def _too_many(pixels: str, limit: int) -> ImageInputError:
    return ImageInputError(
        422, "image_too_many_pixels", f"image has {pixels} pixels, more than {limit}"
    )


def probe_image(raw: bytes, limits: ImageLimits) -> ImageProbe:
    """Check bytes, format and pixel count from the header alone (no pixel is decoded)."""
    if len(raw) > limits.max_bytes:
        raise ImageInputError(
            413, "image_too_large", f"image is larger than {limits.max_bytes} bytes"
        )
    if not raw:
        raise ImageInputError(422, "bad_image", "image is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(raw)) as img:
                fmt, (w, h) = img.format or "", img.size
    except Image.DecompressionBombError as exc:
        # Pillow's own guard (2x its MAX_IMAGE_PIXELS) fires before ours can read the size
        raise _too_many("over Pillow's limit of", limits.max_pixels) from exc
    except Exception as exc:
        # not the exception's text: Pillow's names the buffer object by its heap address
        raise ImageInputError(
            422, "bad_image", "not a decodable image (unrecognised or corrupt data)"
        ) from exc
    if fmt.upper() not in limits.formats:
        raise ImageInputError(
            415,
            "unsupported_image_format",
            f"image format {fmt or 'unknown'} not accepted (accepted: {', '.join(limits.formats)})",
        )
    if w * h > limits.max_pixels:
        raise _too_many(f"{w}x{h}", limits.max_pixels)
    return ImageProbe(fmt.upper(), w, h)


def open_image(raw: bytes, limits: ImageLimits) -> tuple[Image.Image, str]:
    """Decode bytes into a PIL image within the limits; returns (image, sha256 of the bytes)."""
    probe_image(raw, limits)
    try:
        img = decode_image(raw, max_pixels=limits.max_pixels)
    except ImageDecodeError as exc:
        if "pixels" in str(exc):
            raise _too_many("too many", limits.max_pixels) from exc
        raise ImageInputError(
            422, "bad_image", "not a decodable image (truncated or corrupt data)"
        ) from exc
    return img, hashlib.sha256(raw).hexdigest()


def _address_allowed(ip: str) -> bool:
    addr = ipaddress.ip_address(ip)
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return not (
        addr.is_private
        or addr.is_loopback
        or addr.is_link_local
        or addr.is_multicast
        or addr.is_reserved
        or addr.is_unspecified
    )


async def _resolve_checked(host: str, port: int, allow_private: bool) -> str:
    """Resolve ``host``; refuse if ANY address is non-public (no mixed answers trusted)."""
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ImageInputError(422, "image_url_unresolvable", f"cannot resolve {host}") from exc
    ips = sorted({str(info[4][0]) for info in infos})
    if not ips:
        raise ImageInputError(422, "image_url_unresolvable", f"cannot resolve {host}")
    if not allow_private:
        bad = [ip for ip in ips if not _address_allowed(ip)]
        if bad:
            raise ImageInputError(
                403, "image_url_forbidden", f"{host} resolves to a non-public address ({bad[0]})"
            )
    return ips[0]


async def fetch_image_url(
    url: str, max_bytes: int, timeout_s: float, max_redirects: int, allow_private: bool = False
) -> bytes:
    """GET an image over http(s) with SSRF protection, a byte cap and a total time limit."""
    import httpx

    try:
        return await asyncio.wait_for(
            _fetch(url, max_bytes, max_redirects, allow_private), timeout_s
        )
    except TimeoutError as exc:
        raise ImageInputError(
            504, "image_url_timeout", f"fetching the image took more than {timeout_s}s"
        ) from exc
    except (httpx.HTTPError, OSError) as exc:
        # refused, reset, TLS or protocol failure: the image host's fault, not ours
        raise ImageInputError(
            502, "image_url_failed", f"the image URL could not be fetched ({type(exc).__name__})"
        ) from exc


async def _fetch(url: str, max_bytes: int, max_redirects: int, allow_private: bool) -> bytes:
    import httpx

    for _ in range(max_redirects + 1):
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ImageInputError(
                403, "image_url_forbidden", "only http(s) URLs with a host are accepted"
            )
        port = parts.port or (443 if parts.scheme == "https" else 80)
        ip = await _resolve_checked(parts.hostname, port, allow_private)
        headers = {"User-Agent": "mel-service/0.1", "Accept": "image/*"}
        target = url
        if parts.scheme == "http":
            # pin the checked address: a second DNS answer (rebinding) cannot redirect us
            host = f"[{ip}]" if ":" in ip else ip
            target = parts._replace(netloc=f"{host}:{port}").geturl()
            headers["Host"] = parts.netloc
        async with (
            httpx.AsyncClient(follow_redirects=False, trust_env=False) as client,
            client.stream("GET", target, headers=headers) as resp,
        ):
            if parts.scheme == "https":
                stream = resp.extensions.get("network_stream")
                peer = stream.get_extra_info("server_addr") if stream else None
                if peer and not allow_private and not _address_allowed(str(peer[0])):
                    raise ImageInputError(
                        403,
                        "image_url_forbidden",
                        f"{parts.hostname} connected to a non-public address",
                    )
            if resp.status_code in (301, 302, 303, 307, 308):
                loc = resp.headers.get("location")
                if not loc:
                    raise ImageInputError(502, "image_url_failed", "redirect without target")
                url = urljoin(url, loc)
                continue
            if resp.status_code != 200:
                raise ImageInputError(
                    502, "image_url_failed", f"image URL answered HTTP {resp.status_code}"
                )
            declared = resp.headers.get("content-length")
            if declared and declared.isdigit() and int(declared) > max_bytes:
                raise ImageInputError(
                    413, "image_too_large", f"image is larger than {max_bytes} bytes"
                )
            buf = bytearray()
            async for chunk in resp.aiter_bytes():
                buf.extend(chunk)
                if len(buf) > max_bytes:
                    raise ImageInputError(
                        413, "image_too_large", f"image is larger than {max_bytes} bytes"
                    )
            return bytes(buf)
    raise ImageInputError(403, "image_url_forbidden", f"more than {max_redirects} redirects")


__all__ = [
    "ImageInputError",
    "ImageLimits",
    "ImageProbe",
    "decode_base64",
    "fetch_image_url",
    "open_image",
    "probe_image",
]
