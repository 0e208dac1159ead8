"""The WebDataset and Parquet image sources on real files: tar shards and Parquet files written
here with real PIL images, some of them broken (a truncated image, bytes that are no image, a
missing or unreadable label, a tar cut short). Good items decode to the same pixels as the source
image after the paper's preprocessing; bad items are rejects with their reason and never take
their neighbours with them; listing a tar reads its headers, not its images, and decoding reads
the members at their listed offsets; decoding a Parquet shard reads the row groups its rows fall
in, not the file.

Bytes read are counted by `countfs://`, fsspec's real local filesystem with a byte counter on each
opened file, reached through the same `storage.resolve` as s3:// (so the refs must keep their
scheme to be read back)."""

from __future__ import annotations

import io
import json
import tarfile

import pytest

RES = 32


# ------------------------------------------------------------------------------------------------
# Real files and a counting filesystem
# ------------------------------------------------------------------------------------------------

class _Counted:
    """A file object that adds what it reads to READ['bytes']; everything else passes through."""

    def __init__(self, f):
        self._f = f

    def read(self, *args):
        data = self._f.read(*args)
        READ["bytes"] += len(data)
        READ["calls"] += 1
        return data

    def readinto(self, buf):
        n = self._f.readinto(buf)
        READ["bytes"] += n or 0
        READ["calls"] += 1
        return n

    def __getattr__(self, name):
        return getattr(self._f, name)


READ = {"bytes": 0, "calls": 0}


@pytest.fixture
def countfs():
    """Register countfs:// (a local filesystem that counts the bytes read) and reset the count."""
    import fsspec
    from fsspec.implementations.local import LocalFileSystem

    class CountingFS(LocalFileSystem):
        protocol = ("countfs",)

        def _open(self, path, mode="rb", **kwargs):
            return _Counted(super()._open(path, mode, **kwargs))

    fsspec.register_implementation("countfs", CountingFS, clobber=True)
    READ.update(bytes=0, calls=0)
    return READ


def _image(rng, h, w, mode="RGB"):
    from PIL import Image
    shape = (h, w, 3) if mode == "RGB" else (h, w)
    return Image.fromarray(rng.integers(0, 255, shape, dtype="uint8"), mode=mode)


def _encoded(image, fmt: str) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt)
    return buf.getvalue()


def _expected(image):
    """What decoding must give for an in-memory PIL image (PNG is lossless): the ADM crop."""
    from pipelines.data.sources import center_crop_arr
    return center_crop_arr(image.convert("RGB"), RES)


def _add(tar, name: str, data: bytes):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _decode(kind: str, items, **source):
    from pipelines.data.sources import decode_items
    out = decode_items({"shard": [0], "keys": [[k for k, _, _ in items]],
                        "labels": [[y for _, y, _ in items]], "refs": [[r for _, _, r in items]]},
                       {"kind": kind, **source}, RES)
    return {k: (img, reason) for k, img, reason in zip(out["key"], out["image"], out["reason"])}


# ------------------------------------------------------------------------------------------------
# WebDataset
# ------------------------------------------------------------------------------------------------

