"""Odd and broken image files for fault-injection tests (a helper module, not a test file).

Each `write_*` function writes one input at `path` (parents created) and returns the path. The
readable ones take a `size` (width, height); tests compare it with the loaded size. Nothing here
allocates a large image: the decompression bomb is a hand-built PNG header.

`READABLE` / `UNREADABLE` map a file name to its writer, for building a whole hostile folder;
`deny_read` and `run_with_timeout` are the two injections that need more than a file.
"""

from __future__ import annotations

import builtins
import io
import os
import struct
import threading
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

EXIF_ORIENTATION = 0x0112  # EXIF tag; value 6 = "rotate 90 degrees clockwise to display"
BOMB_SIDE = 20000  # 4e8 pixels > 2 x Image.MAX_IMAGE_PIXELS (default 89,478,485)


def _target(path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def noise_rgb(size: tuple[int, int], seed: int = 0) -> Image.Image:
    """A random RGB image (noise: its JPEG is several KB, so half of it still has a full header)."""
    w, h = size
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def write_good(path: Path, size: tuple[int, int] = (32, 32), seed: int = 0) -> Path:
    """A plain RGB image in the format of the file name's extension."""
    noise_rgb(size, seed).save(_target(path))
    return Path(path)


# ----------------------------------------------------------------------------- unreadable


def write_zero_byte(path: Path) -> Path:
    """An empty file named like an image."""
    _target(path).write_bytes(b"")
    return Path(path)


def write_truncated_jpeg(path: Path, size: tuple[int, int] = (48, 48)) -> Path:
    """The first half of a valid JPEG's bytes (the header parses, the body ends early)."""
    buf = io.BytesIO()
    noise_rgb(size).save(buf, "JPEG", quality=90)
    data = buf.getvalue()
    _target(path).write_bytes(data[: len(data) // 2])
    return Path(path)


def write_text_as_jpeg(path: Path) -> Path:
    """A text file named .jpg."""
    _target(path).write_text("this is not an image\n" * 4)
    return Path(path)


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def bomb_png_bytes(side: int = BOMB_SIDE) -> bytes:
    """A tiny valid-looking PNG whose IHDR claims side x side 1-bit greyscale pixels (CRCs correct);
    its one IDAT holds a single row, so nothing of that size is ever written or allocated."""
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)  # width, height, depth 1, grey, -, -, no interlace
    idat = zlib.compress(b"\x00" * (1 + (side + 7) // 8))
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat)
            + _png_chunk(b"IEND", b""))


def write_bomb_png(path: Path, side: int = BOMB_SIDE) -> Path:
    """A decompression bomb: PIL refuses it at Image.open (DecompressionBombError)."""
    _target(path).write_bytes(bomb_png_bytes(side))
    return Path(path)


# ----------------------------------------------------------------------------- readable but odd


def write_palette_png(path: Path, size: tuple[int, int] = (24, 16)) -> Path:
    """Mode P: 4 palette colours in vertical stripes, colour 0 marked transparent."""
    w, h = size
    img = Image.fromarray((np.arange(w)[None, :].repeat(h, 0) * 4 // w).astype(np.uint8), "P")
    img.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255, 255, 255, 0])
    img.save(_target(path), transparency=0)
    return Path(path)


def write_rgba_png(path: Path, size: tuple[int, int] = (20, 28), colour=(10, 200, 30)) -> Path:
    """Mode RGBA, fully transparent: the colour under the alpha is what an RGB loader sees."""
    Image.new("RGBA", size, (*colour, 0)).save(_target(path))
    return Path(path)


def write_la_png(path: Path, size: tuple[int, int] = (17, 33), grey: int = 77) -> Path:
    """Mode LA (greyscale + alpha), half transparent."""
    Image.new("LA", size, (grey, 128)).save(_target(path))
    return Path(path)


def gradient16(size: tuple[int, int] = (64, 16)) -> np.ndarray:
    """uint16 [h, w]: a horizontal 16-bit ramp over the full range (v8 * 257 + small offsets)."""
    w, h = size
    ramp = np.linspace(0, 255, w).round().astype(np.uint16) * 257
    return ramp[None, :].repeat(h, 0)


def write_png16(path: Path, size: tuple[int, int] = (64, 16)) -> Path:
    """A 16-bit greyscale PNG (PIL opens it as mode I;16) holding gradient16(size)."""
    Image.fromarray(gradient16(size)).save(_target(path))
    return Path(path)


def write_cmyk_jpeg(path: Path, size: tuple[int, int] = (30, 18), cmyk=(0, 255, 255, 0)) -> Path:
    """A CMYK JPEG (default colour: red)."""
    Image.new("CMYK", size, cmyk).save(_target(path), "JPEG", quality=95)
    return Path(path)


def write_exif_rotated_jpeg(path: Path, size: tuple[int, int] = (40, 16)) -> Path:
    """A JPEG stored `size` with EXIF orientation 6 (a viewer shows it rotated, size swapped)."""
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6
    noise_rgb(size, seed=6).save(_target(path), "JPEG", exif=exif.tobytes())
    return Path(path)


def write_tiny(path: Path, size: tuple[int, int] = (1, 1)) -> Path:
    """An image far smaller than any crop (1x1, 3x7, ...)."""
    noise_rgb(size, seed=size[0] * 100 + size[1]).save(_target(path))
    return Path(path)


# ----------------------------------------------------------------------------- sets and injections

# name -> (writer, stored size (width, height)); every one loads as RGB of that size
READABLE: dict[str, tuple[Callable[[Path], Path], tuple[int, int]]] = {
    "palette.png": (write_palette_png, (24, 16)),
    "rgba.png": (write_rgba_png, (20, 28)),
    "la.png": (write_la_png, (17, 33)),
    "grey16.png": (write_png16, (64, 16)),
    "cmyk.jpg": (write_cmyk_jpeg, (30, 18)),
    "exif6.jpg": (write_exif_rotated_jpeg, (40, 16)),
    "tiny1x1.png": (write_tiny, (1, 1)),
    "tiny3x7.jpg": (lambda p: write_tiny(p, (3, 7)), (3, 7)),
}

# name -> writer; every one fails to load (the two that need an injection are written readable)
UNREADABLE: dict[str, Callable[[Path], Path]] = {
    "zero.jpg": write_zero_byte,
    "truncated.jpg": write_truncated_jpeg,
    "text.jpg": write_text_as_jpeg,
    "bomb.png": write_bomb_png,
    "noperm.png": write_good,  # + deny_read
    "deleted.png": write_good,  # + unlinked after indexing
}


def deny_read(path: Path, monkeypatch) -> None:
    """Make opening `path` fail with PermissionError: chmod 000, and where that does not block
    reads (root), patch `builtins.open` and `io.open` (pathlib's) to refuse that one path."""
    path = Path(path)
    os.chmod(path, 0)
    if not os.access(path, os.R_OK):
        return
    target = os.path.realpath(path)

    def guarded(real):
        def open_(file, *args, **kwargs):
            if isinstance(file, (str, bytes, os.PathLike)) and os.path.realpath(os.fsdecode(file)) == target:
                raise PermissionError(13, "Permission denied", os.fsdecode(file))
            return real(file, *args, **kwargs)
        return open_

    monkeypatch.setattr(builtins, "open", guarded(builtins.open))
    monkeypatch.setattr(io, "open", guarded(io.open))


def make_fifo(path: Path) -> Path:
    """A named pipe at `path` (opening it for reading blocks until a writer comes)."""
    os.mkfifo(_target(path))
    return Path(path)


def make_symlink_loops(folder: Path) -> list[Path]:
    """Two loops under `folder`: folder/self -> . and folder/sub/up -> .. ; returns the links."""
    (folder / "sub").mkdir(parents=True, exist_ok=True)
    links = [folder / "self", folder / "sub" / "up"]
    links[0].symlink_to(".", target_is_directory=True)
    links[1].symlink_to("..", target_is_directory=True)
    return links


def run_with_timeout(fn: Callable[[], object], seconds: float, fifo: Path | None = None):
    """fn() in a daemon thread; AssertionError when it has not returned after `seconds`. When it
    hangs and `fifo` is given, a non-blocking writer is opened on it to release a blocked reader."""
    result: dict = {}

    def target():
        try:
            result["value"] = fn()
        except BaseException as e:  # re-raised in the caller
            result["error"] = e

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        if fifo is not None:
            try:
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:
                pass
        raise AssertionError(f"still running after {seconds} s (blocked on a FIFO?)")
    if "error" in result:
        raise result["error"]
    return result.get("value")


def write_hostile_tree(root: Path, plain: int = 4) -> dict[str, str]:
    """An ImageFolder tree with every input; returns {relative path: kind} of the files it indexes.

    root/odd/<k>a_<name> for each READABLE then UNREADABLE name, each followed in ImageFolder
    order by a good image root/odd/<k>b_good.png (so no two unreadable images are adjacent and
    each skip moves exactly one id on), root/plain/<i>.png: `plain` good images (last in order,
    so no skip wraps around), plus what the scan must leave out: a FIFO root/odd/x.jpg and the
    symlink loops root/plain/self -> . and root/plain/sub/up -> .. . Kinds: "good", "readable"
    or "unreadable"; "noperm.png" and "deleted.png" still need deny_read / unlinking.
    """
    root = Path(root)
    kinds: dict[str, str] = {}
    odd = [(name, writer, "readable") for name, (writer, _) in READABLE.items()]
    odd += [(name, writer, "unreadable") for name, writer in UNREADABLE.items()]
    for k, (name, writer, kind) in enumerate(odd):
        writer(root / "odd" / f"{k:02d}a_{name}")
        kinds[f"odd/{k:02d}a_{name}"] = kind
        write_good(root / "odd" / f"{k:02d}b_good.png", (16, 16), seed=k)
        kinds[f"odd/{k:02d}b_good.png"] = "good"
    make_fifo(root / "odd" / "x.jpg")
    for i in range(plain):
        write_good(root / "plain" / f"{i}.png", (24, 24), seed=100 + i)
        kinds[f"plain/{i}.png"] = "good"
    make_symlink_loops(root / "plain")
    return kinds


def find(kinds: dict[str, str], name: str) -> str:
    """The relative path in write_hostile_tree's map whose file name ends with `name`."""
    return next(rel for rel in kinds if rel.endswith("a_" + name))
