"""What the receive path reads and writes around a data set without decoding it.

* :func:`read_header`: the leading attributes of a received data set, up to Series Instance UID, in
  its transfer syntax (the index needs nothing after them; pixel data is never read).
* :func:`file_meta_information`: the PS3.10 File Meta Information group written before the data set.
* :func:`read_part10` and :func:`data_set_is_complete`: start-up recovery's check that a spool file
  found without a row is a whole Part 10 file (see ``dicomnode.receive.recovery``).
"""

from __future__ import annotations

import mmap
import struct
import zlib
from typing import BinaryIO, cast

from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.tag import BaseTag
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian, ImplicitVRLittleEndian

from dicomnode.net.identity import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME

PREAMBLE = bytes(128) + b"DICM"
HEADER_KEYWORDS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")

# The header parse stops after Series Instance UID: every attribute the index needs comes before it.
_LAST_HEADER_TAG = 0x0020000E
_INFLATE_LIMIT = 4 * 1024 * 1024  # inflated bytes enough for the header of a deflated data set
_HEADER_PREFIX = 64 * 1024  # bytes copied for the header parse before trying more of the data set
_HEADER_FALLBACK_LIMIT = 64 * 1024 * 1024  # bytes parsed at most when the prefix was not enough
_INFLATE_CHUNK = 1024 * 1024
# Explicit VR elements whose length field is 4 bytes (PS3.5 7.1.2); the others have 2.
_LONG_VRS = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
)
_UNDEFINED = 0xFFFFFFFF
_ITEM, _ITEM_END, _SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_MAX_DEPTH = 64  # nesting of sequences a complete file may have before it is judged malformed


def read_header(fragments: list[memoryview], size: int, transfer_syntax_uid: str) -> Dataset:
    """Parse the data set's leading attributes, up to Series Instance UID, in its transfer syntax.

    Only the first ``_HEADER_PREFIX`` bytes are copied for it (the identifying attributes come
    first; a 512 KiB CT image used to be copied whole, twice); when the parse did not reach an
    element after Series Instance UID there, up to ``_HEADER_FALLBACK_LIMIT`` bytes are (never a
    copy of a whole multi-GB part). An empty or garbage data set parses "successfully" into
    something without UIDs, which the caller then refuses. Pixel data is never read.
    """
    prefix = _head(fragments, _HEADER_PREFIX)
    if len(prefix) == size:
        return parse_header(prefix, transfer_syntax_uid)
    try:
        header, reached_the_end = _parse_header(prefix, transfer_syntax_uid)
        if reached_the_end:  # an element after Series Instance UID began: every one before is whole
            return header
    except Exception:  # the prefix ended inside an element: parse more below
        pass
    if size <= _HEADER_FALLBACK_LIMIT:
        return parse_header(b"".join(fragments), transfer_syntax_uid)
    return parse_header(_head(fragments, _HEADER_FALLBACK_LIMIT), transfer_syntax_uid)  # no UIDs: refused


def _head(fragments: list[memoryview], limit: int) -> bytes:
    """The first ``limit`` bytes of the fragments, in one copy."""
    pieces: list[memoryview] = []
    room = limit
    for fragment in fragments:
        piece = fragment[:room]
        pieces.append(piece)
        room -= piece.nbytes
        if room <= 0:
            break
    return b"".join(pieces)


def parse_header(data: bytes, transfer_syntax_uid: str) -> Dataset:
    """The leading attributes of one encoded data set (deflated ones are inflated only that far)."""
    return _parse_header(data, transfer_syntax_uid)[0]


