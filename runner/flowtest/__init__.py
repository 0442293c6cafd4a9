"""Offline tests of flows: `*.test.yaml` files whose cases run a flow through the same engine,
its exchanges answered from HAR recordings, on a virtual clock.

    spec.py     test files: JSON Schema, located problems, cases
    match.py    a live request against recorded entries, and the difference from the nearest
    replay.py   the transport that answers from a recording
    vclock.py   the virtual clock and the event loop whose time it is
    expect.py   a case's run against its expectations
    update.py   `--update`: snapshots rewritten, inline values replaced in place
    report.py   text, JSON, GitHub and JUnit reports
    suite.py    finding test files and running their cases
"""

from __future__ import annotations
