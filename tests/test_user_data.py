"""Users' own data read from disk on demand (elbox.data.user and its readers): image folders, .npy/.npz arrays of
images or vectors, CSV and Parquet tables; and every kind of bad input refused with one short, clear ElboxError.
All data are written by the tests."""

from __future__ import annotations

import io
import pickle
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from torch.utils.data import DataLoader

import elbox.data.formats as formats
from elbox.core import system
from elbox.core.errors import ElboxError
from elbox.data import ImageArray, ImageFolder, Table, VectorArray, open_source

RNG = np.random.default_rng(0)


def refused(call, *fragments: str) -> str:
    """Run `call`; it must raise one ElboxError whose message is one short line containing every fragment."""
    with pytest.raises(ElboxError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message and len(message) < 400, message
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    return message


def pixels(*shape: int) -> np.ndarray:
    return RNG.integers(0, 256, shape, dtype=np.uint8)


def save(array: np.ndarray, path: Path, **options) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, **options)
    return path


def png16(path: Path, color: bool) -> Path:
    """A 16-bit PNG (48-bit when `color`), written chunk by chunk: Pillow cannot save 48-bit PNGs."""
    h, w, c = 3, 4, 3 if color else 1
    rows = np.zeros((h, w * c), ">u2")
    raw = b"".join(b"\x00" + row.tobytes() for row in rows)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", w, h, 16, 2 if color else 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
    )
    return path


# ---------------------------------------------------------------------------
# Image folders


def test_folder_is_read_recursively_in_order_of_relative_path(tmp_path):
    images = {"b.png": pixels(6, 5, 3), "a/z.png": pixels(6, 5, 3), "a/b/c.png": pixels(6, 5, 3)}
    for name, image in images.items():
        save(image, tmp_path / name)
    (tmp_path / "notes.txt").write_text("not an image")
    save(pixels(6, 5, 3), tmp_path / ".hidden.png")
    save(pixels(9, 9, 3), tmp_path / ".cache" / "x.png")
    folder = ImageFolder(tmp_path)
    assert folder.names == ["a/b/c.png", "a/z.png", "b.png"] and len(folder) == 3
    assert folder.shape == (3, 6, 5) and folder.kind == "images"
    for i, name in enumerate(folder.names):
        item = folder[i]
        assert item.dtype == torch.uint8 and item.shape == (3, 6, 5)
        assert torch.equal(item, torch.from_numpy(images[name]).permute(2, 0, 1))
    assert torch.equal(folder[-1], folder[2])
    with pytest.raises(IndexError):
        folder[3]
    batch = next(iter(DataLoader(folder, batch_size=2)))
    assert batch.shape == (2, 3, 6, 5) and batch.dtype == torch.uint8


def test_grayscale_rgba_palette_and_mixed_channels(tmp_path):
    gray = pixels(4, 4)
    save(gray, tmp_path / "gray" / "g.png")
    save(gray > 128, tmp_path / "gray" / "one_bit.png")  # mode "1": 0 or 255
    gray_palette = Image.fromarray(pixels(4, 4)).convert("P")  # a palette of grays
    gray_palette.save(tmp_path / "gray" / "p.png")
    folder = ImageFolder(tmp_path / "gray")
    assert folder.shape == (1, 4, 4)
    assert torch.equal(folder[folder.names.index("g.png")][0], torch.from_numpy(gray))
    assert set(folder[folder.names.index("one_bit.png")].unique().tolist()) <= {0, 255}

    rgba = pixels(4, 4, 4)
    save(rgba, tmp_path / "rgba" / "a.png")
    assert torch.equal(ImageFolder(tmp_path / "rgba")[0], torch.from_numpy(rgba[..., :3]).permute(2, 0, 1))

    color = pixels(4, 4, 3)
    (tmp_path / "pal").mkdir()
    Image.fromarray(color).convert("P", palette=Image.Palette.ADAPTIVE, colors=16).save(tmp_path / "pal" / "c.png")
    assert ImageFolder(tmp_path / "pal").shape == (3, 4, 4)

    save(gray, tmp_path / "mixed" / "1.png")
    save(color, tmp_path / "mixed" / "2.png")
    mixed = ImageFolder(tmp_path / "mixed")
    assert mixed.shape == (3, 4, 4)
    assert all(torch.equal(mixed[0][c], torch.from_numpy(gray)) for c in range(3))  # grayscale repeated