def _parse_header(data: bytes, transfer_syntax_uid: str) -> tuple[Dataset, bool]:
    """:func:`parse_header`, and whether it stopped at an element after Series Instance UID."""
    if transfer_syntax_uid == DeflatedExplicitVRLittleEndian:
        data = zlib.decompressobj(-zlib.MAX_WBITS).decompress(data, _INFLATE_LIMIT)
    implicit = transfer_syntax_uid == ImplicitVRLittleEndian
    little = transfer_syntax_uid != ExplicitVRBigEndian
    fp = DicomBytesIO(data)
    fp.is_little_endian = little
    fp.is_implicit_VR = implicit
    stopped = False

    def stop_after_header(tag: BaseTag, vr: str | None, length: int) -> bool:
        nonlocal stopped
        stopped = int(tag) > _LAST_HEADER_TAG  # a plain int comparison: BaseTag.__gt__ builds a Tag
        return stopped

    header = read_dataset(cast(BinaryIO, fp), implicit, little, stop_when=stop_after_header)
    return header, stopped


def header_text(header: Dataset, keyword: str, limit: int) -> str | None:
    """An attribute as text cut to ``limit`` characters, or None when absent, empty or malformed
    (decoded by pydicom, in the data set's Specific Character Set: for person and ID values)."""
    try:
        value = header.get(keyword)
    except Exception:  # a malformed element must not refuse the whole instance
        return None
    if value is None:
        return None
    text = str(value).strip()
    return text[:limit] or None


def header_ascii(header: Dataset, keyword: str) -> str | None:
    """A UI, DA or CS attribute's value as sent, or None when absent.

    These VRs use the default character repertoire only (PS3.5 6.1.2), so the bytes are the text:
    read straight from the raw element, without pydicom's value conversion and validation, which
    cost about 12 us per attribute on every C-STORE. Padding (space or NUL) at either end is cut; a
    byte outside ASCII stays visible (as Latin-1), so a UID holding one is refused as invalid.
    """
    tag = tag_for_keyword(keyword)
    if tag is None or tag not in header:
        return None
    value = header.get_item(tag).value
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode("latin-1").strip(" \x00")
    return None if value is None else str(value).strip(" \x00")


def header_ascii_text(header: Dataset, keyword: str, limit: int) -> str | None:
    """:func:`header_ascii` cut to ``limit`` characters; None when absent or empty."""
    text = header_ascii(header, keyword)
    if text is None:
        return None
    return text[:limit] or None


def file_meta_information(
    sop_class_uid: str, sop_instance_uid: str, transfer_syntax_uid: str, source_ae_title: str
) -> bytes:
    """The File Meta Information group (PS3.10 7.1), explicit VR little endian, for a received instance."""

    def element(tag_element: int, vr: bytes, value: bytes) -> bytes:
        if vr == b"OB":
            return struct.pack("<HH2sHL", 0x0002, tag_element, vr, 0, len(value)) + value
        return struct.pack("<HH2sH", 0x0002, tag_element, vr, len(value)) + value

    def padded(text: str, pad: bytes) -> bytes:
        raw = text.encode("ascii")
        return raw + pad * (len(raw) % 2)

    elements = [
        element(0x0001, b"OB", b"\x00\x01"),
        element(0x0002, b"UI", padded(sop_class_uid, b"\x00")),
        element(0x0003, b"UI", padded(sop_instance_uid, b"\x00")),
        element(0x0010, b"UI", padded(transfer_syntax_uid, b"\x00")),
        element(0x0012, b"UI", padded(IMPLEMENTATION_CLASS_UID, b"\x00")),
        element(0x0013, b"SH", padded(IMPLEMENTATION_VERSION_NAME, b" ")),
    ]
    source = source_ae_title.strip()
    if source and source.isascii() and "\\" not in source:
        elements.append(element(0x0016, b"AE", padded(source[:16], b" ")))
    group = b"".join(elements)
    return element(0x0000, b"UL", struct.pack("<L", len(group))) + group


def read_part10(data: bytes | mmap.mmap) -> tuple[Dataset, int]:
    """The File Meta Information of a Part 10 file and the offset of its data set.

    Relies on File Meta Information Group Length (0002,0000), which every file the spool writes
    starts with; raise ValueError for anything else.
    """
    if len(data) < 144 or data[128:132] != b"DICM" or data[132:140] != b"\x02\x00\x00\x00UL\x04\x00":
        raise ValueError("not a Part 10 file with a File Meta Information Group Length")
    end = 144 + int.from_bytes(data[140:144], "little")
    if end > len(data):
        raise ValueError("the File Meta Information runs past the end of the file")
    fp = DicomBytesIO(bytes(data[132:end]))
    fp.is_little_endian, fp.is_implicit_VR = True, False
    return read_dataset(cast(BinaryIO, fp), False, True), end


