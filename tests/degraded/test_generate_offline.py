"""`cortex generate` answers with no network: a process in which opening any socket fails."""

from __future__ import annotations

import subprocess
import sys

import pytest

# Every socket the process tries to open raises, so any network use would end the run.
NO_NETWORK = """
import socket, sys
class NoNetwork(socket.socket):
    def __init__(self, *args, **kwargs):
        raise OSError("network use in an offline test")
socket.socket = NoNetwork
socket.create_connection = lambda *args, **kwargs: (_ for _ in ()).throw(OSError("network use in an offline test"))
from cortex.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_generate_runs_with_no_network() -> None:
    done = subprocess.run(
        [sys.executable, "-c", NO_NETWORK, "generate", "Return the number of items in the", "--max-tokens", "8", "--json"],
        capture_output=True, text=True, timeout=120, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    import orjson

    result = orjson.loads(done.stdout.strip().splitlines()[-1])
    assert len(result["generated_token_ids"]) == 8 or result["finish_reason"] == "eos"
    assert "network use" not in done.stderr
