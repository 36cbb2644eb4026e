"""Pretrained weights by name: the one table of files mnapps knows, the cache, download and lookup.

:data:`WEIGHTS` lists every pretrained file mnapps can start from, each with its official
address, license, size and SHA-256 where upstream publishes one or the file is known here. A
known NAME works anywhere a weights path is accepted (``--weights``, ``--weights-backbone``,
``--checkpoint``, ``--teacher-weights``, ``model.backbone.weights``, ``teacher.weights``):
:func:`resolve_weights` is the one function that turns it into the imported checkpoint in the
cache, ``$MNAPPS_CACHE/weights`` (default ``~/.cache/mnapps/weights``).

:func:`get_weights` fills the cache: it downloads the official files (urllib, with a progress
bar), checks size and hash, hands them to the importer of the entry's kind (the caller passes
the importers, which live with the tasks) and moves the checkpoint into place. Everything
happens in a staging folder inside the cache, so a refused hash, a broken connection or a
failed import leaves nothing behind. ``source=`` does the same from a local copy (machines
without internet). Only the standard library is imported here: ``mnapps --help`` and argument
parsing stay fast; the modules only a download needs (urllib, http.client, tarfile, tqdm: half a
second on a busy machine) are imported by the functions that use them.
"""

from __future__ import annotations

import argparse
import difflib
import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

__all__ = [
    "WEIGHTS",
    "WeightFile",
    "Weights",
    "WeightsError",
    "weights_cache_dir",
    "checkpoint_path",
    "resolve_weights",
    "get_weights",
    "download",
    "sha256_of",
    "weights_arg",
]

Kind = Literal["classifier", "ssd", "face_teacher"]
CHUNK = 1 << 20


class WeightsError(ValueError):
    """Weights could not be had: unknown name, not in the cache, download or hash failure."""


@dataclass(frozen=True)
class WeightFile:
    """One file to download: its cache name, official address, and what it must be."""

    name: str
    url: str
    sha256: str | None  # None: upstream publishes none and no copy is known here
    size: int | None  # bytes; None where not known exactly


@dataclass(frozen=True)
class Weights:
    """One pretrained model: where it comes from and what mnapps makes of it."""

    name: str
    title: str
    kind: Kind
    files: tuple[WeightFile, ...]
    license: str
    source: str  # the project page that publishes it
    approx_size: str
    note: str  # what the official form is, and what --from accepts


_FACENET_RELEASE = "https://github.com/timesler/facenet-pytorch/releases/download/v2.2.9/"
_FACEAPI_NPM = "https://cdn.jsdelivr.net/npm/@vladmandic/face-api@1.7.15/model/"

WEIGHTS: dict[str, Weights] = {
    w.name: w
    for w in (
        Weights(
            name="mobilenet_v1_1.0_224_imagenet",
            title="MobileNetV1 1.0/224, ImageNet (Google, TF-slim release 2018_08_02)",
            kind="classifier",
            files=(WeightFile(
                "mobilenet_v1_1.0_224.tgz",
                "http://download.tensorflow.org/models/mobilenet_v1_2018_08_02/mobilenet_v1_1.0_224.tgz",
                None, None),),
            license="Apache-2.0",
            source="https://github.com/tensorflow/models/blob/master/research/slim/nets/mobilenet_v1.md",
            approx_size="17 MB of weights; the archive adds frozen-graph and TFLite copies",
            note="Upstream publishes no checksum. The archive holds the TF checkpoint "
            "mobilenet_v1_1.0_224.ckpt.{index,data-*}, which mnapps reads without TensorFlow. "
            "--from takes the .tgz, the extracted folder or .ckpt prefix, or an .npz of the same "
            "tensors under their TF-slim names (name -> array).",
        ),
        Weights(
            name="faceapi_ssd_mobilenetv1",
            title="SSD-MobileNetV1 face detector (face-api.js, @vladmandic/face-api 1.7.15, WIDER FACE)",
            kind="ssd",
            files=(
                WeightFile("ssd_mobilenetv1_model-weights_manifest.json",
                           _FACEAPI_NPM + "ssd_mobilenetv1_model-weights_manifest.json",
                           "888f744dffbc84f5f060d1f8427d9742341943a2dfaaf9205d10029b7e7a2955", 28233),
                WeightFile("ssd_mobilenetv1_model.bin", _FACEAPI_NPM + "ssd_mobilenetv1_model.bin",
                           "2835640602d53718aa6ae9a42896327eaa21beefed056c218d32ca7d79e1e2f8", 5616957),
            ),
            license="MIT",
            source="https://github.com/vladmandic/face-api",
            approx_size="5.6 MB",
            note="TensorFlow.js weights (manifest + one .bin, uint8-quantised). Hashes are those of "
            "the npm package 1.7.15. --from takes the folder holding both files.",
        ),
        Weights(
            name="facenet_casia_webface",
            title="FaceNet InceptionResnetV1 20180408-102900, CASIA-WebFace (facenet-pytorch port)",
            kind="face_teacher",
            files=(WeightFile("20180408-102900-casia-webface.pt",
                              _FACENET_RELEASE + "20180408-102900-casia-webface.pt", None, None),),
            license="MIT (davidsandberg/facenet, timesler/facenet-pytorch); CASIA-WebFace's own terms "
            "(research use) apply to the data it was trained on",
            source="https://github.com/timesler/facenet-pytorch",
            approx_size="111 MB",
            note="Upstream publishes no checksum. The release file also holds the 10575-way "
            "classifier, which mnapps drops (a teacher needs the 512-d features only). --from takes "
            "that file or a features-only InceptionResnetV1 state dict (94 MB).",
        ),
        Weights(
            name="facenet_vggface2",
            title="FaceNet InceptionResnetV1 20180402-114759, VGGFace2 (facenet-pytorch port)",
            kind="face_teacher",
            files=(WeightFile("20180402-114759-vggface2.pt",
                              _FACENET_RELEASE + "20180402-114759-vggface2.pt", None, None),),
            license="MIT (davidsandberg/facenet, timesler/facenet-pytorch); VGGFace2's own terms "
            "(research use) apply to the data it was trained on",
            source="https://github.com/timesler/facenet-pytorch",
            approx_size="107 MB",
            note="Upstream publishes no checksum. The release file also holds the 8631-way classifier, which "
            "mnapps drops. --from takes that file or a features-only state dict.",
        ),
    )
}  # fmt: skip


