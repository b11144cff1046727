"""The download stage's protections, against a loopback HTTP server serving archives made here."""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import stat
import struct
import subprocess
import sys
import tarfile
import threading
import zipfile
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from helpers_data import write_index_video

from nbp.config import load_config
from nbp.data import archives as A
from nbp.data import download as D
from nbp.data import fetch as F
from nbp.data.datasets import UCF101, Kinetics600
from nbp.errors import NbpError

REPO = Path(__file__).resolve().parents[1]
HAS_RAR_TOOL = bool((shutil.which("unar") and shutil.which("lsar")) or shutil.which("bsdtar"))


def needs_rar_tool() -> None:
    """Skip without `unar`/`bsdtar` on a workstation; fail in CI (CI=true), where a skip would hide a lost test."""
    if HAS_RAR_TOOL:
        return
    message = "needs unar or bsdtar to extract RAR archives (Debian: apt-get install unar)"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{message}; CI must install it", pytrace=False)
    pytest.skip(message)


# --------------------------------------------------------------------------------------
# a loopback server: honours Range, can drop the connection mid-file, can ignore Range


class Server:
    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.drops: dict[str, list[int]] = {}  # path -> bytes sent before dropping, one entry per request
        self.ignore_range = False
        self.log: list[tuple[str, str | None]] = []
        srv = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                rng = self.headers.get("Range")
                srv.log.append((self.path, rng))
                body = srv.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                start = int(rng.split("=")[1].split("-")[0]) if rng and not srv.ignore_range else 0
                if start >= len(body) and start:
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(body)}")
                    self.end_headers()
                    return
                self.send_response(206 if start else 200)
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                self.send_header("Content-Length", str(len(body) - start))
                self.end_headers()
                drops = srv.drops.get(self.path)
                if drops:
                    cut = drops.pop(0)
                    self.wfile.write(body[start:start + cut])
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_RDWR)
                    self.close_connection = True
                    return
                self.wfile.write(body[start:])

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(monkeypatch):
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("NBP_PROGRESS", "0")
    s = Server()
    yield s
    s.close()


PAYLOAD = bytes((i * 7919) % 251 for i in range(300_000))


def test_interrupted_transfer_resumes_with_range(server, tmp_path):
    server.files["/data.bin"] = PAYLOAD
    server.drops["/data.bin"] = [100_000, 50_000]  # two drops, then a full answer
    lock = F.LockFile(tmp_path / "lock.json")
    out = F.fetch(f"{server.url}/data.bin", tmp_path / "dl" / "data.bin", lock=lock, retries=3, backoff=0)
    assert out.read_bytes() == PAYLOAD
    assert server.log == [("/data.bin", None), ("/data.bin", "bytes=100000-"), ("/data.bin", "bytes=150000-")]
    assert not (tmp_path / "dl" / "data.bin.part").exists()
    assert lock.get(f"{server.url}/data.bin")["size"] == len(PAYLOAD)


def test_partial_file_from_an_earlier_run_is_continued(server, tmp_path):
    server.files["/data.bin"] = PAYLOAD
    dest = tmp_path / "data.bin"
    dest.with_name("data.bin.part").write_bytes(PAYLOAD[:123_456])
    F.fetch(f"{server.url}/data.bin", dest, retries=0)
    assert dest.read_bytes() == PAYLOAD and server.log == [("/data.bin", "bytes=123456-")]
    # a .part that is already complete: the server answers 416 and the file is kept
    server.log.clear()
    dest2 = tmp_path / "again.bin"
    dest2.with_name("again.bin.part").write_bytes(PAYLOAD)
    F.fetch(f"{server.url}/data.bin", dest2, retries=0)
    assert dest2.read_bytes() == PAYLOAD and server.log == [("/data.bin", f"bytes={len(PAYLOAD)}-")]


def test_server_ignoring_range_restarts_from_zero(server, tmp_path):
    server.files["/data.bin"] = PAYLOAD
    server.ignore_range = True
    dest = tmp_path / "data.bin"
    dest.with_name("data.bin.part").write_bytes(b"\xff" * 1000)
    F.fetch(f"{server.url}/data.bin", dest, retries=0)
    assert dest.read_bytes() == PAYLOAD


