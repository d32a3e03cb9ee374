"""`calibri reward-env`: a reward's own virtualenv, built from the package index the way a user builds it,
then verified on a tiny random-init model (directly in the env and through the server + client here).

PickScore/CLIPScore build in about a minute and run in CI; HPSv3 and ImageReward pull several GB
(a CUDA torch with torchvision, deepspeed built from source) and run only with CALIBRI_HEAVY_REWARD_ENVS=1.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from calibri_pipeline.rewards.envs import RECIPES, plan, project_source, verify

pytestmark = pytest.mark.reward_env


def _build(name: str, directory, torch_spec: str | None = None) -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", "calibri_pipeline.rewards.envs", name, str(directory)]
    if torch_spec:
        args += ["--torch-spec", torch_spec]
    return subprocess.run(args, capture_output=True, text=True, timeout=1800)


def test_the_plan_installs_this_checkout_without_its_dependencies(tmp_path):
    steps = plan("hpsv3", tmp_path / "env", device="cuda", torch_spec=None, project=project_source(), python="python3")
    flat = [" ".join(s) for s in steps]
    assert any("hpsv3==1.0.0" in s and "matplotlib" in s and "tensorboard" in s for s in flat)
    assert any("--no-deps" in s and str(project_source()) in s for s in flat)
    assert flat[-1].endswith("import calibri_pipeline.rewards.server, hpsv3")
    command = RECIPES["qalign"].serve_command("qalign", tmp_path / "bin" / "python", "cuda", 8003)
    assert '"trust_remote_code": true' in command and "--port 8003" in command
    # an existing directory is refused before anything runs
    (tmp_path / "taken").mkdir()
    done = _build("pickscore", tmp_path / "taken")
    assert done.returncode == 2 and "exists" in done.stderr


def test_pickscore_and_clipscore_environment_scores_like_the_server(tmp_path):
    # the project's own torch release (a local CPU wheel on our machines) keeps this to about a minute
    spec = f"torch=={torch.__version__.split('+')[0]}"
    env = tmp_path / "pickscore"
    done = _build("pickscore", env, spec)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "calibri_pipeline.rewards.server --reward pickscore" in done.stdout
    for name in ("pickscore", "clipscore"):
        row = verify(name, env)
        assert row["runs"], row
        assert row["max_diff"] <= 1e-4, row  # the same model and images: only float rounding between processes
        assert row["score_spread"] > 0, row  # a constant would make the comparison empty


@pytest.mark.skipif(not os.environ.get("CALIBRI_HEAVY_REWARD_ENVS"), reason="several GB: CALIBRI_HEAVY_REWARD_ENVS=1")
@pytest.mark.parametrize("name", ["hpsv3", "imagereward"])
def test_heavy_reward_environments_install_and_score_like_the_server(tmp_path, name):
    done = _build(name, tmp_path / name)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    row = verify(name, tmp_path / name)
    assert row["runs"] and row["max_diff"] <= 1e-4 and row["score_spread"] > 0, row
