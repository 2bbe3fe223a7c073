"""Verified downloads against a real HTTP server on 127.0.0.1 that misbehaves on purpose."""

from __future__ import annotations

import dataclasses
import errno
import gzip
import hashlib
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import make_arrays
from mirror_server import BAD_MODES, MirrorServer

from mnistlab.cli import main
from mnistlab.data import download, registry
from mnistlab.data.dataset import load_dataset
from mnistlab.data.download import DiskError, DownloadError, download_file
from mnistlab.data.idx import encode_idx
from mnistlab.data.registry import DatasetSpec, FileSpec
from mnistlab.data.resolve import cache_root, fetch, locate, verify_folder

FAST = dict(attempts=2, backoff=0.01, timeout=5.0, show_progress=False)


@pytest.fixture(scope="module")
def archives() -> dict[str, bytes]:
    """The four .gz files of a small synthetic dataset, as a mirror would serve them."""
    return {f"{stem}.gz": gzip.compress(encode_idx(a), mtime=0) for stem, a in make_arrays().items()}


@pytest.fixture
def spec(archives, server) -> DatasetSpec:
    files = tuple(
        FileSpec(name.removesuffix(".gz"), hashlib.sha256(body).hexdigest(), len(body))
        for name, body in archives.items()
    )
    return DatasetSpec(name="tinymnist", description="synthetic", source="tests",
                       classes=tuple("0123456789"), files=files,
                       mirrors=(server.url("html200"), server.url("good")), train_count=200, test_count=50)


@pytest.fixture
def server(archives):
    with MirrorServer(archives) as s:
        yield s


def _part_files(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.endswith(".part")]


def _assert_good(path: Path, body: bytes) -> None:
    assert path.read_bytes() == body
    assert not _part_files(path.parent)


@pytest.mark.parametrize("mode", BAD_MODES)
def test_bad_mirror_then_good_mirror_gives_verified_file(tmp_path, server, spec, archives, mode):
    f = spec.files[0]
    out = download_file(f, tmp_path, [server.url(mode), server.url("good")], log=lambda m: None, **FAST)
    _assert_good(out, archives[out.name])
    # transient faults (5xx, a connection cut mid-body) are retried; a mirror serving bad bytes is not
    retryable = mode in ("503", "reset")
    assert server.requests[f"/{mode}/{out.name}"] == (FAST["attempts"] if retryable else 1)
    assert server.requests[f"/good/{out.name}"] == 1


@pytest.mark.parametrize("mode", BAD_MODES)
def test_only_bad_mirrors_leave_no_final_file(tmp_path, server, spec, mode):
    f = spec.files[0]
    with pytest.raises(DownloadError, match="could not download"):
        download_file(f, tmp_path, [server.url(mode)], log=lambda m: None, **FAST)
    assert not (tmp_path / f"{f.stem}.gz").exists()
    assert not _part_files(tmp_path)


def test_failure_message_names_every_mirror_and_offline_choices(tmp_path, server, spec):
    with pytest.raises(DownloadError) as e:
        download_file(spec.files[1], tmp_path, [server.url("403"), server.url("html200")],
                      log=lambda m: None, **FAST)
    text = str(e.value)
    assert "HTTP 403" in text and "HTML" in text and "--dataset digits" in text


def test_download_then_valid_cache_makes_zero_requests(server, spec, archives):
    label, folder = locate(spec)
    assert label == "downloaded" and folder == cache_root() / "tinymnist"
    for name, body in archives.items():
        _assert_good(folder / name, body)
    before = sum(server.requests.values())
    assert locate(spec) == ("cache", folder)
    assert sum(server.requests.values()) == before


def test_flipped_byte_in_cache_is_detected_and_fetched_again(server, spec, archives):
    _, folder = locate(spec)
    victim = folder / "t10k-images-idx3-ubyte.gz"
    data = bytearray(victim.read_bytes())
    data[100] ^= 0x01
    victim.write_bytes(bytes(data))
    server.requests.clear()
    assert locate(spec)[0] == "downloaded"
    _assert_good(victim, archives[victim.name])
    fetched = {p for p, n in server.requests.items() if n and p.startswith("/good/")}
    assert fetched == {"/good/t10k-images-idx3-ubyte.gz"}  # only the damaged file