def test_checksum_recorded_at_first_download_then_checked(server, tmp_path):
    url = f"{server.url}/UCF101.rar"
    server.files["/UCF101.rar"] = PAYLOAD
    lock = F.LockFile(tmp_path / "workflow" / "checksums.lock.json")
    F.fetch(url, tmp_path / "a" / "UCF101.rar", lock=lock)
    recorded = json.loads(lock.path.read_text())["files"][url]
    assert recorded["sha256"] == F.sha256_file(tmp_path / "a" / "UCF101.rar") and recorded["size"] == len(PAYLOAD)
    # the upstream file changes (or is corrupted in transit): the next download fails its checksum
    server.files["/UCF101.rar"] = PAYLOAD[:5000] + b"X" + PAYLOAD[5001:]
    dest = tmp_path / "b" / "UCF101.rar"
    with pytest.raises(F.ChecksumError, match="does not match"):
        F.fetch(url, dest, lock=lock)
    assert not dest.exists() and dest.with_name("UCF101.rar.corrupt").exists()
    assert json.loads(lock.path.read_text())["files"][url] == recorded  # the lock is not rewritten
    # a published checksum is checked the same way
    with pytest.raises(F.ChecksumError):
        F.fetch(url, tmp_path / "c" / "x.rar", sha256="0" * 64)


