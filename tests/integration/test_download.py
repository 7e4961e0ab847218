"""`instseg data download` end to end against an HTTP server on 127.0.0.1 serving a zip of coco8-seg."""

import hashlib
import http.server
import json
import threading
import zipfile
from pathlib import Path

import pytest

from instseg.cli import main as cli_main
from tests.helpers import shared_dataset

pytestmark = pytest.mark.integration


class _Handler(http.server.BaseHTTPRequestHandler):
    payload = b""
    truncate_next = 0  # >0: send only this many bytes of the next response, then drop the connection

    def do_GET(self):  # noqa: N802 (http.server API)
        body = self.payload
        self.send_response(200)
        self.send_header("Content-Type", "application/zip")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if type(self).truncate_next:
            self.wfile.write(body[: type(self).truncate_next])
            type(self).truncate_next = 0
            self.wfile.flush()
            self.connection.close()
            return
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    src = shared_dataset("coco8-seg")
    archive = tmp_path_factory.mktemp("zip") / "coco8-seg.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted(src.rglob("*")):
            if path.is_file():
                zf.write(path, Path("coco8-seg") / path.relative_to(src))
    _Handler.payload = archive.read_bytes()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/coco8-seg.zip", hashlib.sha256(_Handler.payload).hexdigest()
    httpd.shutdown()


def _instances(root: Path) -> int:
    return sum(len(json.loads(p.read_text())["annotations"]) for p in (root / "annotations").glob("*.json"))


def test_download_verifies_and_converts(server, tmp_path, capsys):
    url, digest = server
    assert cli_main(["data", "download", "coco8-seg", "--dest", str(tmp_path), "--url", url, "--sha256", digest]) == 0
    root = tmp_path / "coco8-seg"
    assert _instances(root) == 30 and len(list(root.glob("images/*/*.jpg"))) == 8
    assert sorted(p.name for p in tmp_path.iterdir()) == ["coco8-seg"], "no zip or temp folder left behind"
    assert cli_main(["data", "check", str(root)]) == 0
    assert cli_main(["data", "download", "coco8-seg", "--dest", str(tmp_path)]) == 0, "already there: nothing to verify"


def test_wrong_checksum_leaves_nothing(server, tmp_path, capsys):
    url, _ = server
    assert cli_main(["data", "download", "coco8-seg", "--dest", str(tmp_path), "--url", url, "--sha256", "0" * 64]) == 1
    assert "sha256 mismatch" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_interrupted_download_leaves_no_dataset_and_a_rerun_completes(server, tmp_path, capsys):
    url, digest = server
    _Handler.truncate_next = 10_000
    assert cli_main(["data", "download", "coco8-seg", "--dest", str(tmp_path), "--url", url, "--sha256", digest]) == 1
    assert "cut short" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == [], "no partial file or dataset left"
    assert cli_main(["data", "download", "coco8-seg", "--dest", str(tmp_path), "--url", url, "--sha256", digest]) == 0
    assert _instances(tmp_path / "coco8-seg") == 30
    assert sorted(p.name for p in tmp_path.iterdir()) == ["coco8-seg"]


def test_no_network_says_what_to_do(tmp_path, capsys):
    closed = "http://127.0.0.1:9/coco8-seg.zip"  # the discard port: nothing listens there
    assert cli_main(["data", "download", "coco8-seg", "--dest", str(tmp_path), "--url", closed, "--insecure"]) == 1
    err = capsys.readouterr().err
    assert "cannot download" in err and "instseg data convert" in err and "Traceback" not in err


def test_an_unverifiable_download_is_refused_unless_asked_for(server, tmp_path, capsys):
    url, digest = server
    assert cli_main(["data", "download", "coco8-seg", "--dest", str(tmp_path), "--url", url]) == 2
    assert "no pinned sha256" in capsys.readouterr().err and not list(tmp_path.iterdir())
    assert cli_main(["data", "download", "coco8-seg", "--dest", str(tmp_path), "--url", url, "--insecure"]) == 0
    assert f"NOT verified: --insecure; pass --sha256 {digest}" in capsys.readouterr().err


def test_a_zip_bomb_is_refused_before_unpacking(tmp_path, capsys):
    """A zip whose members claim far more bytes than it holds (10 MB of zeros in a few KB) is refused."""
    bomb = tmp_path / "bomb.zip"
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("coco8-seg/images/train/zeros.jpg", b"\0" * 10_000_000)
    saved, _Handler.payload = _Handler.payload, bomb.read_bytes()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}/bomb.zip"
        dest = tmp_path / "dest"
        assert cli_main(["data", "download", "coco8-seg", "--dest", str(dest), "--url", url, "--insecure"]) == 1
    finally:
        httpd.shutdown()
        _Handler.payload = saved
    assert "refused" in capsys.readouterr().err
    assert list(dest.iterdir()) == [], "nothing unpacked, no zip left"
