"""The sharded image sources of pipelines/data/sources.py, WebDataset tars and Parquet files:
what listing reads of a tar, and how a shard's bytes are read back (a tar's members at their
listed offsets, a Parquet file's row groups that hold the shard's rows).

Both kinds yield, per wanted item, its bytes or the exception reading that one item raised, so
one bad item never rejects its neighbours (sources._read_raw). No torch, no Ray; pyarrow and
tarfile are imported where files are read, as in sources.py.
"""

from __future__ import annotations

import json
import sys

from pipelines.core import storage

# The image files a source takes (compared lower-case): WebDataset members, evaluation folders.
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm")
# Labels that listing cannot give: the image becomes a reject when it is decoded.
NO_LABEL, BAD_LABEL = -1, -2
TAR_GAP, TAR_RUN = 1 << 20, 64 << 20  # decoding: members this close share one read, up to this size


def list_tar(fs, path: str, prefix: str) -> list[tuple[str, int, str]]:
    """One tar's (key, label, ref) per image member. Keys are grouped within the tar (a key in
    two tars is two images: list_items then refuses the duplicate key)."""
    import tarfile
    groups: dict[str, dict] = {}
    # "r:", not "r:*": probing for compression would read 16 KiB of every tar.
    with fs.open_input_file(path) as raw, tarfile.open(fileobj=raw, mode="r:") as tar:
        try:
            for member in tar:  # tarfile seeks past each member's data: only headers are read
                if not member.isfile():
                    continue
                base = member.name.rsplit("/", 1)[-1]
                key, _, ext = base.partition(".")
                group = groups.setdefault(member.name[: len(member.name) - len(base)] + key, {})
                if ext.lower() in IMAGE_EXTS:
                    # where its bytes are: decoding reads them without scanning the tar again
                    group["ref"] = f"{prefix}{path}#{member.name}@{member.offset_data}+{member.size}"
                elif ext in ("cls", "json"):
                    group["label"] = _tar_label(tar, member, ext)
        except tarfile.ReadError as e:  # cut short: what is listed stays, the rest is gone
            print(f"flowar: WebDataset shard {prefix}{path}: {e} after {len(groups)} keys; "
                  "the images listed before are kept", file=sys.stderr)
    return [(key, g.get("label", NO_LABEL), g["ref"]) for key, g in groups.items() if "ref" in g]


def _tar_label(tar, member, ext: str) -> int:
    """A .cls member's integer, or a .json member's "label"; BAD_LABEL when it is neither."""
    try:
        text = tar.extractfile(member).read().decode()
        label = json.loads(text)["label"] if ext == "json" else text.strip()
        if isinstance(label, bool):
            return BAD_LABEL
        label = int(label)
    except (ValueError, KeyError, TypeError, UnicodeDecodeError, OSError):
        return BAD_LABEL
    return label if label >= 0 else BAD_LABEL


def guarded(fn, *args):
    """fn(*args), or the exception it raised (an unreadable item is a reject, never a dead job)."""
    try:
        return fn(*args)
    except Exception as e:
        return e


def parquet_items(file: str, wanted, cfg):
    """The image of each wanted row, reading only the row groups those rows fall in (a
    1,000-image shard of a file of many row groups reads its own one or two)."""
    import bisect

    import pyarrow.parquet as pq
    fs, path = storage.resolve(file)
    with fs.open_input_file(path) as f:
        pf = pq.ParquetFile(f)
        starts = [0]
        for g in range(pf.metadata.num_row_groups):
            starts.append(starts[-1] + pf.metadata.row_group(g).num_rows)
        rows = {}
        for i, part in wanted:
            row = guarded(int, part)
            if isinstance(row, int) and not 0 <= row < starts[-1]:
                row = IndexError(f"row {row} is not in {file} ({starts[-1]} rows)")
            if isinstance(row, Exception):
                yield i, row
            else:
                rows[i] = row
        groups = sorted({bisect.bisect_right(starts, r) - 1 for r in rows.values()})
        column = pf.read_row_groups(groups, columns=[cfg["image_column"]]).column(0)
        offset, base = 0, {}
        for g in groups:  # where each group's rows begin in the table read
            base[g], offset = offset, offset + starts[g + 1] - starts[g]
        for i, r in rows.items():
            g = bisect.bisect_right(starts, r) - 1
            value = column[base[g] + r - starts[g]].as_py()
            value = value["bytes"] if isinstance(value, dict) else value
            yield i, value if value is not None else ValueError(
                f"no image (a null in column {cfg['image_column']!r})")


def tar_items(file: str, wanted, cfg):
    """The wanted members of one tar (refs `<tar>#<member>@<offset>+<size>`, as listed), read at
    their offsets: members less than TAR_GAP apart in one read of at most TAR_RUN bytes (a shard's
    images usually sit together in one tar: a handful of reads, not a header scan per member)."""
    fs, path = storage.resolve(file)
    spans = []
    for i, part in wanted:
        span = guarded(_member_span, part)
        if isinstance(span, Exception):
            yield i, span
        else:
            spans.append((*span, i))
    spans.sort()
    with fs.open_input_file(path) as f:
        run: list = []
        for span in spans + [None]:
            if run and (span is None or span[0] - (run[-1][0] + run[-1][1]) > TAR_GAP
                        or span[0] + span[1] - run[0][0] > TAR_RUN):
                yield from _read_run(f, run)
                run = []
            if span is not None:
                run.append(span)


def _member_span(part: str) -> tuple[int, int]:
    """'<member>@<offset>+<size>' -> (offset, size)."""
    name, _, where = part.rpartition("@")
    offset, _, size = where.partition("+")
    if not name or not offset.isdigit() or not size.isdigit():
        raise ValueError(f"member ref {part!r} is not <member>@<offset>+<size>")
    return int(offset), int(size)


def _read_run(f, run: list):
    """One read of the bytes from the first member's offset to the last one's end; each member's
    slice, or an error for a member the file ends inside."""
    start = run[0][0]
    data = f.read_at(run[-1][0] + run[-1][1] - start, start)
    for offset, size, i in run:
        got = data[offset - start: offset - start + size]
        yield i, got if len(got) == size else EOFError(
            f"the tar ends inside this member ({len(got)} of {size} bytes)")
