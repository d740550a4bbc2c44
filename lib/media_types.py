"""The media types uploads accept: their names, file extensions, and how a file's first bytes tell them apart."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import PurePosixPath


@dataclass(frozen=True)
class MediaType:
    """一种支持的媒体类型"""

    kind: str
    mime: str
    ext: str


MEDIA_TYPES = {
    t.mime: t
    for t in (
        MediaType("image", "image/png", ".png"),
        MediaType("image", "image/jpeg", ".jpg"),
        MediaType("image", "image/webp", ".webp"),
        MediaType("image", "image/gif", ".gif"),
        MediaType("video", "video/mp4", ".mp4"),
        MediaType("video", "video/quicktime", ".mov"),
        MediaType("video", "video/webm", ".webm"),
        MediaType("video", "video/x-matroska", ".mkv"),
        MediaType("video", "video/x-msvideo", ".avi"),
    )
}
# Other names of the same types: a browser's File.type comes from the operating system, which names AVI
# video/avi (Windows, macOS) and an .m4v (MP4) video/x-m4v (Safari); older clients say image/jpg or image/pjpeg.
TYPE_ALIASES = {
    "video/avi": "video/x-msvideo",
    "video/msvideo": "video/x-msvideo",
    "video/x-m4v": "video/mp4",
    "image/jpg": "image/jpeg",
    "image/pjpeg": "image/jpeg",
    "image/x-png": "image/png",
}
# A browser's File.type is empty for an extension its system does not know (.mkv on macOS), and some clients send
# application/octet-stream: the ticket then goes by the file's name (the bytes still decide at complete).
UNNAMED_TYPES = ("", "application/octet-stream", "binary/octet-stream")
EXTENSIONS = {t.ext: t for t in MEDIA_TYPES.values()} | {
    ".jpeg": MEDIA_TYPES["image/jpeg"],
    ".m4v": MEDIA_TYPES["video/mp4"],
    ".qt": MEDIA_TYPES["video/quicktime"],
}
UNSUPPORTED = "Unsupported file type: send a PNG, JPEG, WebP or GIF image, or an MP4, MOV, WebM, MKV or AVI video."
SNIFF_BYTES = 64  # enough of a file's start for sniff()
NOT_MEDIA_BRANDS = (b"heic", b"heix", b"hevc", b"mif1", b"msf1", b"avif", b"avis", b"M4A ", b"M4B ", b"M4P ", b"crx ")


def sniff(head: bytes) -> MediaType | None:
    """按文件开头的魔数判断媒体类型（不信任客户端声明）；不支持 → None"""
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return MEDIA_TYPES["image/png"]
    if head.startswith(b"\xff\xd8\xff"):
        return MEDIA_TYPES["image/jpeg"]
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return MEDIA_TYPES["image/gif"]
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return MEDIA_TYPES["image/webp"]
    if head[:4] == b"RIFF" and head[8:12] == b"AVI ":
        return MEDIA_TYPES["video/x-msvideo"]
    if head[4:8] == b"ftyp":
        brand = head[8:12]
        if brand in NOT_MEDIA_BRANDS:
            return None
        return MEDIA_TYPES["video/quicktime" if brand == b"qt  " else "video/mp4"]
    if head[4:8] in (b"moov", b"mdat", b"wide", b"free") and len(head) >= 8:  # old QuickTime without ftyp
        return MEDIA_TYPES["video/quicktime"]
    if head.startswith(b"\x1a\x45\xdf\xa3"):  # EBML: the DocType sits in the header's first bytes
        return MEDIA_TYPES["video/webm" if b"webm" in head[:SNIFF_BYTES] else "video/x-matroska"]
    return None


def media_type_of(content_type: str, filename: str | None = None) -> MediaType | None:
    """客户端声明的内容类型 → 支持的媒体类型；没有声明类型时看文件名的扩展名"""
    name = content_type.split(";")[0].strip().lower()
    if name in UNNAMED_TYPES and filename:
        return EXTENSIONS.get(PurePosixPath(filename.lower()).suffix)
    return MEDIA_TYPES.get(TYPE_ALIASES.get(name, name))
