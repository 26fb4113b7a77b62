"""Ram-mode downloads against the fault-injecting server (tests/faultserver.py).

Each test asserts the final outcome -- a verified file with the right bytes, or one specific error with a
one-line message naming the URL -- and that no unverified file is left where a verified one is expected.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from faultserver import Fault, FaultState, fault_server
from fetch_fixtures import fast_options, free_port, make_data

from bootkit.fetch import (
    ChecksumMismatch,
    ChecksumMissing,
    FetchError,
    FetchOptions,
    FetchTimeout,
    GaveUp,
    NotEnoughSpace,
    NotFound,
    RedirectError,
    RemoteChanged,
    SizeMismatch,
    download,
)
from bootkit.fetch.checksums import parse_sums
from bootkit.fetch.download import READ_SLICE
from bootkit.fetch.room import filesystem_type

SIZE = 3 * 1024 * 1024 + 12345
DATA = make_data(SIZE, seed=4)
NEW_DATA = make_data(SIZE, seed=5)
SHA = hashlib.sha256(DATA).hexdigest()


@pytest.fixture
def server() -> Iterator[tuple[str, FaultState]]:
    with fault_server() as (url, state):
        state.files["/img"] = DATA
        yield url, state


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_download_verified_with_progress_lines(
    server: tuple[str, FaultState], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    url, _state = server
    caplog.set_level(logging.INFO, logger="bootkit")
    dest = tmp_path / "img"
    result = download(f"{url}/img", str(dest), fast_options(verify="pinned", sha256=SHA.upper()))
    assert dest.read_bytes() == DATA
    assert (result.path, result.size, result.sha256, result.url) == (str(dest), SIZE, SHA, f"{url}/img")
    assert leftovers(tmp_path) == ["img"]
    assert any("SHA-256 verified" in r.getMessage() for r in caplog.records)


def test_progress_line_format(server: tuple[str, FaultState], tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    url, state = server
    # a trickle makes the transfer last several progress intervals
    state.add_faults("/img", Fault(trickle=256 * 1024, trickle_delay=0.1))
    caplog.set_level(logging.INFO, logger="bootkit")
    download(f"{url}/img", str(tmp_path / "img"), fast_options(progress_interval=0.1))
    lines = [r.getMessage() for r in caplog.records if "% " in r.getMessage()]
    assert lines, "no progress line was logged"
    pattern = r"fetch: \d+% [\d.]+ (B|KiB|MiB) of 3.0 MiB at [\d.]+ (B|KiB|MiB)/s(, \d+ s left)? \(http://\S+/img\)"
    for line in lines:
        assert re.fullmatch(pattern, line), line


def test_dropped_several_times_in_a_row_resumes(server: tuple[str, FaultState], tmp_path: Path) -> None:
    url, state = server
    state.add_faults("/img", Fault(drop_after=100_000), Fault(drop_after=700_000), Fault(drop_after=1_000_000))
    dest = tmp_path / "img"
    download(f"{url}/img", str(dest), fast_options(verify="pinned", sha256=SHA, retries=2))
    assert dest.read_bytes() == DATA
    requests = state.requests_for("/img")
    etag = state.etag("/img")
    # every resume asks for the rest, conditional on the version it started with
    assert [r.headers.get("Range") for r in requests] == [
        None,
        "bytes=100000-",
        "bytes=800000-",
        "bytes=1800000-",
    ]
    assert all(r.headers.get("If-Range") == etag for r in requests[1:])
    assert leftovers(tmp_path) == ["img"]


def test_drops_without_progress_give_up(server: tuple[str, FaultState], tmp_path: Path) -> None:
    url, state = server
    state.add_faults("/img", *[Fault(drop_after=0)] * 10)
    with pytest.raises(GaveUp, match=r"http://\S+/img: .*gave up after 3 attempts in a row"):
        download(f"{url}/img", str(tmp_path / "img"), fast_options(retries=2))
    assert len(state.requests_for("/img")) == 3
    assert leftovers(tmp_path) == []


def test_503_then_success(server: tuple[str, FaultState], tmp_path: Path) -> None:
    url, state = server
    state.add_faults("/img", Fault(status=503), Fault(status=503))
    download(f"{url}/img", str(tmp_path / "img"), fast_options(verify="pinned", sha256=SHA))
    assert (tmp_path / "img").read_bytes() == DATA
    assert len(state.requests_for("/img")) == 3


def test_503_forever(server: tuple[str, FaultState], tmp_path: Path) -> None:
    url, state = server
    state.add_faults("/img", *[Fault(status=503)] * 10)
    with pytest.raises(GaveUp) as info:
        download(f"{url}/img", str(tmp_path / "img"), fast_options(retries=3))
    assert str(info.value) == f"{url}/img: HTTP 503 Service Unavailable (gave up after 4 attempts in a row)"
    assert leftovers(tmp_path) == []


def test_stall_times_out_and_resumes(server: tuple[str, FaultState], tmp_path: Path) -> None:
    url, state = server
    state.add_faults("/img", Fault(stall_after=1_500_000, stall=6))
    download(f"{url}/img", str(tmp_path / "img"), fast_options(verify="pinned", sha256=SHA, timeout=2))
    assert (tmp_path / "img").read_bytes() == DATA
    # what arrived before the stall is kept, up to the slice in flight when the read timed out
    resumed_at = int(state.requests_for("/img")[1].headers["Range"].removeprefix("bytes=").rstrip("-"))
    assert 1_500_000 - READ_SLICE <= resumed_at <= 1_500_000


def test_slow_trickle_hits_total_time_limit(server: tuple[str, FaultState], tmp_path: Path) -> None:
    url, state = server
    state.add_faults("/img", Fault(trickle=4096, trickle_delay=0.05))
    with pytest.raises(FetchTimeout, match=r"/img: not done within the total time limit of 1 s"):
        download(f"{url}/img", str(tmp_path / "img"), fast_options(total_timeout=1))
    assert leftovers(tmp_path) == []


def test_file_replaced_mid_download_restarts_from_zero(server: tuple[str, FaultState], tmp_path: Path) -> None:
    url, state = server
    state.add_faults("/img", Fault(drop_after=1_000_000), Fault(replace=NEW_DATA))
    dest = tmp_path / "img"
    download(f"{url}/img", str(dest), fast_options())
    assert dest.read_bytes() == NEW_DATA  # never a splice of the two versions
    assert leftovers(tmp_path) == ["img"]


def test_file_replaced_mid_download_fails_pinned_hash(server: tuple[str, FaultState], tmp_path: Path) -> None:
    url, state = server
    state.add_faults("/img", Fault(drop_after=1_000_000), Fault(replace=NEW_DATA))
    with pytest.raises(ChecksumMismatch) as info:
        download(f"{url}/img", str(tmp_path / "img"), fast_options(verify="pinned", sha256=SHA))
    new_sha = hashlib.sha256(NEW_DATA).hexdigest()
    assert str(info.value) == (
        f"{url}/img: SHA-256 mismatch: got {new_sha}, expected {SHA} (pinned); the download was deleted"
    )
    assert leftovers(tmp_path) == []


def test_file_replaced_without_validators_restarts_from_zero(
    server: tuple[str, FaultState], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """No ETag, no Last-Modified: a same-size replacement cannot be detected, so nothing is ever resumed."""
    url, state = server
    state.validators = False
    state.add_faults("/img", Fault(drop_after=1_000_000), Fault(replace=NEW_DATA))
    caplog.set_level(logging.INFO, logger="bootkit")
    dest = tmp_path / "img"
    result = download(f"{url}/img", str(dest), fast_options())
    assert dest.read_bytes() == NEW_DATA  # not DATA[:1_000_000] + NEW_DATA[1_000_000:]
    assert result.sha256 == hashlib.sha256(NEW_DATA).hexdigest()
    first, second = state.requests_for("/img")
    assert "ETag" not in first.headers and second.headers.get("Range") is None
    assert (
        "fetch: restarting from zero: the server sends neither ETag nor Last-Modified, so it cannot resume"
        f" safely ({url}/img)"
    ) in [r.getMessage() for r in caplog.records]


def test_server_ignoring_if_range_is_not_spliced(server: tuple[str, FaultState], tmp_path: Path) -> None:
    url, state = server
    # the resume gets a 206 of the new version: its ETag gives it away
    state.add_faults("/img", Fault(drop_after=1_000_000), Fault(replace=NEW_DATA, ignore_if_range=True))
    dest = tmp_path / "img"
    download(f"{url}/img", str(dest), fast_options())
    assert dest.read_bytes() == NEW_DATA
    assert state.requests_for("/img")[-1].headers.get("Range") is None


def test_file_shrunk_mid_download_416_restarts(server: tuple[str, FaultState], tmp_path: Path) -> None:
    url, state = server
    short = NEW_DATA[:500_000]
    # a server without If-Range support answers the resume with 416: the file is now shorter
    state.add_faults("/img", Fault(drop_after=1_000_000), Fault(replace=short, ignore_if_range=True))
    dest = tmp_path / "img"
    download(f"{url}/img", str(dest), fast_options())
    assert dest.read_bytes() == short
    assert [r.headers.get("Range") for r in state.requests_for("/img")] == [None, "bytes=1000000-", None]


def test_content_length_larger_than_file(server: tuple[str, FaultState], tmp_path: Path) -> None:
    url, state = server
    state.add_faults("/img", Fault(lie_length=1000))
    with pytest.raises(SizeMismatch) as info:
        download(f"{url}/img", str(tmp_path / "img"), fast_options())
    assert str(info.value) == (
        f"{url}/img: server announced {SIZE + 1000} bytes but the file has {SIZE}"
        " (Content-Length does not match the file)"
    )
    assert leftovers(tmp_path) == []


def test_content_length_smaller_than_file_fails_verification(server: tuple[str, FaultState], tmp_path: Path) -> None:
    url, state = server
    state.add_faults("/img", Fault(lie_length=-1000))
    with pytest.raises(ChecksumMismatch):
        download(f"{url}/img", str(tmp_path / "img"), fast_options(verify="pinned", sha256=SHA))
    assert leftovers(tmp_path) == []


def test_404_is_not_retried(server: tuple[str, FaultState], tmp_path: Path) -> None:
    url, state = server
    with pytest.raises(NotFound) as info:
        download(f"{url}/missing", str(tmp_path / "img"), fast_options())
    assert str(info.value) == f"{url}/missing: HTTP 404 Not Found"
    assert len(state.requests_for("/missing")) == 1
    assert leftovers(tmp_path) == []


def test_redirect_is_followed(server: tuple[str, FaultState], tmp_path: Path) -> None:
    url, state = server
    state.redirects["/latest"] = "/img"
    result = download(f"{url}/latest", str(tmp_path / "img"), fast_options(verify="pinned", sha256=SHA))
    assert result.sha256 == SHA
    assert (tmp_path / "img").read_bytes() == DATA


def test_redirect_loop(server: tuple[str, FaultState], tmp_path: Path) -> None:
    url, state = server
    state.redirects.update({"/a": "/b", "/b": f"{url}/a"})
    with pytest.raises(RedirectError) as info:
        download(f"{url}/a", str(tmp_path / "img"), fast_options())
    assert str(info.value) == f"{url}/a: redirect loop: {url}/a -> {url}/b -> {url}/a"
    assert leftovers(tmp_path) == []


def test_too_many_redirects(server: tuple[str, FaultState], tmp_path: Path) -> None:
    url, state = server
    state.redirects.update({f"/r{i}": f"/r{i + 1}" for i in range(20)})
    with pytest.raises(RedirectError, match=r"/r0: more than 10 redirects"):
        download(f"{url}/r0", str(tmp_path / "img"), fast_options())


def test_connection_refused(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}/img"
    with pytest.raises(GaveUp, match=r"^http://127\.0\.0\.1:\d+/img: Connection refused \(gave up after 2 attempts"):
        download(url, str(tmp_path / "img"), fast_options(retries=1))
    assert leftovers(tmp_path) == []


def test_http_proxy_is_honoured(
    server: tuple[str, FaultState], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url, state = server
    monkeypatch.setenv("http_proxy", url)
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    download("http://images.invalid/img", str(tmp_path / "img"), fast_options(verify="pinned", sha256=SHA))
    assert (tmp_path / "img").read_bytes() == DATA
    assert [r.proxied for r in state.requests_for("/img")] == [True]


def test_no_proxy_is_honoured(server: tuple[str, FaultState], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    url, state = server
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")  # would refuse: must not be used
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    download(f"{url}/img", str(tmp_path / "img"), fast_options(verify="pinned", sha256=SHA))
    assert [r.proxied for r in state.requests_for("/img")] == [False]


# -- verification sources --


def test_sidecar_sha256_file(server: tuple[str, FaultState], tmp_path: Path) -> None:
    url, state = server
    state.files["/img.sha256"] = f"{SHA}  img\n".encode()
    download(f"{url}/img", str(tmp_path / "img"), fast_options(verify="sidecar"))
    assert (tmp_path / "img").read_bytes() == DATA


def test_sidecar_sha256sums(server: tuple[str, FaultState], tmp_path: Path) -> None:
    url, state = server
    state.files["/SHA256SUMS"] = f"{'0' * 64}  other\n{SHA} *img\n".encode()
    download(f"{url}/img", str(tmp_path / "img"), fast_options(verify="sidecar"))
    assert (tmp_path / "img").read_bytes() == DATA


def test_sidecar_mismatch(server: tuple[str, FaultState], tmp_path: Path) -> None:
    url, state = server
    state.files["/img.sha256"] = f"{'ab' * 32}\n".encode()
    with pytest.raises(ChecksumMismatch, match=rf"expected {'ab' * 32} \(from {url}/img.sha256\)"):
        download(f"{url}/img", str(tmp_path / "img"), fast_options(verify="sidecar"))
    assert leftovers(tmp_path) == []


def test_sidecar_missing(server: tuple[str, FaultState], tmp_path: Path) -> None:
    url, state = server
    with pytest.raises(ChecksumMissing) as info:
        download(f"{url}/img", str(tmp_path / "img"), fast_options(verify="sidecar"))
    assert str(info.value) == (
        f"{url}/img: verify=sidecar but neither {url}/img.sha256 nor {url}/SHA256SUMS exists"
    )
    assert state.requests_for("/img") == []  # nothing downloaded that could not be verified


def test_sha256sums_without_entry(server: tuple[str, FaultState], tmp_path: Path) -> None:
    url, state = server
    state.files["/SHA256SUMS"] = f"{SHA}  other.img\n".encode()
    with pytest.raises(ChecksumMissing, match=r"SHA256SUMS: no entry for img$"):
        download(f"{url}/img", str(tmp_path / "img"), fast_options(verify="sidecar"))


def test_parse_sums_formats() -> None:
    text = f"{'a' * 64}  dir/one.img\n{'B' * 64} *two.img\nSHA256 (three.img) = {'c' * 64}\n"
    assert parse_sums(text, "one.img") == "a" * 64
    assert parse_sums(text, "two.img") == "b" * 64
    assert parse_sums(text, "three.img") == "c" * 64
    assert parse_sums(text, "four.img") is None


# -- room for the image --


def test_ram_check_before_download(server: tuple[str, FaultState]) -> None:
    url, _state = server
    shm = "/dev/shm"
    if filesystem_type(shm) != "tmpfs":
        pytest.skip("/dev/shm is not a tmpfs here: the RAM check cannot be exercised")
    dest = Path(shm) / f"bootkit-test-{free_port()}.img"
    with pytest.raises(NotEnoughSpace) as info:
        download(f"{url}/img", str(dest), fast_options(reserve_bytes=1 << 60))
    message = str(info.value)
    assert message.startswith(f"{url}/img: image is 3.0 MiB but only ")
    assert "in reserve (MemAvailable" in message or "free on /dev/shm (tmpfs)" in message
    assert not dest.exists() and not Path(str(dest) + ".part").exists()


def test_ram_reserve_does_not_apply_to_disk(server: tuple[str, FaultState], tmp_path: Path) -> None:
    url, _state = server
    if filesystem_type(str(tmp_path)) in ("tmpfs", "ramfs"):
        pytest.skip(f"{tmp_path} is in RAM here")
    download(f"{url}/img", str(tmp_path / "img"), fast_options(reserve_bytes=1 << 60))
    assert (tmp_path / "img").read_bytes() == DATA


def test_options_are_validated() -> None:
    from bootkit.errors import UsageError

    with pytest.raises(UsageError, match="verify=pinned needs sha256"):
        FetchOptions()
    with pytest.raises(UsageError, match="not 64 hexadecimal digits"):
        FetchOptions(sha256="abc")
    with pytest.raises(UsageError, match="sha256 is given but verify=sidecar"):
        FetchOptions(sha256=SHA, verify="sidecar")
    with pytest.raises(UsageError, match="verify='maybe'"):
        FetchOptions(verify="maybe")
    assert FetchOptions(sha256=SHA.upper()).sha256 == SHA


def test_local_file_errors_are_not_retried(server: tuple[str, FaultState], tmp_path: Path) -> None:
    url, state = server
    dest = tmp_path / "no-such-dir" / "img"
    with pytest.raises(FetchError) as info:
        download(f"{url}/img", str(dest), fast_options())
    assert str(info.value) == f"{url}/img: cannot create {dest}.part: No such file or directory"
    assert state.requests_for("/img") == []


def test_server_without_range_support_starts_again(server: tuple[str, FaultState], tmp_path: Path) -> None:
    url, state = server
    state.add_faults("/img", Fault(drop_after=1_000_000), Fault(ignore_range=True))
    download(f"{url}/img", str(tmp_path / "img"), fast_options(verify="pinned", sha256=SHA))
    assert (tmp_path / "img").read_bytes() == DATA


def test_file_that_keeps_changing(server: tuple[str, FaultState], tmp_path: Path) -> None:
    url, state = server
    versions = [make_data(SIZE, seed=100 + i) for i in range(6)]
    for version in versions:
        state.add_faults("/img", Fault(replace=version, drop_after=500_000))
    with pytest.raises(RemoteChanged, match=r"/img: changed on the server 4 times during the download$"):
        download(f"{url}/img", str(tmp_path / "img"), fast_options(retries=10))
    assert leftovers(tmp_path) == []
