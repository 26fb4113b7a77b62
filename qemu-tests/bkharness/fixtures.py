"""pytest plugin of the end-to-end QEMU suite (loaded by "-p bkharness.fixtures" in pyproject.toml): one kernel,
one initramfs per flavour, one image per root kind per run (session scope), a directory per boot whose
serial logs are kept under artifacts/ when the test fails, and the run's boot timelines in artifacts/timeline.json.

A test that needs a bootkit piece that does not exist yet is skipped, naming the piece (MissingPiece).
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from bkharness import images, pieces
from bkharness.guest import Guest
from bkharness.paths import artifacts_dir
from bkharness.pieces import MissingPiece
from bkharness.proof import expect_clean_poweroff, expect_proof
from bkharness.timeline import StageTime, Timelines, format_timeline

_HERE = Path(__file__).resolve().parent.parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if _HERE in Path(item.path).parents:
            item.add_marker(pytest.mark.qemu)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Iterator[None]:
    try:
        return (yield)
    except MissingPiece as e:
        pytest.skip(f"missing piece: {e}")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    try:
        return (yield)
    except MissingPiece as e:
        pytest.skip(f"missing piece: {e}")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.when == "call":
        item.stash[_FAILED] = report.failed
    return report


_FAILED = pytest.StashKey[bool]()


@pytest.fixture(scope="session")
def timelines() -> Timelines:
    return Timelines(artifacts_dir() / "timeline.json")


@dataclass
class BootDir:
    """A directory for one test's boots (web root, PXE tree, serial logs) and its timeline recorder."""

    path: Path
    test: str
    timelines: Timelines

    def record(self, vm: Guest, **facts: object) -> list[StageTime]:
        stages = self.timelines.record(self.test, vm.lines, guest=vm.name, **facts)
        print(f"\n{self.test} [{vm.name}]\n{format_timeline(stages)}")
        return stages

    def prove(self, vm: Guest, image: images.RootImage, timeout: float, **facts: object) -> None:
        """The guest booted ``image``'s root, proved what it sees and powered off; its timeline is recorded."""
        proof = expect_proof(vm, timeout)
        expect_clean_poweroff(vm)
        self.record(vm, **facts)
        assert proof.problems(image) == [], f"{vm.name}: {proof}"


@pytest.fixture
def boot_dir(request: pytest.FixtureRequest, tmp_path: Path, timelines: Timelines) -> Iterator[BootDir]:
    yield BootDir(tmp_path, request.node.name, timelines)
    if request.node.stash.get(_FAILED, False):
        dest = artifacts_dir() / "qemu-tests" / re.sub(r"[^\w.-]+", "_", request.node.name)
        shutil.rmtree(dest, ignore_errors=True)
        shutil.copytree(tmp_path, dest, ignore=shutil.ignore_patterns("www", "pxe", "*.fd"))


@pytest.fixture(scope="session")
def kernel() -> Any:
    return pieces.kernel()


@pytest.fixture(scope="session")
def busybox_root() -> images.RootImage:
    return images.root_image("busybox")


@pytest.fixture(scope="session")
def debian_root() -> images.RootImage:
    return images.root_image("debian")


@pytest.fixture(scope="session")
def initrds(tmp_path_factory: pytest.TempPathFactory, kernel: Any) -> dict[str, Path]:
    """Initramfs builds of this run, by flavour ("shell", "systemd", "shell-default", ...); each built on first use."""
    return {}


#: what the trimmed builds keep: the test guests' NIC. Trimmed for build time and size (a default build holds
#: every NIC driver and takes about twice as long); test_defaults.py boots the untrimmed builds.
TRIMMED_DRIVERS = ("virtio_net",)


def _initrd(initrds: dict[str, Path], tmp_path_factory: pytest.TempPathFactory, flavour: str, *,
            trimmed: bool = True) -> Path:
    pieces.require_boot_code()
    key = flavour if trimmed else f"{flavour}-default"
    if key not in initrds:
        out = tmp_path_factory.mktemp("initrd") / f"initrd-{key}.img"
        initrds[key] = pieces.initrd(out, systemd=flavour == "systemd", drivers=TRIMMED_DRIVERS if trimmed else ())
    return initrds[key]


@pytest.fixture
def shell_initrd(initrds: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``bootkit build-initrd --no-systemd --drivers virtio_net`` (network-legacy), built once per run."""
    return _initrd(initrds, tmp_path_factory, "shell")


@pytest.fixture
def systemd_initrd(initrds: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``bootkit build-initrd --systemd --drivers virtio_net`` (systemd-networkd), built once per run."""
    return _initrd(initrds, tmp_path_factory, "systemd")


@pytest.fixture
def shell_default_initrd(initrds: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``bootkit build-initrd --no-systemd`` with every NIC driver (the default), built once per run."""
    return _initrd(initrds, tmp_path_factory, "shell", trimmed=False)


@pytest.fixture
def systemd_default_initrd(initrds: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``bootkit build-initrd --systemd`` with every NIC driver (the default), built once per run."""
    return _initrd(initrds, tmp_path_factory, "systemd", trimmed=False)
