"""Files of an image dataset: finding images, decoding them and their labels, reading class lists.

Every decoding failure becomes a ``BadSampleError`` naming the file, and every missing folder a
``DynavitError`` naming the path, so all layouts fail the same way.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
from PIL import Image

from dynavit.errors import BadSampleError, DynavitError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp"})
SYNSET_FILES = ("synset_words.txt", "LOC_synset_mapping.txt")


def file_sha1(path: Path) -> str:
    """Content hash of a file: tells whether two folders share an image, whatever its name."""
    return hashlib.sha1(Path(path).read_bytes()).hexdigest()


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".") and path.is_file()


def list_images(folder: Path, *, recursive: bool = False, stem_suffix: str = "") -> list[Path]:
    """Image files in ``folder`` (optionally below it) whose stem ends with ``stem_suffix``, sorted."""
    if not folder.is_dir():
        return []
    found = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(p for p in found if p.stem.endswith(stem_suffix) and is_image_file(p))


def has_images(folder: Path, *, recursive: bool = False, stem_suffix: str = "") -> bool:
    """Cheap existence check (stops at the first hit) used by layout detection."""
    if not folder.is_dir():
        return False
    found = folder.rglob("*") if recursive else folder.iterdir()
    return any(p.stem.endswith(stem_suffix) and is_image_file(p) for p in found)


def require_dir(path: Path, what: str) -> Path:
    """``path`` when it is a folder; else one DynavitError saying what is wrong with it."""
    if not path.exists():
        raise DynavitError(f"{what} {path} does not exist")
    if not path.is_dir():
        raise DynavitError(f"{what} {path} is not a folder")
    return path


def read_image(path: Path) -> Image.Image:
    """Decode fully (``load``) so corrupt or truncated files fail here, not later in a worker."""
    try:
        with Image.open(path) as img:
            img.load()
            return img.convert("RGB")
    # PIL's format plugins surface malformed data as many exception types (OSError,
    # SyntaxError, ValueError, struct.error, ...), so anything raised while decoding is the file's fault.
    except Exception as exc:
        raise BadSampleError(path, f"not a readable image ({type(exc).__name__}: {exc})") from exc


def read_label(path: Path) -> np.ndarray:
    """A single-channel label image as an integer array (palette PNGs give their indices)."""
    try:
        with Image.open(path) as img:
            img.load()
            mode = img.mode
            arr = np.array(img) if mode in ("L", "P", "I", "I;16", "1") else None
    except Exception as exc:
        raise BadSampleError(path, f"not a readable label image ({type(exc).__name__}: {exc})") from exc
    if arr is None:
        raise BadSampleError(path, f"label images must be single-channel class indices, got mode {mode}")
    return arr


def read_synset_file(path: Path) -> tuple[list[str], list[str]]:
    """Parse ``wnid name[, synonyms]`` lines; line k is class k. Returns (wnids, first names)."""
    wnids: list[str] = []
    names: list[str] = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        wnid, _, rest = line.strip().partition(" ")
        if not wnid or wnid in wnids:
            raise DynavitError(f"{path}:{lineno}: expected 'wnid name, synonyms' with a unique wnid")
        wnids.append(wnid)
        names.append(rest.split(",")[0].strip() or wnid)
    if not wnids:
        raise DynavitError(f"{path} lists no classes (expected lines 'wnid name, synonyms')")
    return wnids, names


def find_synset_file(folder: Path) -> Path | None:
    """The class list of an ImageNet-style folder, under any of its usual names."""
    return next((folder / n for n in SYNSET_FILES if (folder / n).is_file()), None)


def subfolders(root: Path) -> list[Path]:
    """Visible subfolders of ``root``, sorted (class folders, cities)."""
    return (
        sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
        if root.is_dir()
        else []
    )
