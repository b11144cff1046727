"""The fetch_lpips stage and the LPIPS metric against the lpips package.

The VGG16 file is served by a loopback HTTP server (random weights in torchvision's format, under a name that
carries its sha256 prefix, as torchvision's does); the LPIPS heads come from a wheel made here (pip downloads it
from a local path or the loopback server), and once from the pinned lpips wheel on PyPI. The known answers are the
lpips package's own distances (tests/fixtures/make_lpips_reference.py)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import socket
import stat
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from test_data_download import Server

from nbp import dag
from nbp.cli import main
from nbp.config import load_config
from nbp.data import fetch as F
from nbp.errors import NbpError
from nbp.metrics import LPIPS_LIN_MEMBER, LPIPS_LIN_SHA256, LPIPS_PACKAGE, LPIPS_WHEEL_SHA256
from nbp.metrics import lpips_weights as W
from nbp.metrics.image import load_lpips, lpips, lpips_available

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "fixtures"
sys.path.insert(0, str(FIXTURES))
import make_lpips_reference as R  # noqa: E402

REFERENCE = np.load(FIXTURES / "lpips_reference.npz")
NEEDS = {"train_tokenizer.embedded.perceptual": "lpips"}  # the embedded run, with the paper's perceptual loss


def _torch_bytes(arrays: dict[str, np.ndarray], legacy: bool = False) -> bytes:
    buf = io.BytesIO()
    torch.save({k: torch.from_numpy(v) for k, v in arrays.items()}, buf, _use_new_zipfile_serialization=not legacy)
    return buf.getvalue()


@pytest.fixture(scope="module")
def vgg_file() -> tuple[bytes, str]:
    """Seeded VGG16 ``features`` weights as torchvision's (legacy-format) state dict file, and its sha256."""
    data = _torch_bytes(R.vgg_state(), legacy=True)
    return data, hashlib.sha256(data).hexdigest()


HEADS = _torch_bytes(R.seeded_heads())
HEADS_SHA = hashlib.sha256(HEADS).hexdigest()


def make_wheel(path: Path, member: bytes | None = HEADS, link: bool = False) -> str:
    """A minimal lpips wheel (a zip with dist-info) holding ``member`` as lpips/weights/v0.1/vgg.pth; -> sha256."""
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("lpips/__init__.py", "")
        if member is not None and not link:
            z.writestr(LPIPS_LIN_MEMBER, member)
        elif link:  # a symbolic link where the heads should be
            info = zipfile.ZipInfo(LPIPS_LIN_MEMBER)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            z.writestr(info, "/etc/passwd")
        z.writestr("lpips-0.1.4.dist-info/METADATA", "Metadata-Version: 2.1\nName: lpips\nVersion: 0.1.4\n")
        z.writestr("lpips-0.1.4.dist-info/WHEEL", "Wheel-Version: 1.0\nGenerator: nbp-tests\nRoot-Is-Purelib: true\n"
                                                  "Tag: py3-none-any\n")
        z.writestr("lpips-0.1.4.dist-info/RECORD", "")
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def server(monkeypatch):
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("NBP_PROGRESS", "0")
    monkeypatch.setattr(F.time, "sleep", lambda s: None)  # retries without waiting
    s = Server()
    yield s
    s.close()


@pytest.fixture
def repo(tmp_path, monkeypatch):
    """A params file of our own (so the checksum lock beside it is this test's), no LPIPS env vars."""
    monkeypatch.delenv("NBP_LPIPS_VGG", raising=False)
    monkeypatch.delenv("NBP_LPIPS_LIN", raising=False)
    monkeypatch.delenv("NBP_CHECKSUMS_LOCK", raising=False)
    shutil.copyfile(REPO / "params.yaml", tmp_path / "params.yaml")
    return tmp_path


def cfg_of(repo: Path, **over):
    return load_config(repo / "params.yaml", {"run.out": str(repo / "out"), **over})


