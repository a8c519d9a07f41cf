"""Child process of the restart test: join a listener with a key file, publish frames, stop.

Usage: python restart_speaker.py KEY_PATH LISTENER_ADDRESS RUN FRAMES
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from bus_helpers import libp2p_config  # noqa: E402
from cortex.bus.libp2p_transport import Libp2pTransport  # noqa: E402
from events.identity import Identity  # noqa: E402


async def speak(key_path: Path, address: str, run: int, frames: int) -> None:
    speaker = Libp2pTransport(libp2p_config(Identity.load_or_create(key_path), quic=False, bootstrap=[address]))
    await speaker.start()
    await speaker.subscribe("events")
    try:
        async with asyncio.timeout(20):
            while not speaker.peers():
                await asyncio.sleep(0.1)
        await asyncio.sleep(1.5)  # one gossipsub heartbeat builds the mesh
        for index in range(frames):
            await speaker.publish("events", f"run {run} frame {index}".encode())
        await asyncio.sleep(1.0)  # let the last frames leave before the host closes
    finally:
        await speaker.stop()


if __name__ == "__main__":
    asyncio.run(speak(Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])))
