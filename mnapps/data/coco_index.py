"""The compact annotation index of a COCO-format file: numpy arrays, built once, cached beside the JSON.

This module owns the step from an annotation JSON to the arrays every detection dataset reads:
:func:`load_coco_json` parses and structurally validates the file (the clear errors for bad
input live here), :meth:`CocoIndex.from_coco_dict` turns it into a handful of flat numpy
arrays (image ids, file names as one UTF-8 blob with offsets, sizes, per-image annotation
offsets, ``bbox`` as the file's float64 ``[x, y, w, h]``, category ids, crowd flags), and
:func:`load_coco_index` keeps those arrays in a cache file so that only the first run pays for
the JSON parse. The arrays hold no Python object per image or per annotation, so a forked
DataLoader worker that reads them never writes to the pages it shares with its parent (the
copy-on-read growth that torch.utils.data's documentation warns of comes from reference counts
of per-image dicts),
and COCO 2017 train (118k images, 860k boxes) fits in about 45 MB instead of gigabytes.

The cache is ``<json name>.mnapps-index.npz`` next to the JSON, or, when that folder is not
writable, a file named after the JSON's absolute path under
``mnapps.data.cache.default_cache_dir()/coco-index``. It is valid while the JSON keeps its
size, modification time (ns) and the BLAKE2b digest of its first and last MiB, and loads with
``np.load(allow_pickle=False)``. A stale, foreign or damaged cache is rebuilt; a cache that
cannot be written anywhere costs a warning, never the run.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import os
import tempfile
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from mnapps.data.cache import default_cache_dir
from mnapps.files import file_mode

__all__ = [
    "CocoIndex",
    "blob_string",
    "load_coco_json",
    "load_coco_index",
    "index_cache_paths",
    "json_stamp",
    "INDEX_VERSION",
    "CACHE_SUFFIX",
]

#: Bumped whenever the arrays, their meaning or the validation change; older cache files are then
#: rebuilt (2: stricter ids, iscrowd and area checks, which a cache made before must not bypass).
INDEX_VERSION = 2
CACHE_SUFFIX = ".mnapps-index.npz"
_STAMP_BYTES = 1 << 20  # the digest covers this much at each end of the JSON

_ARRAYS = ("image_ids", "file_names", "file_name_offsets", "widths", "heights", "ann_offsets", "bboxes",
           "category_ids", "iscrowd", "cat_ids", "cat_names", "cat_name_offsets")


# ------------------------------------------------------------------------------------------
# the JSON file


def _missing_file_error(ann_file: Path) -> FileNotFoundError:
    return FileNotFoundError(
        f"COCO annotation file {ann_file} not found; pass the path of a COCO-format JSON "
        "(e.g. annotations/instances_val2017.json) or leave the data options out to use the "
        "embedded synthetic dataset"
    )


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    # json.load of a large file creates millions of containers, each allocation burst
    # triggering collections that walk all of them again (about half of the parse time of
    # COCO train); parsed JSON holds no reference cycles, so nothing is lost by waiting.
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def load_coco_json(ann_file: str | Path) -> dict[str, Any]:
    """Read and structurally validate a COCO-format annotation file.

    Args:
        ann_file: path to the JSON file (``images``, ``categories`` and optionally
            ``annotations`` lists, as COCO's ``instances_*.json``).

    Returns:
        The parsed dict, with ``annotations`` set to ``[]`` when the file has none
        (COCO's ``image_info_test*.json``).

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: not JSON, or a required field is missing / malformed / refers to an unknown
            image or category (ids must be integers, not bools or strings; ``iscrowd`` 0/1 or a
            bool; ``area`` a number; annotation ids unique); the message names the file, the
            entry, the field and the fix.
    """
    ann_file = Path(ann_file)
    if not ann_file.is_file():
        raise _missing_file_error(ann_file)
    try:
        with ann_file.open("rb") as f, _gc_paused():
            data = json.load(f)
    except json.JSONDecodeError as err:
        raise ValueError(
            f"{ann_file} is not valid JSON ({err.msg} at line {err.lineno} column {err.colno}); "
            "the file is probably truncated or not an annotation file: re-download or re-export it"
        ) from err
    except UnicodeDecodeError as err:
        raise ValueError(f"{ann_file} is not a UTF-8 JSON file ({err}); pass the COCO annotation JSON") from err
    _validate_coco_dict(data, ann_file)
    return data


def _fail(ann_file: Path, where: str, problem: str, fix: str) -> ValueError:
    return ValueError(f"{ann_file}: {where} {problem}; {fix}")


def _validate_coco_dict(data: Any, ann_file: Path) -> None:
    """Check the fields mnapps and pycocotools rely on; raise ValueError naming the first problem."""
    if not isinstance(data, dict):
        raise _fail(ann_file, "the top level", f"is a {type(data).__name__}, not an object",
                    "a COCO file is an object with 'images', 'annotations' and 'categories' lists")
    for key in ("images", "categories"):
        if not isinstance(data.get(key), list):
            raise _fail(ann_file, f"field {key!r}", "is missing or not a list",
                        "a COCO detection file needs 'images' and 'categories' lists")
    annotations = data.setdefault("annotations", [])
    if not isinstance(annotations, list):
        raise _fail(ann_file, "field 'annotations'", "is not a list", "export the annotations as a list")
    if not data["categories"]:
        raise _fail(ann_file, "field 'categories'", "is empty", "list at least one category {id, name}")

    image_ids: set[int] = set()
    for i, img in enumerate(data["images"]):
        if not isinstance(img, dict) or not _is_int(img.get("id")) or not isinstance(img.get("file_name"), str):
            raise _fail(ann_file, f"images[{i}]", "lacks an integer 'id' or a string 'file_name'",
                        "every image entry needs both")
        if img["id"] in image_ids:
            raise _fail(ann_file, f"images[{i}]", f"repeats image id {img['id']}", "image ids must be unique")
        for key in ("width", "height"):
            if key in img and not (_is_number(img[key]) and img[key] > 0):
                raise _fail(ann_file, f"images[{i}] (id {img['id']})", f"has {key}={img[key]!r}",
                            "width/height must be positive pixel counts (or be left out)")
        image_ids.add(img["id"])

    cat_ids: set[int] = set()
    for i, cat in enumerate(data["categories"]):
        if not isinstance(cat, dict) or not _is_int(cat.get("id")) or not isinstance(cat.get("name"), str):
            raise _fail(ann_file, f"categories[{i}]", "lacks an integer 'id' or a string 'name'",
                        "every category entry needs both")
        if cat["id"] in cat_ids:
            raise _fail(ann_file, f"categories[{i}]", f"repeats category id {cat['id']}", "category ids must be unique")
        cat_ids.add(cat["id"])

    ann_ids: set[int] = set()
    for i, ann in enumerate(annotations):
        if not isinstance(ann, dict) or not _is_int(ann.get("id")):
            raise _fail(ann_file, f"annotations[{i}]", "lacks an integer 'id'",
                        "pycocotools indexes annotations by id; give each a unique integer id")
        where = f"annotations[{i}] (id {ann['id']})"
        if ann["id"] in ann_ids:
            raise _fail(ann_file, where, "repeats its id", "annotation ids must be unique")
        ann_ids.add(ann["id"])
        _check_annotation_fields(ann, ann_file, where, image_ids, cat_ids)


def _check_annotation_fields(ann: dict, ann_file: Path, where: str, image_ids: set[int], cat_ids: set[int]) -> None:
    """Types and references of one annotation: what pycocotools would silently misread."""
    for key, known, what in (("image_id", image_ids, "images"), ("category_id", cat_ids, "categories")):
        value = ann.get(key)
        if not _is_int(value):
            # true == 1 and "3" != 3 in Python: a bool or a string id would silently name another entry.
            raise _fail(ann_file, where, f"has {key}={value!r} ({type(value).__name__})",
                        f"{key} is an integer id of an entry of '{what}'")
        if value not in known:
            extra = f" (ids {sorted(known)})" if key == "category_id" else ""
            raise _fail(ann_file, where, f"refers to {key} {value!r}, which is not in '{what}'{extra}",
                        "fix the export or remove the annotation" if key == "image_id"
                        else "fix the export or add the category")
    bbox = ann.get("bbox")
    if not (isinstance(bbox, (list, tuple)) and len(bbox) == 4 and all(_is_number(v) for v in bbox)):
        raise _fail(ann_file, where, f"has bbox={bbox!r}",
                    "a COCO bbox is [x, y, width, height] in pixels (4 numbers)")
    crowd = ann.get("iscrowd", 0)
    # pycocotools tests iscrowd for truth: the string "0" would make a normal box a crowd region.
    if not (type(crowd) in (int, bool) and crowd in (0, 1)):
        raise _fail(ann_file, where, f"has iscrowd={crowd!r} ({type(crowd).__name__})",
                    "iscrowd is 0, 1, true or false (without quotes)")
    if "area" in ann and not _is_number(ann["area"]):
        raise _fail(ann_file, where, f"has area={ann['area']!r} ({type(ann['area']).__name__})",
                    "area is a number of pixels (or leave it out: it is then the box's width x height)")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# ------------------------------------------------------------------------------------------
# the index


def _string_blob(strings: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """UTF-8 bytes of all strings back to back, and the ``len + 1`` offsets that cut them apart."""
    encoded = [s.encode("utf-8", "surrogatepass") for s in strings]
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    np.cumsum([len(e) for e in encoded], out=offsets[1:])
    return np.frombuffer(b"".join(encoded), dtype=np.uint8).copy(), offsets


def blob_string(blob: np.ndarray, offsets: np.ndarray, i: int) -> str:
    """String ``i`` of a UTF-8 blob cut by ``offsets`` (the layout of :class:`CocoIndex` names)."""
    return blob[offsets[i] : offsets[i + 1]].tobytes().decode("utf-8", "surrogatepass")


@dataclass(frozen=True, eq=False)
class CocoIndex:
    """The annotations of one COCO file as flat arrays (``I`` images, ``A`` annotations, ``C`` categories).

    Attributes:
        image_ids: ``int64[I]``, in the file's order.
        file_names, file_name_offsets: ``uint8`` UTF-8 blob and ``int64[I + 1]``; image ``i``'s
            name is ``file_names[off[i]:off[i + 1]]`` (see :meth:`file_name`).
        widths, heights: ``float64[I]``, NaN where the file gives none.
        ann_offsets: ``int64[I + 1]``; image ``i``'s annotations are rows
            ``ann_offsets[i]:ann_offsets[i + 1]`` of the annotation arrays, in file order (the
            order of pycocotools' ``imgToAnns``).
        bboxes: ``float64[A, 4]``, the file's ``[x, y, width, height]`` exactly (the doubles
            JSON gives, so that clipping decisions match a per-dict reading bit for bit).
        category_ids: ``int64[A]``; iscrowd: ``bool[A]`` (``iscrowd`` truthy).
        cat_ids: ``int64[C]`` in file order; cat_names, cat_name_offsets: their names as a blob.
    """

    image_ids: np.ndarray
    file_names: np.ndarray
    file_name_offsets: np.ndarray
    widths: np.ndarray
    heights: np.ndarray
    ann_offsets: np.ndarray
    bboxes: np.ndarray
    category_ids: np.ndarray
    iscrowd: np.ndarray
    cat_ids: np.ndarray
    cat_names: np.ndarray
    cat_name_offsets: np.ndarray

    @property
    def num_images(self) -> int:
        return len(self.image_ids)

    @property
    def num_annotations(self) -> int:
        return len(self.category_ids)

    def file_name(self, position: int) -> str:
        """``file_name`` of the image at ``position`` (file order)."""
        return blob_string(self.file_names, self.file_name_offsets, position)

    def category_names(self) -> dict[int, str]:
        """``{category id: name}``."""
        return {int(c): blob_string(self.cat_names, self.cat_name_offsets, i) for i, c in enumerate(self.cat_ids)}

    def nbytes(self) -> int:
        """Memory held by the arrays."""
        return sum(getattr(self, name).nbytes for name in _ARRAYS)

    @classmethod
    def from_coco_dict(cls, data: dict[str, Any], ann_file: str | Path = "<dict>") -> "CocoIndex":
        """Build the index of an already validated COCO dict (see :func:`load_coco_json`).

        Raises:
            ValueError: an id does not fit in 64 bits (the message names ``ann_file``).
        """
        images, annotations, categories = data["images"], data.get("annotations") or [], data["categories"]
        try:
            image_ids = np.fromiter((img["id"] for img in images), dtype=np.int64, count=len(images))
            category_ids = np.fromiter((a["category_id"] for a in annotations), dtype=np.int64,
                                       count=len(annotations))
            cat_ids = np.fromiter((c["id"] for c in categories), dtype=np.int64, count=len(categories))
        except OverflowError as err:
            raise ValueError(f"{ann_file}: an image or category id does not fit in 64 bits ({err}); "
                             "renumber the ids") from err
        file_names, file_name_offsets = _string_blob([img["file_name"] for img in images])
        widths = np.fromiter((img.get("width", np.nan) for img in images), dtype=np.float64, count=len(images))
        heights = np.fromiter((img.get("height", np.nan) for img in images), dtype=np.float64, count=len(images))

        position = {image_id: i for i, image_id in enumerate(image_ids.tolist())}
        ann_image = np.fromiter((position[a["image_id"]] for a in annotations), dtype=np.int64,
                                count=len(annotations))
        bboxes = np.array([a["bbox"] for a in annotations], dtype=np.float64).reshape(-1, 4)
        iscrowd = np.fromiter((bool(a.get("iscrowd", 0)) for a in annotations), dtype=bool, count=len(annotations))
        # Group annotations by image, keeping file order within an image (a stable sort).
        order = np.argsort(ann_image, kind="stable")
        ann_offsets = np.zeros(len(images) + 1, dtype=np.int64)
        np.cumsum(np.bincount(ann_image, minlength=len(images)), out=ann_offsets[1:])
        cat_names, cat_name_offsets = _string_blob([c["name"] for c in categories])
        return cls(
            image_ids=image_ids,
            file_names=file_names,
            file_name_offsets=file_name_offsets,
            widths=widths,
            heights=heights,
            ann_offsets=ann_offsets,
            bboxes=np.ascontiguousarray(bboxes[order]),
            category_ids=category_ids[order],
            iscrowd=iscrowd[order],
            cat_ids=cat_ids,
            cat_names=cat_names,
            cat_name_offsets=cat_name_offsets,
        )

    # ------------------------------------------------------------------------- cache file
    def save(self, path: Path, stamp: dict[str, Any]) -> None:
        """Write the arrays and the JSON's ``stamp`` to ``path`` atomically (temp file + rename)."""
        arrays = {name: getattr(self, name) for name in _ARRAYS}
        arrays.update(_stamp_arrays(stamp))
        arrays["version"] = np.array(INDEX_VERSION, dtype=np.int64)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, **arrays)
            os.chmod(tmp, file_mode())  # mkstemp makes it private; other users may read the same dataset
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    @classmethod
    def load(cls, path: Path, stamp: dict[str, Any]) -> "CocoIndex | None":
        """The index cached in ``path`` if it was made from a JSON with this ``stamp``, else None.

        Any unreadable, foreign or older-version file counts as a miss.
        """
        try:
            with np.load(path, allow_pickle=False) as z:
                if int(z["version"]) != INDEX_VERSION:
                    return None
                wanted = _stamp_arrays(stamp)
                if any(not np.array_equal(z[key], value) for key, value in wanted.items()):
                    return None
                index = cls(**{name: z[name] for name in _ARRAYS})
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
            return None
        return index if index._consistent() else None

    def _consistent(self) -> bool:
        images, annotations = len(self.image_ids), len(self.category_ids)
        return (
            len(self.file_name_offsets) == images + 1
            and self.widths.shape == self.heights.shape == (images,)
            and len(self.ann_offsets) == images + 1
            and int(self.ann_offsets[-1]) == annotations
            and self.bboxes.shape == (annotations, 4)
            and self.iscrowd.shape == (annotations,)
            and len(self.cat_name_offsets) == len(self.cat_ids) + 1
        )


# ------------------------------------------------------------------------------------------
# the cache


def json_stamp(ann_file: Path) -> dict[str, Any]:
    """What identifies one version of the JSON: size, mtime (ns) and a digest of both ends."""
    st = ann_file.stat()
    digest = hashlib.blake2b(digest_size=16)
    with ann_file.open("rb") as f:
        digest.update(f.read(_STAMP_BYTES))
        if st.st_size > _STAMP_BYTES:
            f.seek(max(_STAMP_BYTES, st.st_size - _STAMP_BYTES))
            digest.update(f.read(_STAMP_BYTES))
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "digest": digest.hexdigest()}


