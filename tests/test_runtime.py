"""The allocator setting every entry point gets by importing calibri_pipeline (runtime.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

# the shipped toy sampler called twice: the minor page faults of the second call (the first one maps
# what the process needs; a sampler in steady state should reuse it)
PROBE = """
import json, resource
import calibri_pipeline, torch
from calibri_pipeline.backbones.toy import load_toy_backbone
from calibri_pipeline.runtime import allocator_report
torch.set_num_threads(1)
backbone = load_toy_backbone()
texts = [f"{n} red circles" for n in range(1, 9)]
backbone.generate(texts, list(range(8)), steps=2, guidance=2.0)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    backbone.generate(texts, list(range(8)), steps=2, guidance=2.0)
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps({"faults": faults, **allocator_report()}))
"""


def _probe(**env) -> dict:
    full = {k: v for k, v in os.environ.items() if k != "CALIBRI_MALLOC"} | env
    out = subprocess.run([sys.executable, "-c", PROBE], env=full, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_importing_the_package_lets_the_sampler_reuse_its_memory():
    tuned = _probe()
    stock = _probe(CALIBRI_MALLOC="default")
    assert tuned["tuned"] is True and stock["tuned"] is False and stock["reason"] == "CALIBRI_MALLOC=default"
    # glibc's defaults: the activations are mapped and unmapped on every call
    assert stock["faults"] > 5_000, stock
    # tuned: the steady-state calls reuse pages already mapped
    assert tuned["faults"] < stock["faults"] / 10, (tuned, stock)
