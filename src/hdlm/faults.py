"""Crash points for the kill tests: ``HDLM_CRASH_AT=NAME`` makes the process SIGKILL itself at the
point named ``NAME`` (e.g. ``step-7`` after optimizer step 7, ``write-12`` half-way through writing the
checkpoint of step 12, ``prune-12`` half-way through pruning after it). A real kill -9, at a point a
test can choose: what survives it is what survives a power cut there. Unset, it costs one dict lookup.
"""

from __future__ import annotations

import os
import signal

CRASH_ENV = "HDLM_CRASH_AT"


def crash_point(name: str) -> None:
    """SIGKILL this process when ``$HDLM_CRASH_AT`` names this point."""
    if os.environ.get(CRASH_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)
