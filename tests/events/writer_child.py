"""Child process for the SIGKILL test: writes heartbeats and prints each acknowledged seq.

Usage: python writer_child.py DATA_DIR COUNT

The first line is `ready LAST_SEQ SKIPPED`: the seq the writer resumed after, and the id of
the SequenceSkipped event it wrote at start, or `-` if it wrote none.
"""

from __future__ import annotations

import sys
from pathlib import Path

from cortex.registry import RegistryReducer
from events import Acceptor, EventWriter, Identity, LogStore, PeerHeartbeat, Projection


def main() -> None:
    data_dir = Path(sys.argv[1])
    count = int(sys.argv[2])
    identity = Identity.load_or_create(data_dir / "node.key")
    store = LogStore(data_dir / "events.db")
    acceptor = Acceptor(store, [Projection(RegistryReducer())], own_peer_id=identity.peer_id)
    writer = EventWriter(identity, acceptor)
    skipped = writer.skipped.id if writer.skipped is not None else "-"
    print("ready", writer.last_seq, skipped, flush=True)
    for _ in range(count):
        event = writer.write(PeerHeartbeat(writer.last_seq))
        # A line on stdout is the acknowledgement: the event may be published from here on.
        print(event.seq, event.id, flush=True)


if __name__ == "__main__":
    main()
