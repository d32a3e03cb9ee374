"""The allocator setting every entry point gets by importing calibri_pipeline (runtime.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

# allocate and free a 64 MiB tensor a few times; count the minor page faults of the repeats
PROBE = """
import json, resource, sys
import calibri_pipeline, torch
from calibri_pipeline.runtime import allocator_report
torch.empty(16 * 2**20).fill_(1.0)  # first touch: the heap grows once
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    torch.empty(16 * 2**20).fill_(1.0)
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps({"faults": faults, **allocator_report()}))
"""


def _probe(**env) -> dict:
    full = {k: v for k, v in os.environ.items() if k != "CALIBRI_MALLOC"} | env
    out = subprocess.run([sys.executable, "-c", PROBE], env=full, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_importing_the_package_keeps_freed_tensors_mapped():
    tuned = _probe()
    stock = _probe(CALIBRI_MALLOC="default")
    assert tuned["tuned"] is True and stock["tuned"] is False and stock["reason"] == "CALIBRI_MALLOC=default"
    # glibc's default: each 64 MiB tensor is a fresh mmap whose 16k pages fault in again
    assert stock["faults"] > 5 * 10_000
    # tuned: the freed block stays in the heap and the repeats reuse its pages
    assert tuned["faults"] < 1_000
