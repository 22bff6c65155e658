"""Receiving a multipart upload straight onto disk, under a size limit, without holding it in memory.

Starlette's form parser spools files of any size into the system temp dir before a handler runs; a dataset
upload instead streams its one file part into a file under the home directory and stops with 413 as soon
as the part outgrows the limit, so a too-large upload costs neither memory nor a full read.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import Request
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from qubrid_lab.errors import InsufficientStorageError, InvalidRequestError, PayloadTooLargeError

DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)  # no space, over quota, over this process's file limit
MAX_FIELD_BYTES = 64 * 1024  # a text field (the dataset name) is never legitimately larger
FORM_OVERHEAD_BYTES = MAX_FIELD_BYTES + 16 * 1024  # boundaries, part headers and small fields around the file


def describe_bytes(size: int) -> str:
    for unit, scale in (("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} bytes"


@dataclass
class Upload:
    """What a multipart body held: its one file (saved at ``path``) and its text fields."""

    path: Path
    filename: str | None = None
    received: bool = False
    size: int = 0
    fields: dict[str, str] = field(default_factory=dict)


class _PartCollector:
    """python-multipart callbacks that write the file part to disk and keep the text fields."""

    def __init__(self, upload: Upload, file_field: str, max_file_bytes: int, limit_setting: str):
        self.upload = upload
        self.file_field = file_field
        self.max_file_bytes = max_file_bytes
        self.limit_setting = limit_setting
        self.header_name = b""
        self.header_value = b""
        self.disposition = b""
        self.name: str | None = None
        self.is_file = False
        self.text = bytearray()
        self.handle = None

    def callbacks(self) -> dict:
        return {
            "on_part_begin": self.on_part_begin,
            "on_part_data": self.on_part_data,
            "on_part_end": self.on_part_end,
            "on_header_field": self.on_header_field,
            "on_header_value": self.on_header_value,
            "on_header_end": self.on_header_end,
            "on_headers_finished": self.on_headers_finished,
        }

    def on_part_begin(self) -> None:
        self.disposition, self.name, self.is_file, self.text = b"", None, False, bytearray()

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self.header_name += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self.header_value += data[start:end]

    def on_header_end(self) -> None:
        if self.header_name.lower() == b"content-disposition":
            self.disposition = self.header_value
        self.header_name, self.header_value = b"", b""

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self.disposition)
        self.name = options.get(b"name", b"").decode("utf-8", "replace")
        if self.name != self.file_field:
            return
        if self.upload.received or self.handle:
            raise InvalidRequestError(f"{self.file_field}: send one file per upload.", param=self.file_field)
        if b"filename" not in options:
            raise InvalidRequestError(
                f"{self.file_field}: must be a file part (with a filename), not a text field.", param=self.file_field
            )
        raw = options[b"filename"].decode("utf-8", "replace")
        self.upload.filename = raw.replace("\\", "/").rsplit("/", 1)[-1]  # some browsers send a full path
        self.is_file = True
        self.handle = self.upload.path.open("wb")

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self.is_file:
            self.upload.size += end - start
            if self.upload.size > self.max_file_bytes:
                raise PayloadTooLargeError(
                    f"The file is over {describe_bytes(self.max_file_bytes)} ({self.max_file_bytes} bytes), the "
                    f"largest dataset this server accepts ({self.limit_setting}).",
                    param=self.file_field,
                )
            self.handle.write(data[start:end])
        elif self.name is not None:
            self.text += data[start:end]
            if len(self.text) > MAX_FIELD_BYTES:
                raise InvalidRequestError(f"{self.name}: the field is over {MAX_FIELD_BYTES} bytes.", param=self.name)

    def on_part_end(self) -> None:
        if self.is_file:
            handle, self.handle = self.handle, None
            handle.close()  # flushes: a full disk may only show here
            self.upload.received = True
        elif self.name:
            self.upload.fields[self.name] = self.text.decode("utf-8", "replace")

    def close(self) -> None:
        if self.handle:
            self.handle.close()


async def receive_upload(
    request: Request, target: Path, *, file_field: str, max_file_bytes: int, limit_setting: str
) -> Upload:
    """Stream the multipart body of ``request``, writing its ``file_field`` part to ``target``.

    On any failure (413 over ``max_file_bytes``, a malformed body, a client that goes away) ``target`` is
    deleted before the error propagates.
    """
    content_type, options = parse_options_header(request.headers.get("content-type"))
    if content_type != b"multipart/form-data" or not options.get(b"boundary"):
        raise InvalidRequestError(
            f"Send the dataset as multipart/form-data with the CSV in a '{file_field}' part "
            f"(curl -F {file_field}=@data.csv).",
            param=file_field,
        )
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_file_bytes + FORM_OVERHEAD_BYTES:
        raise PayloadTooLargeError(
            f"The upload is {describe_bytes(int(declared))}; the largest dataset this server accepts is "
            f"{describe_bytes(max_file_bytes)} ({max_file_bytes} bytes, {limit_setting}).",
            param=file_field,
        )

    upload = Upload(path=target)
    collector = _PartCollector(upload, file_field, max_file_bytes, limit_setting)
    parser = MultipartParser(options[b"boundary"], collector.callbacks())
    try:
        async for chunk in request.stream():
            parser.write(chunk)
        parser.finalize()
        if not upload.received:
            raise InvalidRequestError(
                f"{file_field}: a CSV file is required (a multipart part named '{file_field}').", param=file_field
            )
    except BaseException as exc:
        try:
            collector.close()
        except OSError:  # the write that failed is retried by the close's flush, and fails again
            pass
        target.unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.errno in DISK_FULL:
            raise InsufficientStorageError(
                f"The upload could not be stored: the disk holding {target.parent.parent} is full "
                f"({os.strerror(exc.errno)}). Free some space there (or set QUBRID_LAB_HOME to a larger disk) and "
                "upload again; nothing of this upload was kept.",
                param=file_field,
            ) from None
        if isinstance(exc, MultipartParseError):
            raise InvalidRequestError(f"The multipart body could not be parsed: {exc}.", param=file_field) from None
        raise
    return upload