def served(server: Server, data: bytes, sha: str, tag: str = "") -> str:
    path = f"/models{tag}/vgg16-{sha[:8]}.pth"
    server.files[path] = data
    return server.url + path


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def lock_entries(repo: Path) -> dict:
    path = repo / "workflow" / "checksums.lock.json"
    return json.loads(path.read_text())["files"] if path.is_file() else {}


# --------------------------------------------------------------------------------------
# nothing selected needs LPIPS: nothing fetched


def test_the_embedded_params_fetch_nothing(repo, server):
    cfg = cfg_of(repo, **{"fetch_lpips.vgg_url": server.url + "/models/vgg16-397923af.pth",
                          "fetch_lpips.package": str(repo / "no-such.whl")})
    assert W.needed_by(cfg) == []
    folder = W.run_fetch_lpips(cfg)
    assert server.log == [] and sorted(p.name for p in folder.iterdir()) == [W.MANIFEST]
    made = json.loads((folder / W.MANIFEST).read_text())
    assert made["needed"] is False and made["files"] == {} and "perceptual: lpips" in made["why_not"]
    assert made["params"] == W.stage_params(cfg) and not lpips_available(folder=folder)
    # the declared outputs are the same whether anything is fetched or not: the folder
    assert dag.all_outputs(cfg, "fetch_lpips", None) == dag.all_outputs(cfg_of(repo, **NEEDS), "fetch_lpips", None) \
        == [str(folder)]
    # the paper suites' tokenizers need it: for the perceptual loss and for Table 7's LPIPS
    paper = cfg_of(repo, **{"run.datasets": ["ucf101"], "run.tokenizers": ["ucf101"], "run.generators": []})
    assert W.needed_by(paper) == ["train_tokenizer.ucf101.perceptual: lpips",
                                  "eval_tokenizer.ucf101: Table 7's LPIPS (ucf101 data; fetch_lpips.for_eval: auto)"]
    assert W.needed_by(cfg_of(repo, **{"fetch_lpips.for_eval": "always"})) == [
        "eval_tokenizer.embedded: Table 7's LPIPS (embedded data; fetch_lpips.for_eval: always)"]


def test_train_and_eval_tokenizer_read_the_stage_folder():
    for stage in ("train_tokenizer", "eval_tokenizer"):
        assert ("lpips", "fetch_lpips") in {(u.role, u.stage) for u in dag.BY_NAME[stage].upstream}
    assert dag.BY_NAME["fetch_lpips"].is_global and dag.BY_NAME["fetch_lpips"].params == ("fetch_lpips", "run.tokenizers")


# --------------------------------------------------------------------------------------
# fetched, checksummed, loadable; the known answer