def _webdataset(root, rng):
    """Two tars. a.tar: good PNG + .cls, good JPEG + .json, a truncated PNG, a PNG without a label,
    a PNG whose .cls is not a number. b.tar: two good PNGs (one grey), then a third whose data the
    file is cut inside (the tar ends early). Returns {key: PIL image} of the good PNGs and the
    JPEG's bytes."""
    root.mkdir()
    good = {f"a/{i}": _image(rng, 40 + 8 * i, 48) for i in range(2)}
    good["b/0"], good["b/1"] = _image(rng, 64, 40), _image(rng, 36, 36, "L")
    jpeg = _encoded(_image(rng, 48, 56), "JPEG")
    with tarfile.open(root / "a.tar", "w") as tar:
        for key, label in (("a/0", 0), ("a/1", 2)):
            _add(tar, f"{key}.png", _encoded(good[key], "PNG"))
            _add(tar, f"{key}.cls", f"{label}\n".encode())
        _add(tar, "a/jpg.jpg", jpeg)
        _add(tar, "a/jpg.json", json.dumps({"label": 1, "caption": "x"}).encode())
        truncated = _encoded(_image(rng, 64, 64), "PNG")
        _add(tar, "a/truncated.png", truncated[: len(truncated) // 2])
        _add(tar, "a/truncated.cls", b"1")
        _add(tar, "a/nolabel.png", _encoded(_image(rng, 32, 32), "PNG"))
        _add(tar, "a/badlabel.png", _encoded(_image(rng, 32, 32), "PNG"))
        _add(tar, "a/badlabel.cls", b"cat")
    with tarfile.open(root / "b.tar", "w") as tar:
        for key, label in (("b/0", 3), ("b/1", 0)):
            _add(tar, f"{key}.png", _encoded(good[key], "PNG"))
            _add(tar, f"{key}.cls", str(label).encode())
        _add(tar, "b/cut.cls", b"1")
        _add(tar, "b/cut.png", _encoded(_image(rng, 96, 96), "PNG"))
    data = (root / "b.tar").read_bytes()
    cut = data.index(b"b/cut.png") + 512 + 100  # the header, then 100 bytes of the image's data
    (root / "b.tar").write_bytes(data[:cut])
    return good, jpeg


def test_webdataset_good_bad_and_missing_labels(tmp_path):
    import numpy as np

    from pipelines.data.sources import SourceConfig, list_items, preprocess
    good, jpeg = _webdataset(tmp_path / "wds", np.random.default_rng(0))
    items, classes = list_items(SourceConfig(kind="webdataset", path=str(tmp_path / "wds")))
    labels = {k: y for k, y, _ in items}
    assert sorted(labels) == ["a/0", "a/1", "a/badlabel", "a/jpg", "a/nolabel", "a/truncated",
                              "b/0", "b/1", "b/cut"]
    assert [k for k, _, _ in items] == sorted(labels)
    assert (labels["a/0"], labels["a/1"], labels["a/jpg"], labels["b/0"], labels["b/1"]) == (0, 2, 1, 3, 0)
    assert classes == ["0", "1", "2", "3"]  # the rejects' labels do not add classes

    # The bad items first: none of them may take the good ones of its tar with it.
    order = ["b/cut", "a/truncated", "a/nolabel", "a/badlabel", "a/0", "a/1", "a/jpg", "b/0", "b/1"]
    by_key = {k: (k, y, r) for k, y, r in items}
    out = _decode("webdataset", [by_key[k] for k in order])
    for key, image in good.items():
        assert out[key][1] == ""
        np.testing.assert_array_equal(out[key][0], _expected(image))
    assert out["b/1"][0].shape == (RES, RES, 3)  # grey -> RGB
    assert out["a/jpg"][1] == "" and np.array_equal(out["a/jpg"][0], preprocess(jpeg, RES))
    reasons = {k: out[k][1] for k in ("a/truncated", "a/nolabel", "a/badlabel", "b/cut")}
    assert "truncated" in reasons["a/truncated"].lower()
    assert reasons["a/nolabel"].startswith("LookupError: no label")
    assert reasons["a/badlabel"].startswith("LookupError: unreadable label")
    assert reasons["b/cut"].startswith("EOFError: the tar ends inside this member (100 of")
    for key in reasons:
        assert not out[key][0].any()  # a reject is a blank image


def test_webdataset_listing_reads_headers_not_images(tmp_path, countfs):
    """Through a URI: listing reads each member's header and the label members only, and the
    refs it gives keep the scheme, so decoding reads them back through the same filesystem."""
    import numpy as np

    from pipelines.data.sources import SourceConfig, list_items
    rng = np.random.default_rng(1)
    root = tmp_path / "big"
    root.mkdir()
    images = {}
    for t in range(3):
        with tarfile.open(root / f"{t:02d}.tar", "w") as tar:
            for i in range(4):
                key = f"s{t}-{i}"
                images[key] = _image(rng, 96, 96)  # ~27 KB of noise each: data >> headers
                _add(tar, f"{key}.png", _encoded(images[key], "PNG"))
                _add(tar, f"{key}.cls", str(i).encode())
    total = sum(p.stat().st_size for p in root.iterdir())
    items, classes = list_items(SourceConfig(kind="webdataset", path=f"countfs://{root}"))
    assert len(items) == 12 and classes == ["0", "1", "2", "3"]
    assert all(ref.startswith(f"countfs://{root}/") for _, _, ref in items)
    assert items[0][2].endswith("/00.tar#s0-0.png@512+%d" % len(_encoded(images["s0-0"], "PNG")))
    # 24 members: a 512-byte header each plus one 512-byte block per label, tarfile's 1-byte
    # end-of-data checks and the end-of-archive blocks; no image data.
    assert countfs["bytes"] < 0.1 * total, (countfs["bytes"], total)
    # Decoding reads the shard's members at their listed offsets: one read for these 4 images of
    # one tar (their .cls members and headers lie between them), no header scan.
    countfs.update(bytes=0, calls=0)
    out = _decode("webdataset", items[4:8])
    for key, (image, reason) in out.items():
        assert reason == "" and np.array_equal(image, _expected(images[key]))
    members = sum(len(_encoded(images[k], "PNG")) for k, _, _ in items[4:8])
    assert countfs["calls"] == 1 and members < countfs["bytes"] < members + 4 * 1536


# ------------------------------------------------------------------------------------------------
# Parquet
# ------------------------------------------------------------------------------------------------

def _parquet(path, rng, rows: int, group: int, bad: dict | None = None, size: int = 64):
    """`rows` PNG images in row groups of `group` rows, labels row % 5; `bad` replaces rows by
    (image bytes, label). Returns {row: PIL image} of the rows left good."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    bad = bad or {}
    good, images, labels = {}, [], []
    for r in range(rows):
        if r in bad:
            image, label = bad[r]
        else:
            good[r] = _image(rng, size + r % 3 * 8, size)
            image, label = {"bytes": _encoded(good[r], "PNG"), "path": f"{r}.png"}, r % 5
        images.append(image)
        labels.append(label)
    struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table({"image": pa.array(images, struct), "label": pa.array(labels, pa.int64()),
                      "key": [f"k{r:03d}" for r in range(rows)]})
    pq.write_table(table, path, row_group_size=group)
    return good


def test_parquet_good_bad_and_missing_labels(tmp_path):
    import numpy as np

    from pipelines.data.sources import SourceConfig, list_items
    (tmp_path / "pq").mkdir()
    bad = {1: ({"bytes": b"this is not an image", "path": "x"}, 0), 4: (None, 1),
           6: ({"bytes": _encoded(_image(np.random.default_rng(9), 8, 8), "PNG"), "path": "y"}, None)}
    good = _parquet(tmp_path / "pq" / "part-0.parquet", np.random.default_rng(2), 8, 3, bad)
    items, classes = list_items(SourceConfig(kind="parquet", path=str(tmp_path / "pq")))
    assert [k for k, _, _ in items] == [f"k{r:03d}" for r in range(8)]
    assert classes == ["0", "1", "2", "3"]  # labels row % 5 of the good rows 0, 2, 3, 5, 7
    # A row index past the file's end stands first: it must not reject the rows after it.
    stray = ("k999", 0, items[0][2].rpartition("#")[0] + "#999")
    out = _decode("parquet", [stray, *items[::-1]], image_column="image")
    for r, image in good.items():
        assert out[f"k{r:03d}"][1] == ""
        np.testing.assert_array_equal(out[f"k{r:03d}"][0], _expected(image))
    assert "UnidentifiedImageError" in out["k001"][1]
    assert out["k004"][1] == "ValueError: no image (a null in column 'image')"
    assert out["k006"][1].startswith("LookupError: no label")  # a null label
    assert out["k999"][1].startswith("IndexError: row 999")


def test_parquet_shard_reads_only_its_row_groups(tmp_path, countfs):
    import numpy as np
    import pyarrow.parquet as pq

    from pipelines.data.sources import SourceConfig, list_items
    (tmp_path / "pq").mkdir()
    path = tmp_path / "pq" / "big.parquet"
    good = _parquet(path, np.random.default_rng(3), 40, 4, size=128)  # 10 groups of ~200 KB
    total, meta = path.stat().st_size, pq.ParquetFile(path).metadata
    chunk = [meta.row_group(g).column(0).total_compressed_size for g in range(10)]  # the images
    footer = 64 * 1024  # pyarrow reads the last 64 KiB at open (the footer and what precedes it)
    items, _ = list_items(SourceConfig(kind="parquet", path=f"countfs://{tmp_path / 'pq'}"))
    assert countfs["bytes"] < footer + 0.02 * total, (countfs["bytes"], total)  # no images
    for rows, groups in ((range(8, 12), [2]), (range(10, 17), [2, 3, 4])):
        countfs["bytes"] = 0
        out = _decode("parquet", [items[r] for r in rows], image_column="image")
        for r in rows:
            assert np.array_equal(out[f"k{r:03d}"][0], _expected(good[r]))
        need = sum(chunk[g] for g in groups)
        assert need <= countfs["bytes"] <= need + footer + 4096, (rows, countfs["bytes"], need)
    assert sum(chunk) > 0.9 * total and countfs["bytes"] < 0.4 * total  # 3 groups of 10
