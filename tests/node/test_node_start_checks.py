"""`cortex node start` checks its checkpoints and fragments before it joins the swarm."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

DEMO_MODEL = Path(__file__).resolve().parents[2] / "cortex" / "demo_model"


def _start(tmp_path: Path, model_lines: str) -> subprocess.CompletedProcess[str]:
    config = tmp_path / "node.yaml"
    config.write_text("data_dir: ./data\nbus:\n  backend: nats\nmodels:\n" + model_lines)
    return subprocess.run(
        [sys.executable, "-m", "cortex", "node", "start", "--config", str(config)],
        capture_output=True, text=True, timeout=120,
    )


@pytest.mark.parametrize(
    ("model_lines", "expected"),
    [
        ("  - path: ./no-such-model\n", "checkpoint folder"),
        (f"  - path: {DEMO_MODEL}\n    fragments: [head, 'block[0:9]']\n", "block[0:9] ends after the last layer"),
        (f"  - path: {DEMO_MODEL}\n    fragments: ['expert[0][3]']\n", "dense layer without routed experts"),
    ],
    ids=["missing-folder", "block-past-end", "expert-of-dense-layer"],
)
def test_node_start_rejects_bad_model(tmp_path: Path, model_lines: str, expected: str) -> None:
    result = _start(tmp_path, model_lines)
    assert result.returncode == 2
    assert result.stderr.startswith("error: ")
    assert expected in result.stderr
    assert "models[0]" in result.stderr
    assert "Traceback" not in result.stderr
    # Nothing started: no key, no log, no bus state.
    assert not (tmp_path / "data").exists()
