"""hdlm.allocator.keep_freed_memory: a freed large block is reused without page faults (issue #16.3)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

# A step's worth of tensors of mixed sizes (one above glibc's 32 MiB mmap ceiling), two alive at a
# time, 30 steps: the minor page faults of the last 10 steps.
_PROBE = """
import json, resource
from hdlm.allocator import keep_freed_memory
on = keep_freed_memory()
import torch
def step():
    alive = []
    for mib in (28, 8, 28, 40, 4, 28):
        t = torch.empty(mib << 18)
        t.fill_(1.0)
        alive = [*alive[-1:], t]
for _ in range(20):
    step()
f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    step()
print(json.dumps({"on": on, "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0}))
"""
PAGES = 10 * (40 << 20) // 4096  # pages of the 40 MiB block over the 10 steps (mmapped afresh by default)


def _probe(malloc: str) -> dict:
    env = {**os.environ, "HDLM_MALLOC": malloc}
    out = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc tuning is Linux-only")
def test_freed_blocks_are_reused_without_page_faults():
    system, kept = _probe("system"), _probe("")
    assert system["on"] is False  # HDLM_MALLOC=system leaves glibc's defaults
    if system["faults"] < PAGES // 2:
        pytest.skip(f"glibc's defaults fault only {system['faults']} pages here, fewer than the 40 MiB blocks' {PAGES}")
    assert kept["on"] is True
    assert kept["faults"] < PAGES // 20, (system, kept)


def test_cli_applies_it_before_a_command(monkeypatch):
    import hdlm.cli as cli

    called = []
    monkeypatch.setattr(cli, "keep_freed_memory", lambda: called.append(True))
    assert cli.main(["schedule", "--kind", "block", "--length", "8", "--width", "2"]) == 0
    assert called == [True]


def test_head_chunk_grows_only_when_freed_memory_is_kept(monkeypatch):
    from hdlm import allocator, head_loss

    monkeypatch.setattr(allocator, "_applied", False)
    assert head_loss.head_chunk_elements() == head_loss.HEAD_CHUNK_ELEMENTS
    assert head_loss.HEAD_CHUNK_ELEMENTS * 4 < 32 << 20  # below glibc's mmap ceiling (bytes)
    monkeypatch.setattr(allocator, "_applied", True)
    assert head_loss.head_chunk_elements() == head_loss.KEPT_HEAD_CHUNK_ELEMENTS > head_loss.HEAD_CHUNK_ELEMENTS


def test_docs_state_the_switch_and_chunk_sizes_the_code_has():
    import re
    from pathlib import Path

    from hdlm import allocator, head_loss

    root = Path(__file__).resolve().parents[1]
    guide = " ".join((root / "docs" / "user-guide.md").read_text(encoding="utf-8").split())
    para = guide[guide.index("Host memory:"):][:900]
    assert "`HDLM_MALLOC=system` leaves glibc's defaults" in para and "hdlm.allocator.keep_freed_memory" in para
    assert 'os.environ.get("HDLM_MALLOC"' in Path(allocator.__file__).read_text(encoding="utf-8")
    arch = (root / "docs" / "architecture.md").read_text(encoding="utf-8")
    m = re.search(r"`HEAD_CHUNK_ELEMENTS`, (\d+) MiB; `KEPT_HEAD_CHUNK_ELEMENTS`, (\d+) MiB", arch)
    assert m, "docs/architecture.md no longer states the two head chunk sizes"
    assert (int(m[1]) << 20, int(m[2]) << 20) == (head_loss.HEAD_CHUNK_ELEMENTS * 4,
                                                  head_loss.KEPT_HEAD_CHUNK_ELEMENTS * 4)
