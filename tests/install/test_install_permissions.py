"""install.sh as an unprivileged user: folders it may not write end with the command that fixes them."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from install_helpers import Unprivileged, base_environment, run_install, unprivileged


@pytest.fixture
def runner() -> Unprivileged:
    return unprivileged()


@pytest.fixture
def shared_folder() -> Iterator[Path]:
    """A temporary folder every user may enter (pytest's tmp_path is private to its creator)."""
    folder = Path(tempfile.mkdtemp(prefix="cortex-install-"))
    folder.chmod(0o755)
    try:
        yield folder
    finally:
        for path in [folder, *folder.rglob("*")]:
            if path.is_dir() and not path.is_symlink():
                path.chmod(0o755)
        shutil.rmtree(folder)


def test_install_read_only_home_names_fix(runner: Unprivileged, shared_folder: Path) -> None:
    home = shared_folder / "home"
    home.mkdir()
    os.chown(home, runner.own_uid, -1)
    home.chmod(0o555)

    result = run_install(home, "--no-start", environment=base_environment(home), prefix=runner.prefix)

    assert result.returncode == 3, result.stdout + result.stderr
    assert f"{home} is read-only (mode 0555)" in result.stderr
    assert f"`chmod u+w {home}`" in result.stderr
    assert "CORTEX_HOME" in result.stderr
    assert not (home / ".cortex").exists()


def test_install_home_of_other_user_names_fix(runner: Unprivileged, shared_folder: Path) -> None:
    user_home = shared_folder / "user"
    user_home.mkdir()
    os.chown(user_home, runner.own_uid, -1)
    if runner.other_uid is None:
        # Not root, so no folder can be given away: the root-owned / stands in for another user's folder.
        cortex_home = Path("/") / f"cortex-install-test-{os.getpid()}"
        expected_fix = f"sudo mkdir -p {cortex_home} && sudo chown"
    else:
        cortex_home = user_home / ".cortex"
        cortex_home.mkdir()
        os.chown(cortex_home, runner.other_uid, -1)
        expected_fix = "sudo chown -R "
    environment = base_environment(user_home, CORTEX_HOME=str(cortex_home))

    result = run_install(user_home, "--no-start", environment=environment, prefix=runner.prefix)

    assert result.returncode == 3, result.stdout + result.stderr
    assert "cannot write to it" in result.stderr
    assert expected_fix in result.stderr
    assert str(cortex_home) in result.stderr
    assert not (cortex_home / "config.yaml").exists()
    assert not (cortex_home / "node.key").exists()
