"""A data-plane node in its own process: serves the echo expert until stdin closes.

Prints one line, `PEER_ID ENDPOINT`, once it serves. Usage: python comm_server_child.py DIR
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from comm_helpers import echo_expert, make_node


async def main(directory: Path) -> None:
    node = make_node(directory)
    node.dataplane.register_handler("expert", echo_expert)
    endpoint = await node.dataplane.start()
    print(node.peer_id, endpoint, flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await node.dataplane.close()
    node.store.close()


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1])))
