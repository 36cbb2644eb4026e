"""Weights by name: `mnapps weights get` over real HTTP (a server on 127.0.0.1), hashes, the cache.

The server serves the test-data copies under the official file names. Where the official file
has another form than the copy, the test builds that form from the copy: the FaceNet releases
are the features-only state dict plus a classifier (``logits.*``, random here; mnapps drops it),
and the TF-slim archive is a .tgz, here holding the .npz of the same tensors (the official one
holds a TF checkpoint, which needs TensorFlow to write; reading one is tested in
tests/test_tf_checkpoint.py). face-api.js's two files are served byte for byte and must match
the hashes of the table, which are the published package's.
"""

from __future__ import annotations

import hashlib
import http.server
import io
import tarfile
import threading
from pathlib import Path

import pytest
import yaml
import torch

from mnapps.checkpoint import load_checkpoint
from mnapps.cli.weights import main as weights_main
from mnapps.weights import WEIGHTS, WeightsError, checkpoint_path, resolve_weights, weights_cache_dir

ROOT = Path(__file__).resolve().parents[1]


class _Handler(http.server.BaseHTTPRequestHandler):
    files: dict[str, bytes] = {}
    truncate: set[str] = set()

    def do_GET(self):  # noqa: N802 (http.server's name)
        name = self.path.lstrip("/")
        if name not in self.files:
            self.send_error(404)
            return
        data = self.files[name]
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        # A truncated file announces its full length, sends half and hangs up.
        self.wfile.write(data[: len(data) // 2] if name in self.truncate else data)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    _Handler.files, _Handler.truncate = {}, set()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield _Handler, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MNAPPS_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "weights"


def _tgz(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _release_pt(features: Path, classes: int) -> bytes:
    """facenet-pytorch's release form: the features plus a ``logits`` classifier."""
    state = torch.load(features, weights_only=True)
    generator = torch.Generator().manual_seed(0)
    state["logits.weight"] = torch.randn(classes, 512, generator=generator)
    state["logits.bias"] = torch.zeros(classes)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def _official_forms(shared: Path, name: str) -> dict[str, bytes]:
    if name == "mobilenet_v1_1.0_224_imagenet":
        npz = shared / "mobilenet_v1_tfslim" / "mobilenet_v1_1.0_224_tfslim.npz"
        return {"mobilenet_v1_1.0_224.tgz": _tgz({"mobilenet_v1_1.0_224/" + npz.name: npz.read_bytes()})}
    if name == "faceapi_ssd_mobilenetv1":
        return {f.name: (shared / "faceapi_ssd_mobilenetv1" / f.name).read_bytes() for f in WEIGHTS[name].files}
    features = shared / "facenet_casia" / "20180408-102900-casia-webface-features.pt"
    classes = {"facenet_casia_webface": 10575, "facenet_vggface2": 8631}[name]
    return {WEIGHTS[name].files[0].name: _release_pt(features, classes)}


def _leftovers(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.iterdir()) if cache.exists() else []


@pytest.mark.slow
@pytest.mark.parametrize("name", list(WEIGHTS))
def test_get_downloads_verifies_and_imports_every_listed_name(name, shared_data, server, cache, capsys):
    handler, url = server
    handler.files = _official_forms(shared_data, name)
    args = ["get", name, "--mirror", url, "--quiet"]
    if WEIGHTS[name].files[0].sha256 is None:  # upstream publishes none: pin the served file's
        args += ["--sha256", hashlib.sha256(next(iter(handler.files.values()))).hexdigest()]
    assert weights_main(args) == 0, capsys.readouterr().err
    out, err = capsys.readouterr()
    path = checkpoint_path(name)
    assert out.strip() == str(path) and path.is_file()
    assert "(matches)" in err
    assert _leftovers(cache) == [path.name]  # no staging folder, no raw download
    assert resolve_weights(name) == path

    state = torch.load(path, weights_only=True) if WEIGHTS[name].kind == "face_teacher" else load_checkpoint(path)
    if WEIGHTS[name].kind == "face_teacher":
        features = torch.load(shared_data / "facenet_casia" / "20180408-102900-casia-webface-features.pt",
                              weights_only=True)  # fmt: skip
        assert set(state) == set(features)  # the classifier is gone, every feature tensor kept
        assert all(torch.equal(state[k], features[k]) for k in features)
    elif name == "mobilenet_v1_1.0_224_imagenet":
        assert state["task"] == "classification"
        assert state["model"]["classifier.weight"].shape == (1000, 1024)
    else:
        assert state["task"] == "detection" and state["config"]["model"]["class_names"] == ["__background__", "face"]

    assert weights_main(["get", name, "--mirror", url]) == 0  # a second get finds it in the cache
    assert "already in the cache" in capsys.readouterr().err


@pytest.mark.parametrize("name", list(WEIGHTS))
def test_a_wrong_hash_is_refused_and_leaves_nothing(name, server, cache, capsys):
    handler, url = server
    spec = WEIGHTS[name]
    handler.files = {f.name: b"not the published file" for f in spec.files}
    args = ["get", name, "--mirror", url, "--quiet"]
    if spec.files[0].sha256 is None:
        args += ["--sha256", "0" * 64]
    assert weights_main(args) == 2
    err = capsys.readouterr().err
    assert "does not match the expected" in err or "expected" in err and "bytes" in err, err
    assert _leftovers(cache) == []
    with pytest.raises(WeightsError, match=f"mnapps weights get {name}"):
        resolve_weights(name)


def test_an_interrupted_download_is_an_error_and_leaves_nothing(server, cache, capsys):
    handler, url = server
    handler.files = {"20180402-114759-vggface2.pt": bytes(200_000)}
    handler.truncate = {"20180402-114759-vggface2.pt"}
    assert weights_main(["get", "facenet_vggface2", "--mirror", url, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "run it again" in err and "100000" in err, err
    assert _leftovers(cache) == []


def test_no_network_is_one_line_naming_from(cache, capsys):
    # Port 9 (discard) on this host: nothing listens, the connection is refused at once.
    assert weights_main(["get", "facenet_casia_webface", "--mirror", "http://127.0.0.1:9", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: cannot download facenet_casia_webface") and "\n" not in err
    assert "mnapps weights get facenet_casia_webface --from FILE" in err
    assert _leftovers(cache) == []


def test_from_a_local_copy_needs_no_network(shared_data, cache, capsys):
    folder = shared_data / "faceapi_ssd_mobilenetv1"
    assert weights_main(["get", "faceapi_ssd_mobilenetv1", "--from", str(folder)]) == 0
    assert capsys.readouterr().out.strip() == str(checkpoint_path("faceapi_ssd_mobilenetv1"))


def test_names_resolve_and_misspelt_names_are_suggested(cache, tmp_path):
    assert resolve_weights(None) is None
    assert resolve_weights("runs/x/best.pt") == Path("runs/x/best.pt")  # a path stays a path
    with pytest.raises(WeightsError, match="did you mean facenet_vggface2"):
        resolve_weights("facenet_vggface")
    with pytest.raises(WeightsError, match="not in the cache"):
        resolve_weights("facenet_vggface2")
    assert weights_cache_dir() == cache


def test_list_names_every_entry_with_its_source_and_license(capsys):
    assert weights_main(["list"]) == 0
    out = capsys.readouterr().out
    for spec in WEIGHTS.values():
        assert spec.name in out and spec.license in out and all(f.url in out for f in spec.files)


def test_configs_name_weights_by_name_not_by_relative_path():
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        cfg = yaml.safe_load(path.read_text())
        for value in (cfg.get("model", {}).get("backbone", {}).get("weights"), cfg.get("teacher", {}).get("weights")):
            assert value is None or value in WEIGHTS, f"{path.name}: weights {value!r} is not a known name"


def test_a_teacher_is_built_from_its_weights_name(tmp_path, monkeypatch):
    """Configs name the teacher (teacher.weights: facenet_casia_webface): every path that builds one
    reads the cached checkpoint, and a name not fetched yet says how to fetch it."""
    from mnapps.tasks.face.distill.teacher import _inception_resnet_v1, load_teacher_state_dict
    from mnapps.weights import WeightsError, checkpoint_path

    monkeypatch.setenv("MNAPPS_CACHE", str(tmp_path / "cache"))
    with pytest.raises(WeightsError, match="mnapps weights get facenet_casia_webface"):
        load_teacher_state_dict("facenet_casia_webface")
    state = _inception_resnet_v1().state_dict()
    path = checkpoint_path("facenet_casia_webface")
    path.parent.mkdir(parents=True)
    torch.save(state, path)
    loaded = load_teacher_state_dict("facenet_casia_webface")
    assert loaded.keys() == state.keys() and torch.equal(loaded["last_linear.weight"], state["last_linear.weight"])