def test_vgg16_from_a_loopback_server_and_heads_from_a_wheel(repo, server, vgg_file, monkeypatch):
    data, sha = vgg_file
    url = served(server, data, sha)
    server.drops[url.removeprefix(server.url)] = [len(data) // 3]  # the connection breaks once: the download resumes
    wheel = repo / "lpips-0.1.4-py3-none-any.whl"
    wheel_sha = make_wheel(wheel)
    cfg = cfg_of(repo, **NEEDS, **{"fetch_lpips.vgg_url": url, "fetch_lpips.package": str(wheel),
                                   "fetch_lpips.wheel_sha256": wheel_sha, "fetch_lpips.lin_sha256": HEADS_SHA})
    folder = W.run_fetch_lpips(cfg)
    assert [r for _, r in server.log] == [None, f"bytes={len(data) // 3}-"]
    vgg, lin = folder / "vgg16.pth", folder / "lpips_vgg.pth"
    assert vgg.read_bytes() == data and lin.read_bytes() == HEADS
    assert lock_entries(repo)[url] == {"sha256": sha, "size": len(data)}  # the full sha256, recorded at first download
    made = json.loads((folder / W.MANIFEST).read_text())
    assert made["needed_by"] == ["train_tokenizer.embedded.perceptual: lpips"]
    assert made["files"]["vgg"] == {"file": "vgg16.pth", "source": url, "sha256": sha}
    assert made["files"]["lin"]["sha256"] == HEADS_SHA
    # what the tokenizer stages load (their `lpips` input is this folder); the package's own distances
    assert lpips_available(folder=folder) and load_lpips(folder=folder) is not None
    a, b = (torch.from_numpy(x) for x in R.frames())
    np.testing.assert_allclose(lpips(a, b, folder=folder).double().numpy(), REFERENCE["seeded_heads"], rtol=1e-5)
    # the environment still overrides the fetched files; when it gives both, the stage fetches nothing
    monkeypatch.setenv("NBP_LPIPS_LIN", str(repo / "elsewhere.pth"))
    with pytest.raises(NbpError, match="elsewhere.pth"):
        load_lpips(folder=folder)
    monkeypatch.setenv("NBP_LPIPS_LIN", str(lin))
    monkeypatch.setenv("NBP_LPIPS_VGG", str(vgg))
    shutil.copytree(folder, repo / "given")
    monkeypatch.setenv("NBP_LPIPS_LIN", str(repo / "given" / "lpips_vgg.pth"))
    monkeypatch.setenv("NBP_LPIPS_VGG", str(repo / "given" / "vgg16.pth"))
    server.log.clear()
    W.run_fetch_lpips(cfg)
    made = json.loads((folder / W.MANIFEST).read_text())
    assert server.log == [] and sorted(p.name for p in folder.iterdir()) == [W.MANIFEST] and made["files"] == {}
    assert "NBP_LPIPS_VGG" in made["supplied_by"] and lpips_available(folder=folder)
    monkeypatch.delenv("NBP_LPIPS_LIN")
    monkeypatch.delenv("NBP_LPIPS_VGG")
    W.run_fetch_lpips(cfg)  # the environment no longer gives them: back in the output, from the kept download
    assert server.log == [] and vgg.read_bytes() == data and lpips_available(folder=folder)
    # a rerun (e.g. another tokenizer selected) keeps the verified files: nothing downloaded again
    server.log.clear()
    W.run_fetch_lpips(cfg)
    assert server.log == [] and vgg.read_bytes() == data
    # nothing needs LPIPS for a while (another suite selected): the weights leave the output, the download is kept
    # beside the rolling state and, needed again, verified against the lock instead of downloaded
    off = cfg_of(repo, **{"fetch_lpips.vgg_url": url, "fetch_lpips.package": str(wheel),
                          "fetch_lpips.wheel_sha256": wheel_sha, "fetch_lpips.lin_sha256": HEADS_SHA})
    W.run_fetch_lpips(off)
    assert sorted(p.name for p in folder.iterdir()) == [W.MANIFEST]
    W.run_fetch_lpips(cfg)
    assert server.log == [] and vgg.read_bytes() == data


def test_known_answer_against_the_lpips_package(tmp_path):
    """Ours against the package's network built from the same weights: seeded heads, and the real v0.1 heads taken
    from the pinned lpips wheel (PyPI, with the pinned sha256s)."""
    vgg = tmp_path / "vgg16.pth"
    vgg.write_bytes(_torch_bytes(R.vgg_state()))
    (tmp_path / "seeded.pth").write_bytes(HEADS)
    a, b = (torch.from_numpy(x) for x in R.frames())
    ours = lpips(a, b, vgg=vgg, lin=tmp_path / "seeded.pth").double().numpy()
    np.testing.assert_allclose(ours, REFERENCE["seeded_heads"], rtol=1e-5)
    assert float(lpips(a, a, vgg=vgg, lin=tmp_path / "seeded.pth").abs().max()) == 0.0
    real = tmp_path / "lpips_vgg.pth"
    try:
        W.fetch_lin_heads(real, path=None, package=LPIPS_PACKAGE, wheel_sha256=LPIPS_WHEEL_SHA256, sha256=LPIPS_LIN_SHA256)
    except NbpError as e:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"the lpips wheel from PyPI: {e}", pytrace=False)
        pytest.skip(f"no PyPI: {e}")
    assert str(REFERENCE["real_heads_sha256"]) == LPIPS_LIN_SHA256 == hashlib.sha256(real.read_bytes()).hexdigest()
    ours = lpips(a, b, vgg=vgg, lin=real).double().numpy()
    np.testing.assert_allclose(ours, REFERENCE["real_heads"], rtol=1e-5)