def test_half_written_cache_file_is_fetched_again(server, spec, archives):
    _, folder = locate(spec)
    victim = folder / "train-images-idx3-ubyte.gz"
    victim.write_bytes(archives[victim.name][:500])
    locate(spec)
    _assert_good(victim, archives[victim.name])


def test_damaged_cache_while_offline_is_a_clear_error(server, spec):
    _, folder = locate(spec)
    (folder / "train-labels-idx1-ubyte.gz").write_bytes(b"<html>oops</html>")
    with pytest.raises(Exception, match="(?s)damaged.*--dataset digits"):
        locate(spec, offline=True)


def test_a_failed_mirror_is_tried_last_for_the_remaining_files(tmp_path, server, spec, archives):
    from mnistlab.data.resolve import fetch

    spec = dataclasses.replace(spec, mirrors=(server.url("503"), server.url("good")))
    fetch(spec, tmp_path, **FAST)
    names = sorted(archives)
    for name, body in archives.items():
        _assert_good(tmp_path / name, body)
    dead = [server.requests[f"/503/{n}"] for n in names]
    assert sum(dead) == FAST["attempts"]  # all its attempts went to the first file, none to the other three
    assert all(server.requests[f"/good/{n}"] == 1 for n in names)


def test_concurrent_downloads_of_one_dataset_both_succeed(tmp_path, server, spec, archives):
    """Two fetches of the same files overlap (the mirror answers only once both have asked), each into
    its own .part: with one shared .part, the first rename pulled the file from under the second."""
    spec = dataclasses.replace(spec, mirrors=(server.url("together"),))
    with ThreadPoolExecutor(2) as pool:
        jobs = [pool.submit(fetch, spec, tmp_path, **FAST) for _ in range(2)]
        assert [j.result() for j in jobs] == [tmp_path, tmp_path]
    assert all(c.ok and c.hashed for c in verify_folder(tmp_path, spec))
    for name, body in archives.items():
        _assert_good(tmp_path / name, body)
        assert server.requests[f"/together/{name}"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(archives)


def test_stale_part_of_a_killed_download_is_removed_and_a_live_one_kept(tmp_path, server, spec, archives):
    f = spec.files[1]
    stale, live = tmp_path / f".{f.stem}.gz.0123456789ab.part", tmp_path / f".{f.stem}.gz.ba9876543210.part"
    for p in (stale, live):
        p.write_bytes(b"partial")
    two_hours_ago = time.time() - 7200
    os.utime(stale, (two_hours_ago, two_hours_ago))
    download_file(f, tmp_path, [server.url("good")], log=lambda m: None, **FAST)
    assert not stale.exists() and live.exists()


class _FullDisk:
    """A file whose every write fails as a full disk does."""

    def __init__(self, out, err: int):
        self.out, self.err = out, err

    def write(self, data: bytes) -> int:
        raise OSError(self.err, os.strerror(self.err))

    def __getattr__(self, name):
        return getattr(self.out, name)


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EDQUOT, errno.EROFS])
def test_disk_error_while_writing_is_reported_at_once_not_retried(tmp_path, server, spec, monkeypatch, err):
    real_create = download._create_part

    def create_full(final, file_spec):
        part, out = real_create(final, file_spec)
        return part, _FullDisk(out, err)

    monkeypatch.setattr(download, "_create_part", create_full)
    f = spec.files[0]
    with pytest.raises(DiskError) as e:
        download_file(f, tmp_path, [server.url("good"), server.url("503")], log=lambda m: None, **FAST)
    message = str(e.value)
    assert message.startswith(f"cannot write {tmp_path / f'{f.stem}.gz'}: {os.strerror(err)}")
    assert "\n" not in message
    assert ("MB needed" in message) == (err != errno.EROFS)
    assert sum(server.requests.values()) == 1  # no retry, no second mirror
    assert list(tmp_path.iterdir()) == []  # its .part removed