def _stamp_arrays(stamp: dict[str, Any]) -> dict[str, np.ndarray]:
    return {
        "stamp_size": np.array(stamp["size"], dtype=np.int64),
        "stamp_mtime_ns": np.array(stamp["mtime_ns"], dtype=np.int64),
        "stamp_digest": np.frombuffer(bytes.fromhex(stamp["digest"]), dtype=np.uint8),
    }


def index_cache_paths(ann_file: str | Path) -> list[Path]:
    """Where the index of ``ann_file`` is cached, in the order tried: beside it, then the user cache."""
    ann_file = Path(ann_file)
    absolute = ann_file.resolve()
    key = hashlib.blake2b(str(absolute).encode("utf-8", "surrogatepass"), digest_size=8).hexdigest()
    return [
        absolute.with_name(absolute.name + CACHE_SUFFIX),
        default_cache_dir() / "coco-index" / f"{absolute.name}-{key}{CACHE_SUFFIX}",
    ]


def load_coco_index(ann_file: str | Path, *, use_cache: bool = True) -> CocoIndex:
    """The :class:`CocoIndex` of ``ann_file``, from its cache when valid, else parsed (and cached).

    Args:
        ann_file: COCO-format annotation JSON.
        use_cache: read and write the cache file (see the module docstring); False always parses.

    Returns:
        The index. The first call on a file parses and validates it (:func:`load_coco_json`,
        every error it raises) and writes the cache; later calls only read the cache.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is not a valid COCO annotation file.
    """
    ann_file = Path(ann_file)
    if not ann_file.is_file():
        raise _missing_file_error(ann_file)
    if not use_cache:
        return _parse(ann_file)
    stamp = json_stamp(ann_file)
    paths = index_cache_paths(ann_file)
    for path in paths:
        if path.is_file():
            index = CocoIndex.load(path, stamp)
            if index is not None:
                return index
    index = _parse(ann_file)
    errors = []
    for path in paths:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            if not _writable_folder(path.parent):
                raise PermissionError(f"{path.parent} is read-only")
            index.save(path, stamp)
            break
        except OSError as err:
            errors.append(f"{path.parent}: {err}")
    else:
        warnings.warn(f"cannot cache the annotation index of {ann_file} ({'; '.join(errors)}); the JSON will be "
                      "parsed again next time (set MNAPPS_CACHE to a writable folder)", RuntimeWarning, stacklevel=2)
    return index


def _writable_folder(folder: Path) -> bool:
    """Writable, and not marked read-only: root may write anywhere, but a dataset folder whose
    permission bits forbid writing (a shared, read-only copy of COCO) is left untouched."""
    return os.access(folder, os.W_OK) and bool(folder.stat().st_mode & 0o222)


def _parse(ann_file: Path) -> CocoIndex:
    data = load_coco_json(ann_file)
    with _gc_paused():
        index = CocoIndex.from_coco_dict(data, ann_file)
        del data
    return index