# --------------------------------------------------------------------------------------
# refused: corrupted downloads, wrong wheels, no network


def test_a_corrupted_download_is_refused_and_leaves_no_output(repo, server, vgg_file):
    data, sha = vgg_file
    bad = bytearray(data)
    bad[len(bad) // 2] ^= 0xFF
    url = served(server, bytes(bad), sha)  # the name carries the good file's hash prefix
    wheel = repo / "lpips-0.1.4-py3-none-any.whl"
    over = {**NEEDS, "fetch_lpips.vgg_url": url, "fetch_lpips.package": str(wheel),
            "fetch_lpips.wheel_sha256": make_wheel(wheel), "fetch_lpips.lin_sha256": HEADS_SHA}
    cfg = cfg_of(repo, **over)
    with pytest.raises(NbpError, match=r"fetch_lpips\.vgg_url: .*does not start with the [0-9a-f]{8} its name carries") as e:
        W.run_fetch_lpips(cfg)
    assert "\n" not in str(e.value)
    assert not (repo / "out" / "fetch_lpips").exists() and url not in lock_entries(repo)  # nothing recorded either
    state = dag.resolve(cfg, "fetch_lpips", None).state
    assert (state / f"vgg16-{sha[:8]}.pth.corrupt").is_file() and not (state / f"vgg16-{sha[:8]}.pth").exists()
    # once the good file is recorded in the lock, a later corrupted copy fails the full sha256
    server.files[url.removeprefix(server.url)] = data
    W.run_fetch_lpips(cfg)
    shutil.rmtree(repo / "out")
    server.files[url.removeprefix(server.url)] = bytes(bad)
    with pytest.raises(NbpError, match=r"fetch_lpips\.vgg_url: .*sha256 .* does not match .*checksums\.lock\.json"):
        W.run_fetch_lpips(cfg)
    assert not (repo / "out" / "fetch_lpips").exists()
    # a VGG file that is not a VGG16 state dict (right checksum, wrong content) is refused too
    other = _torch_bytes({"features.0.weight": np.zeros((8, 3, 3, 3), np.float32)})
    url2 = served(server, other, hashlib.sha256(other).hexdigest(), tag="/b")
    with pytest.raises(NbpError, match=r"fetch_lpips\.vgg_url: .*features\.0\.weight is \[8, 3, 3, 3\]"):
        W.run_fetch_lpips(cfg_of(repo, **{**over, "fetch_lpips.vgg_url": url2}))
    assert not (repo / "out" / "fetch_lpips").exists()


def test_the_wheel_is_checked_served_or_local(repo, server, tmp_path):
    dest = tmp_path / "heads.pth"
    wheel = tmp_path / "lpips-0.1.4-py3-none-any.whl"
    wheel_sha = make_wheel(wheel)
    server.files["/w/lpips-0.1.4-py3-none-any.whl"] = wheel.read_bytes()
    url = server.url + "/w/lpips-0.1.4-py3-none-any.whl"
    assert W.fetch_lin_heads(dest, path=None, package=url, wheel_sha256=wheel_sha, sha256=HEADS_SHA) == HEADS_SHA
    assert dest.read_bytes() == HEADS and server.log[-1][0] == "/w/lpips-0.1.4-py3-none-any.whl"
    dest.unlink()
    with pytest.raises(NbpError, match=r"fetch_lpips\.wheel_sha256: .*does not match the expected 00"):
        W.fetch_lin_heads(dest, path=None, package=str(wheel), wheel_sha256="00" * 32, sha256=HEADS_SHA)
    with pytest.raises(NbpError, match=r"fetch_lpips\.lin_sha256: .*vgg\.pth: sha256 .* does not match"):
        W.fetch_lin_heads(dest, path=None, package=str(wheel), wheel_sha256=wheel_sha, sha256="11" * 32)
    assert not dest.exists()
    for kind, kw, says in (("missing", {"member": None}, "no lpips/weights/v0.1/vgg.pth inside the wheel"),
                           ("link", {"link": True}, "is not a regular file")):
        w = tmp_path / kind / "lpips-0.1.4-py3-none-any.whl"
        w.parent.mkdir()
        sha = make_wheel(w, **kw)
        with pytest.raises(NbpError, match=says):
            W.fetch_lin_heads(dest, path=None, package=str(w), wheel_sha256=sha, sha256=None)
        assert not dest.exists()
    w = tmp_path / "torn" / "lpips-0.1.4-py3-none-any.whl"
    w.parent.mkdir()
    body = bytearray(wheel.read_bytes())
    body[body.index(HEADS) + 100] ^= 0xFF  # a flipped byte inside the stored member: its CRC-32 fails
    w.write_bytes(bytes(body))
    with pytest.raises(NbpError, match="not a readable wheel .*CRC"):
        W.extract_member(w, LPIPS_LIN_MEMBER, dest, None)
    assert not dest.exists()
    w.write_bytes(b"PK\x03\x04 not a zip")
    with pytest.raises(NbpError, match="not a readable wheel"):
        W.extract_member(w, LPIPS_LIN_MEMBER, dest, None)
    assert not dest.exists()


def test_no_network_is_one_line_naming_the_file_to_supply(repo, monkeypatch, capsys):
    port = closed_port()
    monkeypatch.setattr(F.time, "sleep", lambda s: None)
    monkeypatch.setenv("NBP_PROGRESS", "0")
    argv = ["fetch_lpips", "--params", str(repo / "params.yaml"), "-S", f"run.out={repo / 'out'}",
            "-S", "train_tokenizer.embedded.perceptual=lpips",
            "-S", f"fetch_lpips.vgg_url=http://127.0.0.1:{port}/models/vgg16-397923af.pth"]
    assert main(argv) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "fetch_lpips.vgg_url: could not download http://127.0.0.1" in err[0], err
    assert "set fetch_lpips.vgg_path to a local copy of torchvision's VGG16 ImageNet weights (vgg16-397923af.pth)" in err[0]
    assert not (repo / "out" / "fetch_lpips").exists()
    # the heads: pip finds no index
    vgg = repo / "vgg16.pth"
    vgg.write_bytes(_torch_bytes(R.vgg_state()))
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    assert main([*argv, "-S", f"fetch_lpips.vgg_path={vgg}"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "fetch_lpips.package: could not download lpips==0.1.4" in err[0], err
    assert "set fetch_lpips.lin_path to a local copy of the LPIPS v0.1 heads" in err[0]
    assert not (repo / "out" / "fetch_lpips").exists()


def test_local_files_named_in_params(repo, tmp_path):
    vgg, lin = tmp_path / "my_vgg16.pth", tmp_path / "my_heads.pth"
    vgg.write_bytes(_torch_bytes(R.vgg_state()))
    lin.write_bytes(HEADS)
    over = {**NEEDS, "fetch_lpips.vgg_path": str(vgg), "fetch_lpips.lin_path": str(lin), "fetch_lpips.lin_sha256": HEADS_SHA,
            "fetch_lpips.vgg_url": f"http://127.0.0.1:{closed_port()}/never.pth"}
    folder = W.run_fetch_lpips(cfg_of(repo, **over))
    assert (folder / "lpips_vgg.pth").read_bytes() == HEADS and lpips_available(folder=folder)
    assert json.loads((folder / W.MANIFEST).read_text())["files"]["vgg"]["source"] == str(vgg)
    shutil.rmtree(folder)
    # the pinned sha256 of the real heads does not match these seeded ones
    with pytest.raises(NbpError, match=r"fetch_lpips\.lin_path: .*my_heads\.pth: sha256 .* does not match"):
        W.run_fetch_lpips(cfg_of(repo, **{**over, "fetch_lpips.lin_sha256": LPIPS_LIN_SHA256}))
    assert not folder.exists()
    with pytest.raises(NbpError, match=r"fetch_lpips\.vgg_path: .*nowhere\.pth: no such file"):
        W.run_fetch_lpips(cfg_of(repo, **{**over, "fetch_lpips.vgg_path": str(tmp_path / "nowhere.pth")}))
    assert not folder.exists()


# --------------------------------------------------------------------------------------
# the tokenizer stages use the fetched files


def test_tokenizer_training_and_evaluation_use_the_fetched_weights(repo, tmp_path, monkeypatch):
    """perceptual: lpips trains with fetch_lpips's files and eval_tokenizer fills Table 7's LPIPS from them; with
    only the stage's marker output the loss is refused in one line naming the stage to run."""
    from test_tokenizer_eval import FakeI3D
    from test_tokenizer_train import make_clip_cache, overrides

    import nbp.metrics.fvd as fvd
    from nbp.metrics.detector import I3D_FILENAME
    from nbp.tokenizer.evaluate import run_eval_tokenizer
    from nbp.tokenizer.train import run_train_tokenizer

    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setenv("NBP_PROGRESS", "0")
    out = repo / "out"
    make_clip_cache(out / "prepare" / "embedded", n_train=4, n_val=2, frames=17)
    (out / "fetch_detector").mkdir(parents=True)
    (out / "fetch_detector" / I3D_FILENAME).write_bytes(b"stand-in")
    monkeypatch.setattr(fvd, "get_i3d", lambda weights=None, device="cpu": FakeI3D())
    o = overrides(out, steps=2, disc="none", batch_size=2, train_frames=5)
    o.update({"prepare.embedded.frames": 17, "eval_tokenizer.embedded.num_videos": 2, "eval_tokenizer.embedded.batch_size": 2,
              "eval_tokenizer.embedded.grid_videos": 2})
    W.run_fetch_lpips(load_config(repo / "params.yaml", o))  # nothing needs LPIPS here yet: a manifest only
    cfg = load_config(repo / "params.yaml", {**o, **NEEDS})
    with pytest.raises(NbpError, match=r"perceptual 'lpips': LPIPS weights unavailable: .*fetch_lpips has none: run "
                                       r"`nbp fetch_lpips`"):
        run_train_tokenizer(cfg, "embedded")
    vgg, lin = tmp_path / "vgg.pth", tmp_path / "heads.pth"
    vgg.write_bytes(_torch_bytes(R.vgg_state()))
    lin.write_bytes(HEADS)
    local = {"fetch_lpips.vgg_path": str(vgg), "fetch_lpips.lin_path": str(lin), "fetch_lpips.lin_sha256": HEADS_SHA}
    W.run_fetch_lpips(load_config(repo / "params.yaml", {**o, **NEEDS, **local}))
    run_train_tokenizer(cfg, "embedded")
    history = (out / "train_tokenizer" / "embedded" / "history.csv").read_text().splitlines()
    assert "perceptual" in history[0]
    run_eval_tokenizer(cfg, "embedded")
    m = json.loads((out / "eval_tokenizer" / "embedded" / "metrics.json").read_text())
    assert isinstance(m["lpips"], float) and 0 < m["lpips"] < 1, m["lpips"]