def test_every_common_format_decodes(tmp_path):
    ramp = np.arange(16) * 8
    image = np.stack([np.add.outer(ramp, ramp), np.add.outer(ramp, ramp[::-1]), np.full((16, 16), 90)], axis=-1).astype(
        np.uint8
    )  # smooth: JPEG keeps it close
    exact = {"a.png": {}, "b.bmp": {}, "c.tif": {}, "d.webp": {"lossless": True}, "e.ppm": {}}
    for name, options in exact.items():
        save(image, tmp_path / name, **options)
    save(image, tmp_path / "f.jpg", quality=95)
    Image.fromarray(image).convert("CMYK").save(tmp_path / "g.jpeg", quality=95)
    save(image[..., 0], tmp_path / "h.gif")
    folder = ImageFolder(tmp_path)
    assert folder.shape == (3, 16, 16) and len(folder) == 8
    expected = torch.from_numpy(image).permute(2, 0, 1)
    for name in exact:
        assert torch.equal(folder[folder.names.index(name)], expected), name
    for name in ("f.jpg", "g.jpeg"):
        assert (folder[folder.names.index(name)].float() - expected.float()).abs().mean() < 4, name
    assert torch.equal(folder[folder.names.index("h.gif")][1], torch.from_numpy(image[..., 0]))


def test_resize_and_center_crop(tmp_path):
    wide = np.zeros((20, 40), np.uint8)
    wide[:, 6:34] = 200  # the central 20x20 square and the 4 pixels either side that the filter reaches
    save(wide, tmp_path / "wide.png")
    tall = np.zeros((40, 20), np.uint8)
    tall[6:34] = 200
    save(tall, tmp_path / "tall.png")
    save(np.full((10, 10), 200, np.uint8), tmp_path / "small.png")
    folder = ImageFolder(tmp_path, image_size=10)
    assert folder.shape == (1, 10, 10)
    for i in range(3):
        assert (folder[i] == 200).all(), folder.names[i]
    square = np.zeros((20, 20), np.uint8)
    square[3:17] = 100  # the central 10x20 band (aspect 1:2) and what the filter reaches
    save(square, tmp_path / "rect" / "s.png")
    rect = ImageFolder(tmp_path / "rect", image_size=(5, 10))
    assert rect.shape == (1, 5, 10) and (rect[0] == 100).all()
    assert ImageFolder(tmp_path / "rect", image_size=(20, 20))[0].numpy()[0].tolist() == square.tolist()


