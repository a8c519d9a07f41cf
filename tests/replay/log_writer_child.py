"""A node process that writes its log while tests read it: `python log_writer_child.py DATA_DIR`.

Writes a PeerJoined and prints `ready PEER_ID`, then reads commands from stdin.
`write N` writes N events (shard claims and loads, a heartbeat every 10th) through the
real EventWriter, one durable transaction each, and prints `wrote LAST_SEQ`. `stop` or the
end of input exits.
"""

from __future__ import annotations

import sys
from pathlib import Path

from cortex.registry import RegistryReducer
from events import Acceptor, EventWriter, Identity, LogStore, PeerHeartbeat, PeerJoined, Projection, ShardClaimed
from events import ShardLoaded

MODEL = "cd" * 32


def main() -> None:
    data_dir = Path(sys.argv[1])
    identity = Identity.load_or_create(data_dir / "node.key")
    store = LogStore(data_dir / "events.db")
    writer = EventWriter(identity, Acceptor(store, [Projection(RegistryReducer())], own_peer_id=identity.peer_id))
    writer.write(PeerJoined(
        bus_addresses=("/ip4/127.0.0.1/tcp/4001",), data_endpoint="tcp://127.0.0.1:5001",
        curve_public_key=identity.curve_public_key.decode(), hardware={"cpu_cores": 2},
        protocol_version="1.0", software_version="test",
    ))
    print("ready", identity.peer_id, flush=True)
    for line in sys.stdin:
        command, _, argument = line.strip().partition(" ")
        if command != "write":
            break
        for _ in range(int(argument)):
            seq = writer.last_seq + 1
            if seq % 10 == 0:
                body: object = PeerHeartbeat(latest_seq=seq - 1)
            elif seq % 2 == 0:
                body = ShardClaimed(model_id=MODEL, fragment=f"expert[{seq % 5}][{seq % 7}]", memory_bytes=seq)
            else:
                body = ShardLoaded(model_id=MODEL, fragment=f"expert[{seq % 5}][{seq % 7}]", memory_bytes=seq)
            writer.write(body)
        print("wrote", writer.last_seq, flush=True)
    store.close()


if __name__ == "__main__":
    main()
