"""The real CIFAR download path, against archives generated here and served on 127.0.0.1."""

import hashlib
import http.server
import io
import os
import pickle
import re
import stat
import struct
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from ltbench import data
from ltbench.data import cifar
from ltbench.data.download import DownloadError, fetch, safe_extract

ROOT = Path(__file__).resolve().parent.parent


def _py2_str(b: bytes) -> bytes:
    return (b"U" + bytes([len(b)]) + b) if len(b) < 256 else (b"T" + struct.pack("<i", len(b)) + b)


def _py2_int(i: int) -> bytes:
    return b"K" + bytes([i]) if 0 <= i < 256 else b"J" + struct.pack("<i", i)


def _py2_value(v) -> bytes:
    if isinstance(v, str):
        return _py2_str(v.encode("latin1"))
    if isinstance(v, int):
        return _py2_int(v)
    if isinstance(v, list):
        return b"](" + b"".join(_py2_value(x) for x in v) + b"e"
    assert isinstance(v, np.ndarray) and v.dtype == np.uint8 and v.ndim == 2
    dtype = (
        b"cnumpy\ndtype\n"
        + _py2_str(b"u1")
        + _py2_int(0)
        + _py2_int(1)
        + b"\x87R("
        + _py2_int(3)
        + _py2_str(b"|")
        + b"NNN"
        + _py2_int(-1)
        + _py2_int(-1)
        + _py2_int(0)
        + b"tb"
    )
    return (
        b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n"
        + _py2_int(0)
        + b"\x85"
        + _py2_str(b"b")
        + b"\x87R("
        + _py2_int(1)
        + _py2_int(v.shape[0])
        + _py2_int(v.shape[1])
        + b"\x86"
        + dtype
        + b"\x89"
        + _py2_str(v.tobytes())
        + b"tb"
    )


def py2_pickle(d: dict) -> bytes:
    """What Python 2's cPickle.dump(d, f, 2) wrote for the real CIFAR batches: str keys and strings
    as byte strings, arrays via numpy.core.multiarray._reconstruct (written opcode by opcode)."""
    return b"\x80\x02}(" + b"".join(_py2_str(k.encode()) + _py2_value(v) for k, v in d.items()) + b"u."