@pytest.mark.parametrize("err", [errno.EACCES, errno.EROFS])
def test_unwritable_cache_folder_fails_before_any_request(tmp_path, server, spec, monkeypatch, err):
    def refuse(path, mode="r", *args, **kwargs):
        raise OSError(err, os.strerror(err), str(path))

    monkeypatch.setattr(download, "open", refuse, raising=False)  # shadows the builtin in download.py only
    with pytest.raises(DiskError, match=f"^cannot write {tmp_path}: {os.strerror(err)}$"):
        download_file(spec.files[0], tmp_path, [server.url("good")], log=lambda m: None, **FAST)
    assert sum(server.requests.values()) == 0


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only folder anyway")
def test_read_only_cache_folder_is_a_clear_error(tmp_path, server, spec):
    tmp_path.chmod(0o555)
    try:
        with pytest.raises(DiskError, match=f"cannot write {tmp_path}: Permission denied"):
            download_file(spec.files[0], tmp_path, [server.url("good")], log=lambda m: None, **FAST)
    finally:
        tmp_path.chmod(0o755)
    assert sum(server.requests.values()) == 0


def test_cli_reports_a_full_disk_in_one_line(server, spec, monkeypatch, capsys):
    def full(path, mode="r", *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(download, "open", full, raising=False)
    monkeypatch.setitem(registry.DATASETS, "mnist", spec)
    monkeypatch.setenv("MNISTLAB_MIRRORS", server.url("good"))
    assert main(["data", "fetch", "mnist"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[-1].startswith(f"mnistlab: error: cannot write {cache_root() / 'tinymnist'}: No space left on device")
    assert "Traceback" not in "\n".join(err)


def test_cli_fetch_uses_mirrors_from_environment(server, spec, archives, monkeypatch, capsys):
    """The real `data fetch` path, its mirrors pointed at the local server through the env var."""
    monkeypatch.setitem(registry.DATASETS, "mnist", spec)
    monkeypatch.setenv("MNISTLAB_MIRRORS", f"{server.url('html200')},{server.url('good')}")
    assert main(["data", "fetch", "mnist"]) == 0
    folder = cache_root() / "tinymnist"
    assert "verified" in capsys.readouterr().out
    for name, body in archives.items():
        _assert_good(folder / name, body)
    ds = load_dataset("mnist")
    assert (len(ds.train_labels) + len(ds.val_labels), len(ds.test_labels)) == (200, 50)
    assert main(["data", "verify", "mnist"]) == 0


# ---- no network: stop at once --------------------------------------------------------------------------

def _closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (bound, then released): connecting is refused."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_name_that_does_not_resolve_fails_at_once_without_retries(tmp_path, spec):
    logged = []
    t0 = time.perf_counter()
    with pytest.raises(DownloadError) as e:  # the real backoff: 3 attempts would wait 1 + 2 s
        download_file(spec.files[0], tmp_path, ["http://nonexistent.invalid/"], attempts=3, backoff=1.0,
                      show_progress=False, log=logged.append)
    assert time.perf_counter() - t0 < 0.9
    assert logged == [] and "does not resolve" in str(e.value) and "Offline choices" in str(e.value)


def test_a_refused_connection_moves_to_the_next_mirror_without_retries(tmp_path, server, spec, archives):
    logged = []
    t0 = time.perf_counter()
    out = download_file(spec.files[0], tmp_path, [f"http://127.0.0.1:{_closed_port()}/", server.url("good")],
                        attempts=3, backoff=1.0, show_progress=False, log=logged.append)
    assert time.perf_counter() - t0 < 0.9
    _assert_good(out, archives[out.name])
    assert logged == []


def test_train_without_a_network_gives_the_offline_choices_at_once(tmp_path, monkeypatch, capsys):
    """Plain `mnistlab train` (no --offline) on a machine whose mirrors do not resolve: the hint, no retry lines."""
    import mnistlab.training  # noqa: F401  (its import is not what is timed)

    monkeypatch.setenv("MNISTLAB_MIRRORS", f"http://nonexistent.invalid/,http://127.0.0.1:{_closed_port()}/")
    t0 = time.perf_counter()
    assert main(["train", "--threads", "1", "--run-dir", str(tmp_path / "run")]) == 2
    assert time.perf_counter() - t0 < 1.5
    err = capsys.readouterr().err
    assert "Offline choices" in err and "retrying" not in err and "giving up" not in err, err
    assert not (tmp_path / "run").exists()
