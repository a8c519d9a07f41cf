"""Replay tools: read a node's log, fold it through the node's reducers, check and compare logs.

Modules, each imported on its own so the command line stays fast to start:

    replay.reader    LogReader: read-only access to a log file that a node may be writing
    replay.views     the views replay can rebuild, by name (registry, scheduler, router, quorum)
    replay.fold      Folder: fold a log in canonical order, event by event
    replay.timeline  the events of one request, the gaps between them and who served what
    replay.verify    check every signature, id and per-author sequence of a log
    replay.diff      compare two nodes' logs: missing events and the first differing view
    replay.step      step through a log one event at a time, showing each view change
    replay.status    the swarm at a glance: peers, coverage, requests in flight
    replay.tail      print and follow a log's events
    replay.synthetic a signed log with a realistic event mix, for benches and tests

See docs/operator_tools.md.
"""