def make_cifar10_tarball(
    per_class=(30, 20, 12, 8, 6, 5, 4, 3, 3, 2),
    test_per_class=4,
    inner="cifar-10-batches-py",
    replace: dict | None = None,
) -> bytes:
    """A tiny archive in the CIFAR-10 python format (5 train batches + test batch); ``replace``
    maps a batch name to raw bytes stored instead."""
    rng = np.random.RandomState(0)
    labels = np.concatenate([np.full(n, c) for c, n in enumerate(per_class)])
    rng.shuffle(labels)
    images = rng.randint(0, 256, size=(len(labels), 3072), dtype=np.uint8)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:

        def add(name, payload):
            blob = (replace or {}).get(name) or py2_pickle(payload)
            info = tarfile.TarInfo(f"{inner}/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))

        for i, part in enumerate(np.array_split(np.arange(len(labels)), 5)):
            add(
                f"data_batch_{i + 1}",
                {
                    "batch_label": f"training batch {i + 1} of 5",
                    "labels": labels[part].tolist(),
                    "data": images[part],
                    "filenames": [f"{j}.png" for j in part],
                },
            )
        tl = np.repeat(np.arange(10), test_per_class)
        add("test_batch", {"data": rng.randint(0, 256, size=(len(tl), 3072), dtype=np.uint8), "labels": tl.tolist()})
    return buf.getvalue()


class Server:
    """Serves fixed bytes per path on 127.0.0.1; ``lie_length`` announces more bytes than sent,
    ``cut`` sends half the body chunked and closes the connection, ``stall`` sends half and hangs."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.lie_length: set[str] = set()
        self.cut: set[str] = set()
        self.stall: set[str] = set()
        self.release = threading.Event()
        files, lie, cut, stall, release = self.files, self.lie_length, self.cut, self.stall, self.release

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):
                self.close_connection = True
                body = files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                if self.path in cut:
                    self.send_header("Transfer-Encoding", "chunked")
                    self.end_headers()
                    half = body[: len(body) // 2]
                    self.wfile.write(b"%x\r\n" % len(body) + half)  # a chunk announced whole, sent half
                    return
                self.send_header("Content-Length", str(len(body) + (1000 if self.path in lie else 0)))
                self.end_headers()
                if self.path in stall:
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    release.wait(30)
                    return
                self.wfile.write(body)

            def log_message(self, *a):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path):
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"

    def close(self):
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = Server()
    yield s
    s.close()


def md5(b: bytes) -> str:
    return hashlib.md5(b).hexdigest()


def test_download_verify_extract_and_prepare(server, tmp_path):
    blob = make_cifar10_tarball()
    server.files["/c10.tar.gz"] = blob
    opts = {"url": server.url("/c10.tar.gz"), "md5": md5(blob)}
    cifar.download("cifar10", tmp_path, opts)
    assert (tmp_path / "cifar10" / "cifar-10-batches-py" / "data_batch_5").is_file()
    tx, ty, sx, sy = cifar.load("cifar10", tmp_path, opts)
    assert tx.shape == (93, 3, 32, 32) and sx.shape == (40, 3, 32, 32)
    # training order is data_batch_1..5 concatenated
    first = cifar.read_batch(tmp_path / "cifar10" / "cifar-10-batches-py" / "data_batch_1")
    np.testing.assert_array_equal(tx[: len(first["labels"])].reshape(-1, 3072), first["data"])
    # a second call is a no-op (no network needed)
    server.files.clear()
    cifar.download("cifar10", tmp_path, opts)


def test_the_real_constants_are_torchvisions():
    spec = data.get("cifar10")
    assert spec.url == "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
    assert spec.md5 == "c58f30108f718f92721af3b95e74349a"
    assert data.get("cifar100").md5 == "eb9058c3a382ffc7106e4002c42a8d85"


def test_wrong_md5_leaves_nothing(server, tmp_path):
    blob = make_cifar10_tarball()
    server.files["/c10.tar.gz"] = blob
    with pytest.raises(DownloadError, match="md5 mismatch"):
        cifar.download("cifar10", tmp_path, {"url": server.url("/c10.tar.gz"), "md5": "0" * 32})
    assert list(tmp_path.iterdir()) == []


def test_truncated_download_leaves_nothing(server, tmp_path):
    blob = make_cifar10_tarball()
    server.files["/c10.tar.gz"] = blob
    server.lie_length.add("/c10.tar.gz")
    with pytest.raises(DownloadError, match="ended after"):
        fetch(server.url("/c10.tar.gz"), tmp_path / "c10.tar.gz", md5(blob), timeout=5)
    assert list(tmp_path.iterdir()) == []


def test_unreachable_url_is_a_clear_error(server, tmp_path):
    with pytest.raises(DownloadError, match="could not download .*mirror"):
        fetch(server.url("/missing.tar.gz"), tmp_path / "x.tar.gz", "0" * 32, timeout=5)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("evil", ["../escape.txt", "/abs/escape.txt", "cifar-10-batches-py/../../escape.txt"])
def test_path_escaping_member_is_refused(tmp_path, evil):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name in ("cifar-10-batches-py/ok.txt", evil):
            info = tarfile.TarInfo(name)
            info.size = 2
            tar.addfile(info, io.BytesIO(b"hi"))
    archive = tmp_path / "evil.tar.gz"
    archive.write_bytes(buf.getvalue())
    target = tmp_path / "out" / "cifar10"
    with pytest.raises(DownloadError, match="outside the target directory"):
        safe_extract(archive, target)
    assert not target.exists() and not (tmp_path / "escape.txt").exists()
    assert list((tmp_path / "out").iterdir()) == []


def test_symlink_member_is_refused(tmp_path):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("cifar-10-batches-py/link")
        info.type = tarfile.SYMTYPE
        info.linkname = "/etc/passwd"
        tar.addfile(info)
    archive = tmp_path / "link.tar"
    archive.write_bytes(buf.getvalue())
    with pytest.raises(DownloadError, match="not a plain file"):
        safe_extract(archive, tmp_path / "t")
    assert not (tmp_path / "t").exists()


def test_download_command_reports_md5_failure(server, tmp_path, cli):
    blob = make_cifar10_tarball()
    server.files["/c10.tar.gz"] = blob
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"""
data_dir: {tmp_path / "data"}
datasets:
  cifar10: {{url: "{server.url("/c10.tar.gz")}", md5: "{"1" * 32}"}}
experiments:
  e: {{datasets: [cifar10], ratios: [10], methods: [ce], backbones: [resnet8]}}
""")
    p = cli("download", "--dataset", "cifar10", "--config", cfg, "--done", tmp_path / "done", check=False)
    assert p.returncode == 1 and "md5 mismatch" in p.stderr
    assert not (tmp_path / "done").exists()
    assert not any((tmp_path / "data").rglob("*.tar.gz"))


class _Payload:
    """Unpickling this runs code: it creates ``path``."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return exec, (f"open({self.path!r}, 'w').close()",)


@pytest.mark.parametrize("protocol", [0, 2, 5])
def test_a_malicious_batch_runs_nothing_and_names_the_file(server, tmp_path, protocol):
    marker = tmp_path / "PWNED"
    evil = pickle.dumps({"data": _Payload(marker), "labels": [0]}, protocol=protocol)
    pickle.loads(evil)  # the payload is real: a plain unpickler runs it
    assert marker.exists()
    marker.unlink()
    blob = make_cifar10_tarball(replace={"data_batch_3": evil})
    server.files["/c10.tar.gz"] = blob
    opts = {"url": server.url("/c10.tar.gz"), "md5": md5(blob)}  # a "mirror" with a matching md5
    cifar.download("cifar10", tmp_path / "data", opts)
    with pytest.raises(DownloadError) as e:
        data.prepare("cifar10", 10, tmp_path / "data", tmp_path / "out.npz", opts)
    assert "data_batch_3" in str(e.value) and re.search(r"references (__)?builtin(s|__)\.exec", str(e.value))
    assert not marker.exists() and not (tmp_path / "out.npz").exists()


def test_a_batch_that_is_not_a_cifar_dict_is_a_clear_error(tmp_path):
    (tmp_path / "b").write_bytes(pickle.dumps([1, 2], protocol=2))
    with pytest.raises(DownloadError, match="holds a list, not a CIFAR batch"):
        cifar.read_batch(tmp_path / "b")
    (tmp_path / "b").write_bytes(b"\x80\x02}(U\x04da")  # truncated
    with pytest.raises(DownloadError, match=f"refusing to read {tmp_path / 'b'}"):
        cifar.read_batch(tmp_path / "b")


def test_a_chunked_download_cut_midway_is_a_clear_error(server, tmp_path):
    blob = make_cifar10_tarball()
    server.files["/c10.tar.gz"] = blob
    server.cut.add("/c10.tar.gz")
    with pytest.raises(DownloadError, match="was cut off .*IncompleteRead.*nothing was kept"):
        fetch(server.url("/c10.tar.gz"), tmp_path / "c10.tar.gz", md5(blob), timeout=5)
    assert list(tmp_path.iterdir()) == []


def test_a_download_killed_midway_leaves_no_partial_file_after_the_next_run(server, tmp_path):
    blob = make_cifar10_tarball()
    server.files["/c10.tar.gz"] = blob
    server.files["/slow.tar.gz"] = bytes(3 << 20)  # half of it (more than one read block) comes, then nothing
    server.stall.add("/slow.tar.gz")
    code = "import sys; from ltbench.data.download import fetch; fetch(sys.argv[1], sys.argv[2], '0' * 32, timeout=60)"
    proc = subprocess.Popen(
        [sys.executable, "-c", code, server.url("/slow.tar.gz"), str(tmp_path / "c10.tar.gz")],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        for _ in range(600):  # until the partial file has data
            parts = list(tmp_path.glob(".c10.tar.gz.*.part"))
            if parts and parts[0].stat().st_size > 0:
                break
            time.sleep(0.05)
        assert parts, "the download never started"
    finally:
        proc.kill()  # SIGKILL: no finally block of the downloader runs
        proc.wait()
    assert parts[0].exists()  # what kill -9 leaves
    other = tmp_path / ".c10.tar.gz.otherhost.123.abcd.part"  # another node's, possibly live: kept
    other.write_bytes(b"x")
    fetch(server.url("/c10.tar.gz"), tmp_path / "c10.tar.gz", md5(blob), timeout=5)
    assert sorted(p.name for p in tmp_path.iterdir()) == [other.name, "c10.tar.gz"]


def test_wrong_inner_layout_extracts_nothing_and_a_rerun_with_the_right_archive_works(server, tmp_path):
    wrong = make_cifar10_tarball(inner="cifar-100-python")
    right = make_cifar10_tarball()
    server.files["/wrong.tar.gz"], server.files["/right.tar.gz"] = wrong, right
    with pytest.raises(DownloadError, match="does not contain cifar-10-batches-py/ .*cifar-100-python"):
        cifar.download("cifar10", tmp_path, {"url": server.url("/wrong.tar.gz"), "md5": md5(wrong)})
    assert not (tmp_path / "cifar10").exists() and not list(tmp_path.glob(".cifar10*"))
    cifar.download("cifar10", tmp_path, {"url": server.url("/right.tar.gz"), "md5": md5(right)})
    assert (tmp_path / "cifar10" / "cifar-10-batches-py" / "test_batch").is_file()


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_downloaded_files_follow_the_umask(server, tmp_path, umask):
    blob = make_cifar10_tarball()
    server.files["/c10.tar.gz"] = blob
    old = os.umask(umask)
    try:
        cifar.download("cifar10", tmp_path, {"url": server.url("/c10.tar.gz"), "md5": md5(blob)})
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "cifar-10-python.tar.gz").stat().st_mode) == 0o666 & ~umask
    assert stat.S_IMODE((tmp_path / "cifar10").stat().st_mode) == 0o777 & ~umask