def data_set_is_complete(data: bytes | mmap.mmap, offset: int, transfer_syntax_uid: str) -> bool:
    """Whether the data set from ``offset`` to the end is whole: every element's value, every item
    and every delimiter present, ending exactly at the end (a file cut short fails this).

    Lengths are only compared with what is there, never used to size a buffer. A deflated data set
    is judged by its compressed stream reaching its end.
    """
    if transfer_syntax_uid == DeflatedExplicitVRLittleEndian:
        inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        view = memoryview(data)[offset:]
        try:
            for start in range(0, len(view), _INFLATE_CHUNK):
                inflater.decompress(view[start : start + _INFLATE_CHUNK], _INFLATE_CHUNK)
                while inflater.unconsumed_tail:
                    inflater.decompress(inflater.unconsumed_tail, _INFLATE_CHUNK)
            inflater.flush()
        except zlib.error:
            return False
        return inflater.eof and inflater.unused_data in (b"", b"\x00")  # one byte pads it to even length
    walker = _Walker(data, transfer_syntax_uid)
    try:
        return walker.elements(offset, len(data), 0) == len(data)
    except (ValueError, struct.error):
        return False


class _Walker:
    """Steps over encoded elements by their lengths, checking each against the bytes present."""

    def __init__(self, data: bytes | mmap.mmap, transfer_syntax_uid: str) -> None:
        self.data = data
        self.implicit = transfer_syntax_uid == ImplicitVRLittleEndian
        order = ">" if transfer_syntax_uid == ExplicitVRBigEndian else "<"
        self.tag = struct.Struct(order + "HH")
        self.u16 = struct.Struct(order + "H")
        self.u32 = struct.Struct(order + "L")

    def _tag(self, at: int) -> int:
        group, element = self.tag.unpack_from(self.data, at)
        return int(group) << 16 | int(element)

    def elements(self, at: int, end: int, depth: int, *, until_item_end: bool = False) -> int:
        """Walk elements from ``at``; return the offset after the last (or after the item delimiter)."""
        if depth > _MAX_DEPTH:
            raise ValueError("sequences nested too deeply")
        while at < end:
            tag = self._tag(at)
            if tag == _ITEM_END:
                if not until_item_end:
                    raise ValueError("item delimiter outside an item")
                return at + 8
            if self.implicit:
                length = int(self.u32.unpack_from(self.data, at + 4)[0])
                at += 8
            else:
                vr = bytes(self.data[at + 4 : at + 6])
                if vr in _LONG_VRS:
                    length = int(self.u32.unpack_from(self.data, at + 8)[0])
                    at += 12
                else:
                    length = int(self.u16.unpack_from(self.data, at + 6)[0])
                    at += 8
            if length == _UNDEFINED:
                at = self.items(at, end, depth + 1)
            elif at + length > end:
                raise ValueError("an element's value runs past the end")
            else:
                at += length
        if until_item_end:
            raise ValueError("an item without its delimiter")
        if at != end:
            raise ValueError("the last element runs past the end")
        return at

    def items(self, at: int, end: int, depth: int) -> int:
        """Walk the items of an undefined-length sequence (or encapsulated pixel data) to its delimiter."""
        while at + 8 <= end:
            tag = self._tag(at)
            length = int(self.u32.unpack_from(self.data, at + 4)[0])
            at += 8
            if tag == _SEQUENCE_END:
                return at
            if tag != _ITEM:
                raise ValueError("an element where an item belongs")
            if length == _UNDEFINED:
                at = self.elements(at, end, depth, until_item_end=True)
            elif at + length > end:
                raise ValueError("an item runs past the end")
            else:
                at += length
        raise ValueError("a sequence without its delimiter")
