"""`cortex submit --json` reports the quorum that the request's decisions actually used."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

from quorum_helpers import REQUEST, decision, signed

from cortex.commands.submit import quorum_summary
from events import Acceptor, Identity, LogStore


def test_quorum_summary_lists_quorums_used(tmp_path: Path) -> None:
    voter, honest, liar = Identity.generate(), Identity.generate(), Identity.generate()
    two_of_two = decision([voter.peer_id, honest.peer_id], [], layer=1)
    three = dataclasses.replace(decision([voter.peer_id, honest.peer_id], [liar.peer_id], layer=2), quorum=3)
    failed = decision([], [], layer=3, agreed=False)
    other_request = dataclasses.replace(decision([voter.peer_id], [], layer=4), request_id="cd" * 32)
    with LogStore(tmp_path / "events.db") as store:
        result = Acceptor(store).accept_many([signed(voter, body).wire for body in (two_of_two, three, failed, other_request)])
    assert not result.rejected

    expected = {"decisions": 3, "quorums_used": [2, 3], "no_quorum": 1, "dissenting_peers": [liar.peer_id]}
    assert quorum_summary(tmp_path, REQUEST) == expected

    # `cortex submit` runs in a process that has not imported cortex.quorum before the summary.
    script = (
        "import json, sys; from pathlib import Path; from cortex.commands.submit import quorum_summary; "
        "print(json.dumps(quorum_summary(Path(sys.argv[1]), sys.argv[2])))"
    )
    fresh = subprocess.run([sys.executable, "-c", script, str(tmp_path), REQUEST], capture_output=True, text=True, timeout=60)
    assert fresh.returncode == 0, fresh.stderr
    assert json.loads(fresh.stdout) == expected


def test_quorum_summary_without_decisions(tmp_path: Path) -> None:
    LogStore(tmp_path / "events.db").close()
    assert quorum_summary(tmp_path, REQUEST) is None