def test_unreachable_server_and_missing_file_give_clear_errors(server, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(F.NetworkError, match=rf"127.0.0.1:{port}/x.rar: network unreachable .*after 2 tries"):
        F.fetch(f"http://127.0.0.1:{port}/x.rar", tmp_path / "x.rar", retries=1, backoff=0)
    with pytest.raises(NbpError, match="HTTP 404"):
        F.fetch(f"{server.url}/nothing.zip", tmp_path / "n.zip", retries=3, backoff=0)
    assert len(server.log) == 1  # a 404 is not retried


# --------------------------------------------------------------------------------------
# safe extraction


def _tar(path: Path, members: list[tuple[str, str, bytes | str]]) -> Path:
    """members: (name, kind in file|dir|sym|hard|chr, data or link target)."""
    with tarfile.open(path, "w:gz") as tf:
        for name, kind, data in members:
            ti = tarfile.TarInfo(name)
            if kind == "file":
                ti.size = len(data)
                tf.addfile(ti, io.BytesIO(data))
                continue
            ti.type = {"dir": tarfile.DIRTYPE, "sym": tarfile.SYMTYPE, "hard": tarfile.LNKTYPE, "chr": tarfile.CHRTYPE}[kind]
            if kind in ("sym", "hard"):
                ti.linkname = data
            tf.addfile(ti)
    return path


def _zip(path: Path, members: list[tuple[str, bytes, int]]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data, mode in members:
            zi = zipfile.ZipInfo(name)
            zi.external_attr = mode << 16
            zf.writestr(zi, data)
    return path


def _rar_header(htype: int, flags: int, body: bytes) -> bytes:
    rest = struct.pack("<BHH", htype, flags, 7 + len(body)) + body
    return struct.pack("<H", zlib.crc32(rest) & 0xFFFF) + rest


def _rar(path: Path, members: list[tuple[str, bytes, int]]) -> Path:
    """A RAR 1.5-4.x archive with stored members (name with '\\' separators, data, unix mode), from the format notes."""
    out = b"Rar!\x1a\x07\x00" + _rar_header(0x73, 0, b"\x00" * 6)
    for name, data, mode in members:
        nb = name.replace("/", "\\").encode()
        flags = 0x8000 | (0xE0 if stat.S_ISDIR(mode) else 0)
        body = struct.pack("<IIBIIBBHI", len(data), len(data), 3, zlib.crc32(data), 0x5A210000, 20, 0x30, len(nb), mode) + nb
        out += _rar_header(0x74, flags, body) + data
    path.write_bytes(out + _rar_header(0x7B, 0x4000, b""))
    return path


def _assert_nothing_written(tmp_path: Path, target: Path, archive: Path) -> None:
    leftovers = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p != archive and p != target)
    assert leftovers == [], leftovers


REASONS = {"dotdot": "contains '..'", "absolute": "absolute path", "escaping symlink": "points outside the target",
           "absolute symlink": "points to an absolute path", "write through link": "written through a link",
           "hard link outside": "outside the target", "device": "device"}

BAD_TARS = {
    "dotdot": [("data/ok.txt", "file", b"ok"), ("data/../../evil.txt", "file", b"evil"), ("../evil.txt", "file", b"evil")],
    "absolute": [("ok.txt", "file", b"ok"), ("{tmp}/abs.txt", "file", b"evil")],
    "escaping symlink": [("UCF-101/link", "sym", "../../.."), ("ok.txt", "file", b"ok")],
    "absolute symlink": [("link", "sym", "/etc")],
    "hard link outside": [("h", "hard", "../outside.txt")],
    "device": [("dev/null0", "chr", "")],
}


@pytest.mark.parametrize("case", list(BAD_TARS))
def test_tar_with_unsafe_members_is_refused(tmp_path, case):
    members = [(n.replace("{tmp}", str(tmp_path)), k, d) for n, k, d in BAD_TARS[case]]
    archive = _tar(tmp_path / "bad.tar.gz", members)
    target = tmp_path / "data"
    with pytest.raises(A.UnsafeArchiveError, match=REASONS[case]):
        A.safe_extract(archive, target)
    assert list(target.iterdir()) == []  # not even the safe members: the scratch folder is gone
    _assert_nothing_written(tmp_path, target, archive)


def test_safe_tar_with_inner_links_extracts(tmp_path):
    archive = _tar(tmp_path / "ok.tgz", [("./k600/train/a.mp4", "file", b"aaa"), ("k600/train/sub", "dir", b""),
                                         ("k600/train/sub/link.mp4", "sym", "../a.mp4"),
                                         ("k600/hard.mp4", "hard", "k600/train/a.mp4")])
    target = A.safe_extract(archive, tmp_path / "data")
    assert (target / "k600/train/sub/link.mp4").read_bytes() == b"aaa"
    assert os.readlink(target / "k600/train/sub/link.mp4") == "../a.mp4"
    assert (target / "k600/hard.mp4").read_bytes() == b"aaa"
    assert sorted(p.name for p in target.iterdir()) == ["k600"]


def test_zip_with_unsafe_members_is_refused(tmp_path):
    cases = {
        "dotdot": [("ucfTrainTestlist/classInd.txt", b"1 A\n", 0o100644), ("../evil.txt", b"x", 0o100644)],
        "absolute": [(f"{tmp_path}/abs.txt", b"x", 0o100644)],
        "escaping symlink": [("ucfTrainTestlist/l", b"../../../etc", 0o120777)],
        "device": [("fifo", b"", 0o010644)],
    }
    for name, members in cases.items():
        archive = _zip(tmp_path / f"{name}.zip", members)
        target = tmp_path / "data"
        with pytest.raises(A.UnsafeArchiveError, match=REASONS[name]):
            A.safe_extract(archive, target)
        assert list(target.iterdir()) == [], name
        archive.unlink()
        _assert_nothing_written(tmp_path, target, archive)
    ok = _zip(tmp_path / "ok.zip", [("ucfTrainTestlist/", b"", 0o040755),
                                    ("ucfTrainTestlist/classInd.txt", b"1 A\r\n", 0o100644)])
    assert (A.safe_extract(ok, tmp_path / "data") / "ucfTrainTestlist/classInd.txt").read_bytes() == b"1 A\r\n"


def test_rar_extracts_and_unsafe_rar_is_refused(tmp_path):
    needs_rar_tool()
    good = _rar(tmp_path / "UCF101.rar", [("UCF-101", b"", 0o040755), ("UCF-101/A/v_A_g01_c01.avi", b"video", 0o100644),
                                          ("UCF-101/A/link.avi", b"v_A_g01_c01.avi", 0o120777)])
    target = A.safe_extract(good, tmp_path / "data")
    assert (target / "UCF-101/A/v_A_g01_c01.avi").read_bytes() == b"video"
    assert (target / "UCF-101/A/link.avi").read_bytes() == b"video"
    shutil.rmtree(target)
    good.unlink()
    cases = {
        "dotdot": [("UCF-101/ok.avi", b"ok", 0o100644), ("..\\evil.avi", b"x", 0o100644)],
        "absolute": [("/" + str(tmp_path / "abs.avi").lstrip("/"), b"x", 0o100644)],
        "escaping symlink": [("UCF-101/l", b"../../../../etc", 0o120777)],
        "write through link": [("l", b"sub", 0o120777), ("l/x.avi", b"x", 0o100644)],
    }
    for name, members in cases.items():
        archive = _rar(tmp_path / "bad.rar", members)
        target = tmp_path / "data"
        with pytest.raises(A.UnsafeArchiveError, match=REASONS[name]):
            A.safe_extract(archive, target)
        assert list(target.iterdir()) == [], name
        archive.unlink()
        _assert_nothing_written(tmp_path, target, archive)


# --------------------------------------------------------------------------------------
# the stage


def _cfg(tmp_path: Path, overrides: dict):
    return load_config(REPO / "params.yaml", overrides={"run.out": str(tmp_path / "out"), **overrides})


def test_download_ucf101_end_to_end(server, tmp_path, monkeypatch, capsys):
    needs_rar_tool()
    lock_path = tmp_path / "checksums.lock.json"
    monkeypatch.setenv(F.LOCK_ENV, str(lock_path))
    video = write_index_video(tmp_path / "v.avi", 10, 25).read_bytes()
    names = ["ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01.avi", "ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi",
             "YoYo/v_YoYo_g08_c01.avi"]
    server.files["/data/UCF101.rar"] = _rar(tmp_path / "u.rar", [(f"UCF-101/{n}", video, 0o100644) for n in names]).read_bytes()
    zbuf = io.BytesIO()
    with zipfile.ZipFile(zbuf, "w") as zf:
        zf.writestr("ucfTrainTestlist/classInd.txt", "1 ApplyEyeMakeup\r\n2 YoYo\r\n")
        zf.writestr("ucfTrainTestlist/trainlist01.txt", f"{names[1]} 1\r\n{names[2]} 2\r\n")
        zf.writestr("ucfTrainTestlist/testlist01.txt", f"{names[0]}\r\n")
    server.files["/data/splits.zip"] = zbuf.getvalue()
    urls = {"videos": f"{server.url}/data/UCF101.rar", "splits": f"{server.url}/data/splits.zip"}
    cfg = _cfg(tmp_path, {"download.ucf101.urls": urls})
    out = tmp_path / "out" / "download" / "ucf101"

    D.run_download(cfg, "ucf101", dry_run=True)
    printed = capsys.readouterr().out
    assert urls["videos"] in printed and urls["splits"] in printed and "to fetch" in printed
    assert not (tmp_path / "out").exists() and server.log == []  # a dry run fetches and writes nothing

    D.run_download(cfg, "ucf101")
    ds = UCF101(out)
    assert [v.video for v in ds.videos("train")] == names[1:] and ds.videos("val")[0].path.read_bytes() == video
    assert set(json.loads(lock_path.read_text())["files"]) == set(urls.values())
    # a rerun uses the kept archives (no transfer) and checks them against the lock
    server.log.clear()
    D.run_download(cfg, "ucf101")
    assert server.log == [] and UCF101(out).classes[1].text == "yo yo"
    archive = tmp_path / "out" / "archives" / "ucf101" / "UCF101.rar"
    archive.write_bytes(archive.read_bytes()[:-10] + b"corrupted!")
    with pytest.raises(F.ChecksumError):
        D.run_download(cfg, "ucf101")
    assert (out / "UCF-101").is_dir()  # the previous output is untouched


def test_download_k600_end_to_end(server, tmp_path, monkeypatch):
    monkeypatch.setenv(F.LOCK_ENV, str(tmp_path / "lock.json"))
    parts = {}
    archived = [["aaaaaaaaaaa_000000_000010.mp4"], ["bbbbbbbbbbb_000005_000015.mp4", "ccccccccccc_000001_000011.mp4"]]
    for i, vids in enumerate(archived):
        parts[f"/k600/train/part_{i}.tar.gz"] = _tar(tmp_path / f"p{i}.tgz", [(v, "file", v.encode()) for v in vids]).read_bytes()
    server.files.update(parts)
    server.files["/k600/train/k600_train_path.txt"] = "".join(f"{server.url}{p}\n" for p in parts).encode()
    # the val split's archive has the same file name as a train one
    val_part = _tar(tmp_path / "v0.tgz", [("vvvvvvvvvvv_000000_000010.mp4", "file", b"v")])
    server.files["/k600/val/part_0.tar.gz"] = val_part.read_bytes()
    server.files["/k600/val/k600_val_path.txt"] = f"{server.url}/k600/val/part_0.tar.gz\n".encode()
    server.files["/k600/annotations/val.csv"] = b"label,youtube_id,time_start,time_end,split\nzumba,vvvvvvvvvvv,0,10,validate\n"
    server.files["/k600/annotations/train.csv"] = (
        b"label,youtube_id,time_start,time_end,split\nabseiling,aaaaaaaaaaa,0,10,train\n"
        b"zumba,bbbbbbbbbbb,5,15,train\nzumba,ccccccccccc,1,11,train\nzumba,ddddddddddd,1,11,train\n")
    cfg = _cfg(tmp_path, {"download.k600.urls": {"lists": f"{server.url}/k600", "annotations": f"{server.url}/k600/annotations"},
                          "download.k600.keep_archives": False})
    D.run_download(cfg, "k600")
    out = tmp_path / "out" / "download" / "k600"
    ds = Kinetics600(out)
    assert [(v.video, v.label) for v in ds.videos("train")] == [
        ("aaaaaaaaaaa_000000_000010.mp4", 0), ("bbbbbbbbbbb_000005_000015.mp4", 1), ("ccccccccccc_000001_000011.mp4", 1)]
    assert ds.missing["train"] == 1
    assert [(v.video, v.label) for v in ds.videos("val")] == [("vvvvvvvvvvv_000000_000010.mp4", 1)]
    assert not list((tmp_path / "out" / "archives" / "k600").rglob("*.tar.gz"))  # keep_archives: false


def _k600_server(server, tmp_path: Path, parts: dict[str, int], video: bytes = b"v") -> list[str]:
    """CVDF lists of ``parts[split]`` archives of one video each, and annotation CSVs naming those videos plus one
    that no archive holds. -> the videos, split/part order."""
    names = []
    for split, n in parts.items():
        paths = []
        for i in range(n):
            vid = f"{split[0] * 10}{i}_{i:06d}_{i + 10:06d}.mp4"
            path = f"/k600/{split}/part_{i}.tar.gz"
            server.files[path] = _tar(tmp_path / f"{split}{i}.tgz", [(vid, "file", video)]).read_bytes()
            paths.append(path)
            names.append(vid)
        server.files[f"/k600/{split}/k600_{split}_path.txt"] = "".join(f"{server.url}{p}\n" for p in paths).encode()
        rows = [f"zumba,{split[0] * 10}{i},{i},{i + 10},{split}" for i in range(n)] + [f"zumba,never_fetched,0,10,{split}"]
        csv = "\n".join(["label,youtube_id,time_start,time_end,split", *rows, ""])
        server.files[f"/k600/annotations/{split}.csv"] = csv.encode()
    return names


def _k600_cfg(server, tmp_path: Path, **download):
    over = {"download.k600.urls": {"lists": f"{server.url}/k600", "annotations": f"{server.url}/k600/annotations"}}
    return _cfg(tmp_path, {**over, **{f"download.k600.{k}": v for k, v in download.items()}})


def test_k600_max_archives_fetches_the_first_archives_then_the_rest(server, tmp_path, monkeypatch, capsys):
    from nbp.data.prepare import run_prepare

    monkeypatch.setenv(F.LOCK_ENV, str(tmp_path / "lock.json"))
    video = write_index_video(tmp_path / "v.mp4", 20, 16, size=32).read_bytes()  # 17 frames at 16 fps fit
    names = _k600_server(server, tmp_path, {"train": 3, "val": 2}, video)
    cfg = _k600_cfg(server, tmp_path, max_archives={"train": 1, "val": 1})
    out = tmp_path / "out" / "download" / "k600"

    D.run_download(cfg, "k600", dry_run=True)
    printed = capsys.readouterr().out
    assert "part_0.tar.gz" in printed and "part_1.tar.gz" not in printed and "part_2.tar.gz" not in printed
    assert "  train: 1 of 3 archives to fetch, 2 skipped (download.k600.max_archives.train)\n" in printed
    assert "  val: 1 of 2 archives to fetch, 1 skipped (download.k600.max_archives.val)\n" in printed
    assert {p for p, _ in server.log} == {"/k600/train/k600_train_path.txt", "/k600/val/k600_val_path.txt"}

    server.log.clear()
    D.run_download(cfg, "k600")
    printed = capsys.readouterr().out
    assert sorted(p for p, _ in server.log) == sorted([
        "/k600/annotations/train.csv", "/k600/annotations/val.csv", "/k600/train/k600_train_path.txt",
        "/k600/val/k600_val_path.txt", "/k600/train/part_0.tar.gz", "/k600/val/part_0.tar.gz"])
    assert printed.splitlines()[-2:] == [
        "  train: 1 of 3 archives fetched, 2 skipped (download.k600.max_archives.train)",
        "  val: 1 of 2 archives fetched, 1 skipped (download.k600.max_archives.val)"]
    assert sorted(p.name for p in (out / "k600").rglob("*.mp4")) == sorted([names[0], names[3]])
    assert json.loads((out / "source.json").read_text())["archives_skipped"] == {"train": 2, "val": 1}
    # the CSVs are whole; the reader keeps the rows whose video is here and counts the others
    ds = Kinetics600(out)
    assert [v.video for v in ds.videos("train")] == [names[0]] and ds.missing["train"] == 3
    assert [v.video for v in ds.videos("val")] == [names[3]] and ds.missing["val"] == 2

    # prepare on the partial download: the absent videos are neither bad nor a failure
    pcfg = _cfg(tmp_path, {"prepare.k600.workers": 1})
    run_prepare(pcfg, "k600")
    assert "(0 videos skipped)" in capsys.readouterr().out
    report = json.loads((tmp_path / "out" / "prepare" / "k600" / "report.json").read_text())
    assert {s: (r["videos"], r["ok"], r["skipped"], r["not_downloaded"]) for s, r in report["splits"].items()} == {
        "train": (1, 1, 0, 3), "val": (1, 1, 0, 2)}

    # back to null: the rest is fetched; the lists, CSVs and the kept first archives are not transferred again
    server.log.clear()
    D.run_download(_k600_cfg(server, tmp_path, max_archives=None), "k600")
    printed = capsys.readouterr().out
    assert sorted(p for p, _ in server.log) == ["/k600/train/part_1.tar.gz", "/k600/train/part_2.tar.gz",
                                                "/k600/val/part_1.tar.gz"]
    assert printed.splitlines()[-1] == f"download k600: {out}"
    assert sorted(p.name for p in (out / "k600").rglob("*.mp4")) == sorted(names)
    assert json.loads((out / "source.json").read_text())["archives_skipped"] == {"train": 0, "val": 0}


def test_k600_max_archives_lowered_after_an_interrupted_run_drops_its_extra_archives(server, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(F.LOCK_ENV, str(tmp_path / "lock.json"))
    names = _k600_server(server, tmp_path, {"train": 3})
    del server.files["/k600/train/part_2.tar.gz"]  # the first run stops there, with parts 0 and 1 extracted
    with pytest.raises(NbpError, match="HTTP 404"):
        D.run_download(_k600_cfg(server, tmp_path, splits=["train"]), "k600")
    assert len(list((tmp_path / "out" / "archives" / "k600" / "extracted").glob("*.ok"))) == 2
    capsys.readouterr()
    server.log.clear()
    D.run_download(_k600_cfg(server, tmp_path, splits=["train"], max_archives={"train": 1}), "k600")
    assert "1 archives extracted by an interrupted run are not wanted now" in capsys.readouterr().out
    assert server.log == []  # part 0 is re-extracted from the kept archive
    out = tmp_path / "out" / "download" / "k600"
    assert [p.name for p in (out / "k600").rglob("*.mp4")] == [names[0]]


def test_k600_local_copy_is_linked_whole_whatever_max_archives_says(tmp_path, capsys):
    local = tmp_path / "K600-local" / "k600"
    for name in ("annotations/train.csv", "train/a/x_000000_000010.mp4", "train/b/y_000000_000010.mp4"):
        (local / name).parent.mkdir(parents=True, exist_ok=True)
        (local / name).write_bytes(b"")
    D.run_download(_cfg(tmp_path, {"download.k600.root": str(local.parent), "download.k600.max_archives": {"train": 1}}),
                   "k600")
    assert "max_archives does not apply to a local copy (root); it is linked whole" in capsys.readouterr().out
    out = tmp_path / "out" / "download" / "k600"
    assert (out / "k600").is_symlink() and len(list((out / "k600" / "train").rglob("*.mp4"))) == 2


@pytest.mark.parametrize("value, key, says", [
    ({"train": -1}, "download.k600.max_archives.train", "must be >= 0, got -1"),
    ({"test": 1}, "download.k600.max_archives.test", "not a split of this entry (download.k600.splits: train, val)"),
    ({"train": "one"}, "download.k600.max_archives.train", "expected integer, got str 'one'"),
    ({"train": True}, "download.k600.max_archives.train", "expected integer, got bool True"),
    ({"train": 1.5}, "download.k600.max_archives.train", "expected integer, got float 1.5"),
    ([1], "download.k600.max_archives", "expected object/null, got list [1]"),
], ids=["negative", "unknown split", "string", "bool", "float", "list"])
def test_bad_max_archives_is_one_line_naming_the_key(tmp_path, value, key, says):
    from nbp.config import ConfigError

    with pytest.raises(ConfigError) as e:
        _cfg(tmp_path, {"download.k600.max_archives": value})
    assert (e.value.key, e.value.problem) == (key, says)


def test_max_archives_on_another_source_is_refused_by_nbp_check(tmp_path):
    params = tmp_path / "params.yaml"
    text = (REPO / "params.yaml").read_text()
    line = "      splits: https://www.crcv.ucf.edu/data/UCF101/UCF101TrainTestSplits-RecognitionTask.zip\n"
    assert line in text
    params.write_text(text.replace(line, line + "    max_archives: {train: 1}\n", 1))
    done = subprocess.run([sys.executable, "-m", "nbp", "check", "--params", str(params)], capture_output=True, text=True,
                          cwd=tmp_path)
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [
        f"nbp: error: {params}: download.ucf101.max_archives: applies to the k600 source only (this entry's source is "
        "'ucf101')"]
    params.write_text(text.replace("    splits: [train, val]\n", "    splits: [train, val]\n    max_archives: {train: 2}\n", 1))
    done = subprocess.run([sys.executable, "-m", "nbp", "check", "--params", str(params)], capture_output=True, text=True,
                          cwd=tmp_path)
    assert "max_archives" not in done.stderr, done.stderr


def test_cli_dry_run_flag(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text((REPO / "params.yaml").read_text().replace("out: out", f"out: {tmp_path / 'out'}", 1))
    done = subprocess.run([sys.executable, "-m", "nbp", "download", "--dry-run", "--params", str(params)],
                          capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "dry run" in done.stdout and "would generate" in done.stdout and not (tmp_path / "out").exists()


def test_local_copy_is_linked_not_fetched(tmp_path):
    local = tmp_path / "UCF101-local"
    (local / "UCF-101" / "YoYo").mkdir(parents=True)
    (local / "UCF-101" / "YoYo" / "v_YoYo_g01_c01.avi").write_bytes(b"")
    (local / "ucfTrainTestlist").mkdir()
    (local / "ucfTrainTestlist" / "classInd.txt").write_text("1 YoYo\n")
    (local / "ucfTrainTestlist" / "testlist01.txt").write_text("YoYo/v_YoYo_g01_c01.avi\n")
    D.run_download(_cfg(tmp_path, {"download.ucf101.root": str(local)}), "ucf101")
    out = tmp_path / "out" / "download" / "ucf101"
    assert (out / "UCF-101").is_symlink() and UCF101(out).videos("val")[0].class_text == "yo yo"
    with pytest.raises(NbpError, match="not a k600 layout"):
        D.run_download(_cfg(tmp_path, {"download.k600.root": str(local)}), "k600")