def weights_cache_dir() -> Path:
    """``$MNAPPS_CACHE/weights``, default ``~/.cache/mnapps/weights`` (beside the generated datasets)."""
    root = os.environ.get("MNAPPS_CACHE")
    return (Path(root).expanduser() if root else Path.home() / ".cache" / "mnapps") / "weights"


def checkpoint_path(name: str) -> Path:
    """Where the imported checkpoint of weights ``name`` lives (whether or not it is there yet)."""
    return weights_cache_dir() / f"{name}.pt"


def _unknown_name(name: str) -> WeightsError:
    close = difflib.get_close_matches(name, list(WEIGHTS), n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    return WeightsError(f"unknown weights name {name!r}: {hint}known names: {', '.join(WEIGHTS)} (mnapps weights list)")


def spec_of(name: str) -> Weights:
    """The :data:`WEIGHTS` entry ``name``; an unknown name is a WeightsError suggesting close ones."""
    if name not in WEIGHTS:
        raise _unknown_name(name)
    return WEIGHTS[name]


def resolve_weights(value: str | os.PathLike | None) -> Path | None:
    """A weights argument as a path: a known NAME becomes its cached checkpoint; a path stays.

    Raises:
        WeightsError: ``value`` is a known name not yet in the cache (the message says how to get
            it), or it is no existing file and looks like a misspelt name (no folder, no suffix).
    """
    if value is None:
        return None
    text = str(value)
    if text in WEIGHTS:
        path = checkpoint_path(text)
        if not path.is_file():
            raise WeightsError(
                f"weights {text!r} are not in the cache ({path}): run `mnapps weights get {text}` "
                f"(or `mnapps weights get {text} --from FILE` with a copy you downloaded elsewhere)"
            )
        return path
    path = Path(value)
    looks_like_name = os.sep not in text and "/" not in text and not path.suffix
    if looks_like_name and not path.exists() and difflib.get_close_matches(text, list(WEIGHTS), n=1, cutoff=0.6):
        raise _unknown_name(text)
    return path


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _progress_bar(total: int | None, label: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=label, unit="B", unit_scale=True, unit_divisor=1024, disable=not enabled,
                dynamic_ncols=True)  # fmt: skip


def download(url: str, dest: Path, *, name: str, progress: bool = True, timeout: float = 30.0) -> str:
    """Stream ``url`` into ``dest`` with a progress bar; return its SHA-256.

    Raises:
        WeightsError: no connection (the message names ``--from``), an HTTP error, or a
            transfer that stopped before the announced length.
    """
    import http.client
    import urllib.error
    import urllib.request

    offline = (f"on a machine without internet, download it elsewhere and run "
               f"`mnapps weights get {name} --from FILE`")  # fmt: skip
    try:
        response = urllib.request.urlopen(url, timeout=timeout)
    except urllib.error.HTTPError as exc:
        raise WeightsError(f"cannot download {name} from {url}: HTTP {exc.code} {exc.reason}; {offline}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise WeightsError(f"cannot download {name} from {url} (no network? {reason}); {offline}") from None
    digest, received = hashlib.sha256(), 0
    length = response.headers.get("Content-Length")
    total = int(length) if length and length.isdigit() else None
    with response, open(dest, "wb") as handle, _progress_bar(total, dest.name, progress) as bar:
        try:
            for chunk in iter(lambda: response.read(CHUNK), b""):
                handle.write(chunk)
                digest.update(chunk)
                received += len(chunk)
                bar.update(len(chunk))
        except (http.client.IncompleteRead, OSError) as exc:
            raise WeightsError(f"download of {url} broke off after {received} bytes ({exc}); run it again") from None
    if total is not None and received != total:
        raise WeightsError(f"download of {url} stopped after {received} of {total} bytes; run it again")
    return digest.hexdigest()


def _check_file(path: Path, file: WeightFile, sha256: str | None, actual: str | None = None) -> str:
    """Refuse a file whose size or hash is not the expected one; return its hash."""
    actual = actual or sha256_of(path)
    size = path.stat().st_size
    if file.size is not None and size != file.size and sha256 == file.sha256:
        raise WeightsError(f"{path.name}: {size} bytes, expected {file.size}; the file is not the published one")
    if sha256 is not None and actual != sha256.lower():
        raise WeightsError(f"{path.name}: SHA-256 {actual} does not match the expected {sha256}; refused (the "
                           f"file is damaged or not the published one)")  # fmt: skip
    return actual


def _unpack(archive: Path, into: Path) -> Path:
    """Extract a .tgz safely and return what the importer reads: a TF checkpoint prefix or an .npz."""
    import tarfile

    into.mkdir()
    with tarfile.open(archive) as tar:
        tar.extractall(into, filter="data")  # no absolute paths, links out of the folder or devices
    for index in sorted(into.rglob("*.ckpt.index")):
        return index.with_suffix("")
    for npz in sorted(into.rglob("*.npz")):
        return npz
    raise WeightsError(f"{archive.name} holds neither a TF checkpoint (*.ckpt.index) nor an .npz")


def _local_source(spec: Weights, source: Path, sha256: str | None) -> tuple[Path, list[str]]:
    """Check a ``--from`` copy where it is the official file (hash known); return what to import."""
    if not source.exists() and not Path(str(source) + ".index").exists():
        raise FileNotFoundError(f"--from {source} does not exist")
    notes = []
    folder = source if source.is_dir() else None
    for file in spec.files:
        candidate = folder / file.name if folder else source
        if candidate.is_file() and candidate.name == file.name:
            expected = sha256 if sha256 is not None else file.sha256
            digest = _check_file(candidate, file, expected)
            notes.append(f"{file.name} sha256 {digest}" + (" (matches)" if expected else " (no published hash)"))
    return source, notes


def get_weights(
    name: str,
    importers: dict[str, Callable[[Path, Path], str]],
    *,
    source: Path | None = None,
    mirror: str | None = None,
    sha256: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> Path:
    """Download (or take from ``source``), verify and import weights ``name``; the checkpoint path.

    Args:
        importers: ``{kind: importer(source_path, output_checkpoint) -> one-line report}``.
        source: a local copy in any form the entry's note names (no network used).
        mirror: base URL serving the same file names instead of the official addresses.
        sha256: the expected hash of the (single) file, where upstream publishes none.
        overwrite: fetch again even when the checkpoint is already in the cache.

    Raises:
        WeightsError: unknown name, no network, broken download, wrong hash, unreadable archive.
        FileNotFoundError: ``source`` does not exist.
    """
    spec = spec_of(name)
    final = checkpoint_path(name)
    if final.is_file() and not overwrite:
        log(f"{name} is already in the cache (--overwrite fetches it again)")
        return final
    if sha256 is not None and len(spec.files) != 1:
        raise WeightsError(f"--sha256 needs a single-file entry; {name} has {len(spec.files)} files with known hashes")
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=final.parent))
    try:
        if source is not None:
            to_import, notes = _local_source(spec, Path(source), sha256)
        else:
            to_import, notes = _download_all(spec, staging, mirror, sha256, progress)
        for line in notes:
            log(line)
        if to_import.suffix in (".tgz", ".gz") and to_import.is_file():
            to_import = _unpack(to_import, staging / "unpacked")
        log(importers[spec.kind](to_import, staging / final.name))
        os.replace(staging / final.name, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final


def _download_all(
    spec: Weights, staging: Path, mirror: str | None, sha256: str | None, progress: bool
) -> tuple[Path, list[str]]:
    notes = []
    for file in spec.files:
        url = mirror.rstrip("/") + "/" + file.name if mirror else file.url
        dest = staging / file.name
        digest = download(url, dest, name=spec.name, progress=progress)
        expected = sha256 if sha256 is not None else file.sha256
        _check_file(dest, file, expected, digest)
        notes.append(f"{file.name}: sha256 {digest}" + (" (matches)" if expected else
                     " (upstream publishes no hash; pin this one with --sha256 next time)"))  # fmt: skip
    return (staging if len(spec.files) > 1 else staging / spec.files[0].name), notes


def weights_arg(value: str) -> Path:
    """``argparse`` ``type=`` of every weights option: a path, or a known NAME as its cached checkpoint."""
    try:
        return resolve_weights(value)
    except WeightsError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
