"""Hardware detection: /proc values, GPUs through nvidia-smi, the PeerJoined summary."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cortex.node.config import parse_config
from cortex.node.hardware import Gpu, detect_hardware, disk_free_mb, hardware_summary, nvidia_smi_gpus
from install_helpers import write_tool


def _fake_nvidia_smi(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, body: str) -> None:
    tools = tmp_path / "tools"
    write_tool(tools, "nvidia-smi", body)
    monkeypatch.setenv("PATH", f"{tools}{os.pathsep}{os.environ['PATH']}")


def test_nvidia_smi_lists_gpus(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _fake_nvidia_smi(monkeypatch, tmp_path, 'echo "NVIDIA H200, 143771"; echo "NVIDIA A100-SXM4-80GB, 81920"')

    assert nvidia_smi_gpus() == (Gpu("NVIDIA H200", 143771), Gpu("NVIDIA A100-SXM4-80GB", 81920))

    hardware = detect_hardware(tmp_path, use_torch=False)
    assert hardware.gpu_source == "nvidia-smi"
    assert hardware.torch_cuda is False
    assert hardware.gpu_memory_mb == 143771 + 81920


def test_nvidia_smi_failure_means_no_gpus(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _fake_nvidia_smi(monkeypatch, tmp_path, 'echo "NVIDIA-SMI has failed because it could not communicate with the NVIDIA driver" >&2; exit 9')

    assert nvidia_smi_gpus() == ()
    assert "nvidia-smi exited with status 9" in caplog.text


def test_nvidia_smi_absent_means_no_gpus(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))

    hardware = detect_hardware(tmp_path, use_torch=False)

    assert hardware.gpus == ()
    assert hardware.gpu_source == "none"


def test_detect_hardware_reads_machine(tmp_path: Path) -> None:
    hardware = detect_hardware(tmp_path / "not" / "yet" / "created")

    assert 1 <= hardware.cpu_cores <= (os.cpu_count() or 1)
    assert hardware.cpu_model
    assert hardware.ram_mb > 0
    assert hardware.disk_free_mb == disk_free_mb(tmp_path)


def test_hardware_summary_for_peer_joined(tmp_path: Path) -> None:
    config = parse_config({"torch_threads": 2, "device": "cpu"}, base_dir=tmp_path)

    summary = hardware_summary(config)

    assert summary["torch_threads"] == 2
    assert summary["device"] == "cpu"
    assert isinstance(summary["ram_mb"], int) and summary["ram_mb"] > 0
    assert summary["gpus"] == 0 or summary["cuda"] is True
    assert all(isinstance(value, (int, str, bool)) for value in summary.values())
