"""Reading webdataset tar shards: samples as (key, {ext: bytes}), grouped by key.

Why our own small reader rather than webdataset's pipeline (``tar_file_iterator`` +
``group_by_keys``, tarfile-based): with ``benchmarks/bench_loader_ablation.py`` (10 CIFAR-10 JPEG
shards x 1000 samples, three runs) webdataset's reader took 79.6 / 85.0 / 121.3 us/sample against
8.8 / 12.1 / 14.8 for this one (benchmarks/RESULTS.md). Every loader worker reads its rank's whole
stream (and decodes only its own batches), so at webdataset's cost reading would take longer than
the JPEG decode. webdataset is still what opens the streams (``gopen``: files, URLs, ``pipe:``),
expands brace patterns and writes the shards.

Damage: a header is accepted on its 'ustar' magic (a slice compare; a byte-sum checksum on every
header would cost ~2.5 us, about the reader's whole per-member budget), else on its checksum. A
shard cut off or holding garbage raises ``CorruptShardError`` naming the shard and the byte offset;
a shard cut exactly at a member boundary (or empty) just ends early: the caller compares the count
of samples with ``_info.json`` (``dsvit.data.stream``).
"""
from __future__ import annotations

import os


class CorruptShardError(OSError):
    """A shard that is not a readable tar from byte ``offset`` on (the start of the member whose
    header or data is bad): cut off, or garbage where a header should be."""

    def __init__(self, url: str, offset: int, reason: str):
        super().__init__(f"{url}: {reason} at byte {offset}")
        self.url, self.offset, self.reason = url, offset, reason


def _header_ok(header: bytes) -> bool:
    """A ustar/GNU header (magic 'ustar': one slice compare), else an old-style header whose
    checksum matches (the slow path, a byte sum, only for non-ustar tars and garbage)."""
    if header[257:262] == b"ustar":
        return True
    try:
        stored = int(header[148:156].strip(b"\0 ") or b"-1", 8)
    except ValueError:
        return False
    return stored == sum(header[:148]) + 8 * 32 + sum(header[156:])


def _tar_members(stream, url: str):
    """Yield (name, bytes) of regular files in a tar stream. A minimal ustar/pax/GNU reader.
    Raises CorruptShardError (naming url and byte offset) if cut off or not a tar."""
    long_name, offset = None, 0
    while True:
        header = stream.read(512)
        if len(header) < 512 or not header.strip(b"\0"):
            if header and header.strip(b"\0"):
                raise CorruptShardError(url, offset, "truncated tar header")
            return
        try:
            if not _header_ok(header):
                raise ValueError("bad magic and checksum")
            if header[124] & 0x80:    # GNU base-256 size (members >= 8 GiB)
                size = int.from_bytes(header[125:136], "big")
            else:
                size_field = header[124:136].strip(b"\0 ")
                size = int(size_field, 8) if size_field else 0
            kind = header[156:157]
            name = None
            if kind in (b"0", b"\0", b"7"):
                name = (header[345:500].rstrip(b"\0").decode() + "/" if header[345] else "") + \
                    header[0:100].rstrip(b"\0").decode()
        except (ValueError, UnicodeDecodeError) as e:
            raise CorruptShardError(url, offset, f"no valid tar header (damaged or not a tar: {e})") from None
        data = stream.read(size)
        if len(data) < size:
            raise CorruptShardError(url, offset, f"member cut off ({len(data)} of {size} bytes)")
        pad = -size % 512
        if pad and len(stream.read(pad)) < pad:
            raise CorruptShardError(url, offset, "member padding cut off")
        offset += 512 + size + pad
        if kind == b"x":      # pax extended header: may carry a long path
            for rec in data.decode("utf-8", "replace").split("\n"):
                if " path=" in rec:
                    long_name = rec.split(" path=", 1)[1]
            continue
        if kind == b"L":      # GNU long name
            long_name = data.rstrip(b"\0").decode("utf-8", "replace")
            continue
        if name is None:
            long_name = None
            continue
        name, long_name = long_name or name, None
        yield name, data


def iter_shard(url: str):
    """Yield (key, {ext: bytes}) from one tar shard, members grouped by key (webdataset rules). On a
    damaged shard the sample being read is yielded with the members read so far, then
    CorruptShardError is raised."""
    import webdataset as wds
    with wds.gopen(url) as stream:
        key, sample = None, {}
        try:
            for name, data in _tar_members(stream, url):
                d, base = os.path.split(name)
                k, _, ext = base.partition(".")
                k = f"{d}/{k}" if d else k
                if k != key and sample:
                    yield key, sample
                    sample = {}
                key = k
                sample[ext.lower()] = data
        except CorruptShardError:
            if sample:
                yield key, sample
            raise
        if sample:
            yield key, sample
        # the end-of-archive blocks and record padding too (usually < 10 KiB): a pipe: command is not
        # cut off by SIGPIPE mid-write, and a shard's bytes are read whole, once
        while stream.read(1 << 16):
            pass