def test_bad_image_folders(tmp_path):
    refused(lambda: ImageFolder(tmp_path / "nowhere"), "does not exist")
    (tmp_path / "empty").mkdir()
    refused(lambda: ImageFolder(tmp_path / "empty"), "empty", "no image files")
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "a.txt").write_text("x")
    refused(lambda: open_source(tmp_path / "text"), "text", "no image files")

    save(pixels(28, 28), tmp_path / "mixed" / "a.png")
    save(pixels(10, 12), tmp_path / "mixed" / "sub" / "b.png")
    refused(lambda: ImageFolder(tmp_path / "mixed"), "a.png is 28x28", "sub/b.png is 10x12", "image size")
    assert ImageFolder(tmp_path / "mixed", image_size=8).shape == (1, 8, 8)

    bad = tmp_path / "corrupt"
    save(pixels(5, 5), bad / "good.png")
    (bad / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    refused(lambda: ImageFolder(bad), "broken.png", "not a readable PNG")
    (bad / "broken.png").unlink()
    (bad / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg at all")
    refused(lambda: open_source(bad), "broken.jpg", "not a readable JPEG")

    cut = tmp_path / "cut"
    data = io.BytesIO()
    Image.fromarray(pixels(64, 64, 3)).save(data, format="PNG")
    cut.mkdir()
    (cut / "half.png").write_bytes(data.getvalue()[: len(data.getvalue()) // 2])  # header intact, pixels cut
    folder = ImageFolder(cut)  # opening reads headers only
    refused(lambda: folder[0], "half.png", "not a readable PNG")

    (tmp_path / "deep").mkdir()
    png16(tmp_path / "deep" / "gray16.png", color=False)
    refused(lambda: ImageFolder(tmp_path / "deep"), "gray16.png", "16-bit")
    (tmp_path / "deep" / "gray16.png").unlink()
    png16(tmp_path / "deep" / "rgb48.png", color=True)
    refused(lambda: ImageFolder(tmp_path / "deep"), "rgb48.png", "16-bit")

    save(pixels(4, 4), tmp_path / "ok" / "a.png")
    for size in (0, -3, (4,), (4, 0), "8", 2.5, True):
        refused(lambda size=size: ImageFolder(tmp_path / "ok", image_size=size), "image size")


# ---------------------------------------------------------------------------
# Arrays of images and of vectors


def test_npy_images_are_memory_mapped_in_every_layout(tmp_path):
    x = pixels(7, 5, 6)
    np.save(tmp_path / "hw.npy", x)
    np.save(tmp_path / "chw.npy", np.repeat(x[:, None], 3, axis=1))
    np.save(tmp_path / "hwc.npy", np.repeat(x[..., None], 3, axis=-1).astype(np.float32) / 255)
    np.save(tmp_path / "fortran.npy", np.asfortranarray(x))
    for name, channels in (("hw", 1), ("chw", 3), ("hwc", 3), ("fortran", 1)):
        images = ImageArray(tmp_path / f"{name}.npy")
        assert isinstance(images.array, np.memmap), name
        assert images.shape == (channels, 5, 6) and len(images) == 7 and images.kind == "images"
        for i in (0, 6):
            item = images[i]
            assert item.dtype == torch.uint8 and item.shape == (channels, 5, 6) and item.is_contiguous()
            assert all(torch.equal(item[c], torch.from_numpy(x[i])) for c in range(channels)), name
        batch = images.__getitems__([6, 0, -1])  # how a DataLoader asks: one read for the batch
        assert all(torch.equal(got, images[i]) for got, i in zip(batch, (6, 0, 6), strict=True)), name
        loaded = torch.cat(list(DataLoader(images, batch_size=3)))
        assert loaded.shape == (7, channels, 5, 6) and torch.equal(loaded[4], images[4])
        with pytest.raises(IndexError):
            images.__getitems__([7])
    copy = pickle.loads(pickle.dumps(images))  # as DataLoader workers get it: the map is reopened, not copied
    assert len(pickle.dumps(images)) < 1000 and isinstance(copy.array, np.memmap)
    assert torch.equal(copy[3], images[3])
    np.save(tmp_path / "bool.npy", x > 128)
    assert set(ImageArray(tmp_path / "bool.npy")[0].unique().tolist()) <= {0, 255}  # True is white, as 1.0 is


def test_npz_members_stored_are_mapped_compressed_are_read(tmp_path):
    x, y = pixels(4, 3, 3), RNG.normal(size=(4, 2))
    np.savez(tmp_path / "plain.npz", images=x, other=y)
    np.savez_compressed(tmp_path / "packed.npz", x=x)
    mapped = ImageArray(tmp_path / "plain.npz")
    assert isinstance(mapped.array, np.memmap) and torch.equal(mapped[2][0], torch.from_numpy(x[2]))
    packed = ImageArray(tmp_path / "packed.npz")
    assert not isinstance(packed.array, np.memmap) and torch.equal(packed[2][0], torch.from_numpy(x[2]))
    vectors = VectorArray(tmp_path / "plain.npz", key="other")
    assert isinstance(vectors.array, np.memmap) and torch.equal(vectors[1], torch.from_numpy(y[1]))
    refused(lambda: ImageArray(tmp_path / "plain.npz", key="nope"), "no array named 'nope'", "images", "other")
    np.savez(tmp_path / "two.npz", a=x, b=x)
    refused(lambda: ImageArray(tmp_path / "two.npz"), "['a', 'b']", "key")


def test_headers_declaring_more_than_the_file_holds_are_refused_before_allocation(tmp_path, monkeypatch):
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "|u1", "fortran_order": False, "shape": (10**6, 1000, 1000)})
    (tmp_path / "tera.npy").write_bytes(header.getvalue() + bytes(100))
    refused(lambda: ImageArray(tmp_path / "tera.npy"), "truncated", "(1000000, 1000, 1000)", "1 TB")
    with zipfile.ZipFile(tmp_path / "tera.npz", "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("x.npy", header.getvalue() + bytes(100))
    refused(lambda: open_source(tmp_path / "tera.npz"), "truncated", "1 TB")
    np.savez_compressed(tmp_path / "big.npz", x=pixels(50, 10, 10))
    monkeypatch.setattr(system, "available_memory_bytes", lambda device: 1000)
    refused(lambda: ImageArray(tmp_path / "big.npz"), "compressed", "5 KB", "1 KB")
    np.save(tmp_path / "small.npy", pixels(2, 3, 3))
    (tmp_path / "cut.npy").write_bytes((tmp_path / "small.npy").read_bytes()[:-5])
    refused(lambda: ImageArray(tmp_path / "cut.npy"), "truncated")


def test_bad_image_arrays(tmp_path, monkeypatch):
    monkeypatch.setattr(formats, "CHUNK_ELEMENTS", 16)  # many chunks: the index named must count across them

    def write(name, array):
        np.save(tmp_path / name, array)
        return tmp_path / name

    x = RNG.integers(0, 256, (6, 4, 4)).astype(np.float32) / 255
    nan = x.copy()
    nan[4, 1, 2] = np.nan
    refused(lambda: ImageArray(write("nan.npy", nan)), "nan.npy", "index (4, 1, 2)", "NaN or infinite")
    inf = x.copy()
    inf[5, 3, 0] = -np.inf
    refused(lambda: ImageArray(write("inf.npy", inf)), "index (5, 3, 0)", "NaN or infinite")
    refused(lambda: ImageArray(write("above.npy", x * 2 + 0.01)), "[0, 1]")
    refused(lambda: ImageArray(write("grid.npy", x + 0.001)), "index (0, 0, 0)", "grid")
    ints = (x * 255).astype(np.int16)
    ints[3, 2, 1] = 256
    refused(lambda: ImageArray(write("int.npy", ints)), "index (3, 2, 1)", "0..255")
    refused(lambda: ImageArray(write("neg.npy", -ints)), "0..255")
    refused(lambda: ImageArray(write("rank1.npy", np.zeros(5))), "rank 1")
    refused(lambda: ImageArray(write("rank5.npy", np.zeros((2, 1, 2, 2, 2)))), "rank 5")
    refused(lambda: ImageArray(write("rank2.npy", np.zeros((3, 4)))), "rank 2", "vectors")
    refused(lambda: ImageArray(write("channels.npy", np.zeros((2, 5, 4, 4), np.uint8))), "1 or 3 channels")
    refused(lambda: ImageArray(write("empty.npy", np.zeros((0, 4, 4), np.uint8))), "empty")
    refused(lambda: ImageArray(write("text.npy", np.array([["a"]]))), "dtype")
    refused(lambda: ImageArray(write("complex.npy", np.zeros((2, 3, 3), complex))), "dtype")
    np.save(tmp_path / "objects.npy", np.array([[None]] * 2, dtype=object), allow_pickle=True)
    refused(lambda: ImageArray(tmp_path / "objects.npy"), "pickled objects are never loaded")
    (tmp_path / "raw.npy").write_bytes(pickle.dumps([1, 2]))
    refused(lambda: ImageArray(tmp_path / "raw.npy"), "raw.npy", "not a plain numeric array")
    (tmp_path / "bad.npz").write_bytes(b"PK\x03\x04 not a zip")
    refused(lambda: ImageArray(tmp_path / "bad.npz"), "bad.npz", "corrupt")


def test_vector_arrays(tmp_path, monkeypatch):
    monkeypatch.setattr(formats, "CHUNK_ELEMENTS", 8)
    v = RNG.normal(size=(10, 3))
    np.save(tmp_path / "v.npy", v)
    vectors = VectorArray(tmp_path / "v.npy")
    assert isinstance(vectors.array, np.memmap) and vectors.shape == (3,) and vectors.kind == "vectors"
    assert vectors[7].dtype == torch.float64 and torch.equal(vectors[7], torch.from_numpy(v[7]))  # as stored
    assert torch.equal(torch.stack(vectors.__getitems__([7, 2])), torch.stack([vectors[7], vectors[2]]))
    np.save(tmp_path / "ints.npy", np.arange(6).reshape(3, 2))
    assert VectorArray(tmp_path / "ints.npy")[2].tolist() == [4.0, 5.0]
    bad = v.copy()
    bad[8, 2] = np.nan
    np.save(tmp_path / "nan.npy", bad)
    refused(lambda: VectorArray(tmp_path / "nan.npy"), "nan.npy", "row 8, column 2", "NaN or infinite")
    bad[8, 2], bad[9, 0] = 0, 1e300
    np.save(tmp_path / "huge.npy", bad)
    refused(lambda: VectorArray(tmp_path / "huge.npy"), "row 9, column 0", "float32")
    np.save(tmp_path / "images.npy", np.zeros((2, 3, 3)))
    refused(lambda: VectorArray(tmp_path / "images.npy"), "rank 3", "(N, D)")
    np.save(tmp_path / "empty.npy", np.zeros((4, 0)))
    refused(lambda: VectorArray(tmp_path / "empty.npy"), "empty")


# ---------------------------------------------------------------------------
# Tables


def test_csv_and_parquet_tables(tmp_path):
    (tmp_path / "t.csv").write_text("a,name,b,c\n1,x,2.5,-3\n4,y,5e-1,6\n7,z,8,9\n")
    refused(lambda: Table(tmp_path / "t.csv"), "non-numeric", "'name' (string, e.g. 'x')")
    table = Table(tmp_path / "t.csv", columns=["c", "a"])
    assert table.names == table.columns == ["c", "a"] and table.shape == (2,) and len(table) == 3
    assert table.kind == "vectors" and table[1].dtype == torch.float64 and table[1].tolist() == [6.0, 4.0]
    refused(lambda: Table(tmp_path / "t.csv", columns=["a", "d"]), "no column 'd'", "'a', 'name', 'b', 'c'")
    (tmp_path / "t.tsv").write_text("a\tb\n1\t2\n3\t4\n")
    assert Table(tmp_path / "t.tsv")[1].tolist() == [3.0, 4.0]
    frame = pa.table({"u": pa.array([1, 2, 3], pa.int32()), "v": [0.5, 1.5, 2.5], "w": ["p", "q", "r"]})
    pq.write_table(frame, tmp_path / "t.parquet")
    parquet = open_source(tmp_path / "t.parquet", columns=["v", "u"])
    assert isinstance(parquet, Table) and parquet[2].tolist() == [2.5, 3.0]
    refused(lambda: Table(tmp_path / "t.parquet"), "non-numeric", "'w' (string)")
    batch = next(iter(DataLoader(parquet, batch_size=3)))
    assert batch.shape == (3, 2) and batch.dtype == torch.float64 and batch[2].tolist() == [2.5, 3.0]


def test_bad_tables(tmp_path):
    def csv(name, text):
        (tmp_path / name).write_text(text)
        return tmp_path / name

    refused(lambda: Table(csv("empty_cell.csv", "a,b\n1,2\n3,\n")), "empty cell", "row 1, column 'b'")
    refused(lambda: Table(csv("na.csv", "a,b\n1,2\n3,4\nNaN,5\n")), "row 2, column 'a'")
    refused(lambda: Table(csv("inf.csv", "a,b\n1,2\n3,inf\n")), "NaN or infinite", "row 1, column 'b'")
    refused(lambda: Table(csv("big.csv", "a\n1e300\n")), "float32", "row 0, column 'a'")
    refused(lambda: Table(csv("ragged.csv", "a,b\n1,2\n3\n")), "ragged.csv", "not a readable CSV")
    refused(lambda: Table(csv("header.csv", "a,b\n")), "no rows")
    refused(lambda: Table(csv("blank.csv", "")), "not a readable CSV")
    refused(lambda: Table(csv("all_empty.csv", "a,b\n1,\n2,\n")), "non-numeric", "'b' (null, all cells empty)")
    refused(lambda: Table(csv("twice.csv", "a,a\n1,2\n"), columns=["a"]), "not unique")
    refused(lambda: Table(tmp_path / "twice.csv", columns=[]), "non-empty list")
    wide = ",".join(f"column_{i}" for i in range(10_000))
    refused(
        lambda: Table(csv("wide.csv", wide + "\n" + ",".join("1" * 10_000) + "\n"), columns=["zz"]), "no column 'zz'"
    )
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really parquet")
    refused(lambda: Table(tmp_path / "bad.parquet"), "bad.parquet", "not a readable Parquet")
    pq.write_table(pa.table({"a": pa.array([1.0, None, 3.0])}), tmp_path / "null.parquet")
    refused(lambda: Table(tmp_path / "null.parquet"), "row 1, column 'a'")
    refused(lambda: Table(tmp_path / "missing.csv"), "does not exist")


# ---------------------------------------------------------------------------
# open_source: the reader by what the path is


def test_open_source_picks_the_reader(tmp_path):
    save(pixels(4, 4), tmp_path / "folder" / "a.png")
    np.save(tmp_path / "images.npy", pixels(3, 4, 4, 3))
    np.save(tmp_path / "vectors.npy", RNG.normal(size=(3, 5)))
    (tmp_path / "table.csv").write_text("a,b\n1,2\n")
    picked = {name: type(open_source(tmp_path / name)) for name in ("folder", "images.npy", "vectors.npy", "table.csv")}
    assert picked == {"folder": ImageFolder, "images.npy": ImageArray, "vectors.npy": VectorArray, "table.csv": Table}
    assert open_source(tmp_path / "images.npy", image_size=(4, 4)).shape == (3, 4, 4)
    assert open_source(tmp_path / "folder", image_size=2).shape == (1, 2, 2)

    refused(lambda: open_source(tmp_path / "nothing"), "nothing", "does not exist")
    (tmp_path / "notes.txt").write_text("x")
    refused(lambda: open_source(tmp_path / "notes.txt"), "unsupported file type .txt")
    assert open_source(tmp_path / "folder" / "a.png").shape == (1, 4, 4)  # one image file is a dataset of one
    np.save(tmp_path / "rank1.npy", np.zeros(4))
    refused(lambda: open_source(tmp_path / "rank1.npy"), "rank 1")
    refused(lambda: open_source(tmp_path / "images.npy", image_size=8), "4x4", "resize")
    refused(lambda: open_source(tmp_path / "vectors.npy", image_size=8), "vectors")
    refused(lambda: open_source(tmp_path / "table.csv", image_size=8), "table")
    refused(lambda: open_source(tmp_path / "folder", columns=["a"]), "columns")
    refused(lambda: open_source(tmp_path / "vectors.npy", columns=["a"]), "columns")


# ---------------------------------------------------------------------------
# Broken bytes of every kind: the clear error or a dataset, never another exception


def _valid_files() -> list[tuple[str, bytes]]:
    files = []
    for suffix, write in (
        (".npy", lambda f: np.save(f, pixels(2, 3, 3))),
        (".npz", lambda f: np.savez(f, x=pixels(2, 3, 3))),
        (".npz", lambda f: np.savez_compressed(f, x=RNG.normal(size=(3, 2)))),
        (".png", lambda f: Image.fromarray(pixels(3, 3, 3)).save(f, format="PNG")),
        (".jpg", lambda f: Image.fromarray(pixels(8, 8)).save(f, format="JPEG")),
        (".parquet", lambda f: pq.write_table(pa.table({"a": [1.0, 2.0]}), f)),
    ):
        buffer = io.BytesIO()
        write(buffer)
        files.append((suffix, buffer.getvalue()))
    return files + [(".csv", b"a,b\n1,2\n3,4\n")]


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.sampled_from(_valid_files()), st.integers(0, 10**6), st.integers(0, 255), st.booleans())
def test_broken_files_give_the_clear_error_or_a_dataset(tmp_path, file, where, byte, truncate):
    suffix, data = file
    i = where % len(data)
    data = data[:i] if truncate else data[:i] + bytes([byte]) + data[i + 1 :]
    folder = tmp_path / "folder"
    folder.mkdir(exist_ok=True)
    path = folder / f"a{suffix}" if suffix in (".png", ".jpg") else tmp_path / f"a{suffix}"
    path.write_bytes(data)
    try:
        dataset = open_source(folder if suffix in (".png", ".jpg") else path)
        for j in range(len(dataset)):
            assert dataset[j].shape == dataset.shape
    except ElboxError as e:
        assert "\n" not in str(e)
