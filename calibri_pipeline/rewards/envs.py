"""``calibri reward-env NAME DIR``: a virtualenv in which one reward model installs and serves.

HPSv3 and ImageReward pin libraries this project cannot share (``hpsv3`` wants ``transformers==4.45.2``,
``image-reward`` breaks on transformers 5), so each runs from its own virtualenv behind
``calibri serve-reward``. The recipes below are the pins measured to install *and* score (docs/real-models.md,
"Real reward models"); the command builds the venv, installs this checkout into it without its
dependencies (the server needs only torch, numpy and pillow, which every recipe brings), imports the
reward's package as a check, and prints the line that serves it::

    calibri reward-env hpsv3 ~/envs/hpsv3 --device cuda
    calibri reward-env pickscore ~/envs/pickscore --dry-run      # print the commands only
    calibri reward-env pickscore ~/envs/pickscore --verify       # and check it on a tiny random model

``--verify`` (also :func:`verify` for a built environment) builds a tiny random-init model from the
package's own classes inside the environment (no weights are downloaded), scores the same 8-bit images
there directly and through the reward server and this environment's HTTP client, and prints one JSON
row: whether it installed and ran, the largest difference, the seconds.

Only the standard library at import (``--verify`` imports torch, from the environment this runs in).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

# torchvision beside the project's CPU torch 2.13 file fails to import (operator torchvision::nms);
# this pair installs together from PyPI (a CUDA build, which also runs on a CPU)
TORCH_WITH_VISION = ("torch==2.14.1", "torchvision==0.29.1")


@dataclass(frozen=True)
class Recipe:
    """What one reward's environment needs, and why each pin is there."""

    packages: tuple[str, ...]
    module: str  # imported as the check that the install works
    torch: tuple[str, ...] = ("torch>=2.4",)
    why: str = ""
    serve_kwargs: tuple[tuple[str, object], ...] = ()  # besides "device"
    # a script run in the env: builds a tiny model in argv[1], prints make_reward kwargs (and "_env": variables)
    tiny_model: str | None = None

    def serve_command(self, name: str, python: Path, device: str, port: int) -> str:
        kwargs = {"device": device, **dict(self.serve_kwargs)}
        return (
            f"{shlex.quote(str(python))} -m calibri_pipeline.rewards.server --reward {name} --port {port} "
            f"--kwargs {shlex.quote(json.dumps(kwargs))}"
        )


# run inside the reward's environment with the target directory as argv[1]: a random-init CLIP of the
# transformers classes with a word-level tokenizer made here (nothing from the hub)
_TINY_CLIP = """
import json, sys, torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, PreTrainedTokenizerFast
words = ["<pad>", "<unk>", "<|startoftext|>", "<|endoftext|>", "a", "red", "blue", "green", "cyan", "circle",
         "square", "triangle", "two", "three", "of", "left", "right", "to", "the", "draw", "single", "photo"]
backend = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<unk>"))
backend.normalizer = normalizers.Lowercase()
backend.pre_tokenizer = pre_tokenizers.Whitespace()
backend.post_processor = processors.TemplateProcessing(
    single="<|startoftext|> $A <|endoftext|>", special_tokens=[("<|startoftext|>", 2), ("<|endoftext|>", 3)])
tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|startoftext|>", eos_token="<|endoftext|>",
                                    pad_token="<pad>", unk_token="<unk>", model_max_length=77)
processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                          crop_size={"height": 32, "width": 32}), tokenizer=tokenizer)
torch.manual_seed(0)
config = CLIPConfig(
    text_config=dict(vocab_size=len(words), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=2, max_position_embeddings=77, bos_token_id=2, eos_token_id=3, pad_token_id=0),
    vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                       image_size=32, patch_size=8),
    projection_dim=16)
CLIPModel(config).save_pretrained(sys.argv[1])
processor.save_pretrained(sys.argv[1])
print(json.dumps({"model": sys.argv[1], "processor": sys.argv[1]}))
"""

# a Qwen2-VL of the transformers classes at toy size (a byte-level tokenizer with Qwen's special tokens and
# a minimal chat template), the package's own YAML with that model, and the reward model the package builds
# from it (hpsv3.train.create_model_and_processor), its random weights saved as the checkpoint
_TINY_HPSV3 = """
import json, sys
from pathlib import Path
import torch, yaml, safetensors.torch
import hpsv3
from tokenizers import Tokenizer, models, pre_tokenizers, decoders
from transformers import (Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2TokenizerFast,
                          PreTrainedTokenizerFast)

out = Path(sys.argv[1]); base = out / "qwen2-vl-tiny"; base.mkdir(parents=True, exist_ok=True)
specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
            "<|video_pad|>"]
# a byte-level BPE with no merges: every byte is a token, so any text (the instruction, the prompt) tokenizes
from tokenizers.pre_tokenizers import ByteLevel
alphabet = ByteLevel.alphabet()
vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
backend.decoder = decoders.ByteLevel()
tok = Qwen2TokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                              unk_token=None)
tok.add_special_tokens({"additional_special_tokens": specials[1:]})
tok.add_special_tokens({"pad_token": "<|endoftext|>"})
chat_template = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' or 'image' in part %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\\n{% endif %}")
tok.chat_template = chat_template
processor = Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(), tokenizer=tok, chat_template=chat_template)
processor.save_pretrained(base)
ids = {t: tok.convert_tokens_to_ids(t) for t in specials}
torch.manual_seed(0)
config = Qwen2VLConfig(
    vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
    num_key_value_heads=1, max_position_embeddings=4096, rope_scaling={"type": "mrope", "mrope_section": [4, 6, 6]},
    vision_config=dict(depth=1, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=14,
                       spatial_merge_size=2, temporal_patch_size=2, in_channels=3),
    image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
    vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], torch_dtype="bfloat16")
Qwen2VLForConditionalGeneration(config).save_pretrained(base)
shipped = Path(hpsv3.__file__).parent / "config" / "HPSv3_7B.yaml"
cfg = yaml.safe_load(shipped.read_text())
cfg.update(model_name_or_path=str(base), disable_flash_attn2=True, gradient_checkpointing=False, report_to="none",
           output_dir=str(out / "output"))
config_path = out / "HPSv3_tiny.yaml"
config_path.write_text(yaml.safe_dump(cfg))
# the reward model the package builds from that config, its random weights saved as the checkpoint
from hpsv3.train import create_model_and_processor
from hpsv3.utils.parser import DataConfig, ModelConfig, PEFTLoraConfig, TrainingConfig, parse_args_with_yaml
(data_config, training_args, model_config, peft_config), _ = parse_args_with_yaml(
    (DataConfig, TrainingConfig, ModelConfig, PEFTLoraConfig), str(config_path), is_train=False)
model, _, _ = create_model_and_processor(model_config=model_config, peft_lora_config=peft_config,
                                         training_args=training_args)
safetensors.torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "HPSv3_tiny.safetensors"))
print(json.dumps({"config_path": str(config_path), "checkpoint_path": str(out / "HPSv3_tiny.safetensors")}))
"""

# ImageReward's own model class (its ViT-L/16 is fixed; the BERT text side cut to one layer) with random
# weights saved as the checkpoint; its tokenizer is fetched from the hub on every load, so a word-level
# bert-base-uncased vocabulary goes where the hub cache would keep it and the hub is switched off ("_env")
_TINY_IMAGEREWARD = r"""
import json, os, sys
from pathlib import Path
out = Path(sys.argv[1]); out.mkdir(parents=True, exist_ok=True)
# image-reward loads the bert-base-uncased tokenizer from the hub on every load, also for a local checkpoint:
# a word-level vocabulary put where the hub cache would hold it, and the hub switched off
hf_home = out / "hf"
snapshot = hf_home / "hub" / "models--bert-base-uncased" / "snapshots" / ("0" * 40)
snapshot.mkdir(parents=True, exist_ok=True)
(hf_home / "hub" / "models--bert-base-uncased" / "refs").mkdir(parents=True, exist_ok=True)
(hf_home / "hub" / "models--bert-base-uncased" / "refs" / "main").write_text("0" * 40)
words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [chr(c) for c in range(ord("a"), ord("z") + 1)] + [
    "a", "red", "blue", "green", "cyan", "circle", "square", "triangle", "two", "three", "of", "left", "right",
    "to", "the", "draw", "single", "photo", "and", "on", "above", "below"]
(snapshot / "vocab.txt").write_text("\n".join(words) + "\n")
(snapshot / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True, "model_max_length": 512}))
(snapshot / "config.json").write_text(json.dumps({"model_type": "bert", "vocab_size": len(words)}))
env = {"HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
os.environ.update(env)
import torch
from ImageReward.ImageReward import ImageReward
med = {"architectures": ["BertModel"], "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",
       "hidden_dropout_prob": 0.1, "hidden_size": 768, "initializer_range": 0.02, "intermediate_size": 256,
       "layer_norm_eps": 1e-12, "max_position_embeddings": 512, "model_type": "bert", "num_attention_heads": 2,
       "num_hidden_layers": 1, "pad_token_id": 0, "type_vocab_size": 2, "vocab_size": len(words) + 2,
       "encoder_width": 1024, "add_cross_attention": True}
(out / "med_config.json").write_text(json.dumps(med))
torch.manual_seed(0)
model = ImageReward(med_config=str(out / "med_config.json"), device="cpu")
# its head's own init (std 1/769 in five layers) scales the output by ~1e-9: every random model would score
# every image the same to float precision, so the head gets torch's default init
for layer in model.mlp.layers:
    if hasattr(layer, "reset_parameters"):
        layer.reset_parameters()
torch.save(model.state_dict(), out / "ImageReward_tiny.pt")
print(json.dumps({"model": str(out / "ImageReward_tiny.pt"), "med_config": str(out / "med_config.json"), "_env": env}))
"""

# scores images.npy ([N, H, W, 3] uint8) against prompts.json with make_reward(name, **kwargs) in this process
_SCORE_DIRECT = """
import json, sys, numpy as np, torch
from calibri_pipeline.prompts.base import Prompt
from calibri_pipeline.rewards.registry import make_reward
work, name, kwargs = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
images = torch.from_numpy(np.load(work + "/images.npy")).permute(0, 3, 1, 2).float() / 255.0
prompts = [Prompt.from_dict(d) for d in json.load(open(work + "/prompts.json"))]
print(json.dumps(make_reward(name, **kwargs)(images, prompts).tolist()))
"""

RECIPES: dict[str, Recipe] = {
    "hpsv3": Recipe(
        packages=("hpsv3==1.0.0", "matplotlib", "tensorboard"),
        module="hpsv3",
        torch=TORCH_WITH_VISION,
        why="hpsv3 1.0.0 pins transformers==4.45.2 and imports matplotlib and tensorboard without declaring them",
        tiny_model=_TINY_HPSV3,
    ),
    "imagereward": Recipe(
        packages=("image-reward==1.5", "transformers<4.56", "clip-anytorch", "setuptools<81"),
        module="ImageReward",
        torch=TORCH_WITH_VISION,
        why="image-reward 1.5 imports OpenAI's clip (clip-anytorch), pkg_resources (setuptools<81) and "
        "transformers' apply_chunking_to_forward (gone in 4.56)",
        tiny_model=_TINY_IMAGEREWARD,
    ),
    "pickscore": Recipe(
        packages=("transformers>=4.50,<6", "pillow>=10", "numpy>=1.26"),
        module="transformers",
        why="a CLIP model: it also runs in the project's own environment",
        tiny_model=_TINY_CLIP,
    ),
    "clipscore": Recipe(
        packages=("transformers>=4.50,<6", "pillow>=10", "numpy>=1.26"),
        module="transformers",
        why="a CLIP model: it also runs in the project's own environment",
        tiny_model=_TINY_CLIP,
    ),
    "qalign": Recipe(
        packages=("transformers==4.36.1", "accelerate", "sentencepiece", "pillow>=10", "numpy>=1.26"),
        module="transformers",
        why="Q-Align's model code lives in its hub repository (trust_remote_code); without that code nothing "
        "here can check it: the environment installs, the model is untested",
        serve_kwargs=(("trust_remote_code", True),),
    ),
}


def project_source() -> Path:
    """This checkout's root (where pyproject.toml is), to install into the reward's environment."""
    root = Path(__file__).resolve().parents[2]
    if not (root / "pyproject.toml").is_file():
        raise SystemExit(
            "calibri reward-env: this calibri_pipeline is not a source checkout; pass --project PATH (a checkout "
            "or a wheel built from one: python -m pip wheel --no-deps -w dist .)"
        )
    return root


def plan(name: str, directory: Path, *, device: str, torch_spec: tuple[str, ...] | None, project: Path, python: str):
    """The commands that build ``directory`` for reward ``name``, in order."""
    recipe = RECIPES[name]
    pip = [str(directory / "bin" / "python"), "-m", "pip", "install", "--disable-pip-version-check"]
    return [
        [python, "-m", "venv", str(directory)],
        [*pip, "--upgrade", "pip"],
        [*pip, *(torch_spec or recipe.torch)],
        [*pip, *recipe.packages],
        # --no-deps: the server needs torch, numpy and pillow (above), not the pipeline's stack
        [*pip, "--no-deps", str(project)],
        [str(directory / "bin" / "python"), "-c", f"import calibri_pipeline.rewards.server, {recipe.module}"],
    ]


def _test_batch(work: Path, n: int = 6):
    """8-bit images (exact through PNG) of world prompts, written where the env's scripts read them."""
    import numpy as np

    from calibri_pipeline.prompts.base import Prompt
    from calibri_pipeline.world.grammar import sample_prompt

    rng = np.random.default_rng(0)
    prompts: list[Prompt] = [sample_prompt(rng) for _ in range(n)]
    # one flat colour per image, a little noise on top: random noise alone looks the same to a random model
    colours = rng.integers(0, 256, size=(n, 1, 1, 3))
    noise = rng.integers(-20, 21, size=(n, 48, 48, 3))
    images = np.clip(colours + noise, 0, 255).astype(np.uint8)
    np.save(work / "images.npy", images)
    (work / "prompts.json").write_text(json.dumps([p.to_dict() for p in prompts]))
    return images, prompts


def verify(name: str, directory: Path, *, timeout: float = 600.0) -> dict:
    """Score a tiny random-init model of reward ``name`` in the environment ``directory`` directly and
    through the reward server (started from that environment) with this process's HTTP client."""
    import torch

    from calibri_pipeline.rewards.client import HTTPReward

    recipe = RECIPES[name]
    row: dict = {"reward": name, "environment": str(directory), "runs": False}
    if recipe.tiny_model is None:
        row["error"] = f"no tiny model is known for {name}: {recipe.why}"
        return row
    python = str(directory / "bin" / "python")
    with tempfile.TemporaryDirectory(prefix=f"calibri-verify-{name}-") as tmp:
        work = Path(tmp)
        images, prompts = _test_batch(work)
        built = subprocess.run(
            [python, "-c", recipe.tiny_model, str(work / "model")], capture_output=True, text=True, timeout=timeout
        )
        if built.returncode != 0:
            row["error"] = "building the tiny model failed: " + built.stderr.strip()[-2000:]
            return row
        kwargs = {**json.loads(built.stdout.strip().splitlines()[-1]), "device": "cpu"}
        # what the model needs in its process (e.g. an offline hub cache), under "_env"
        env = {**os.environ, **kwargs.pop("_env", {})}
        start = time.perf_counter()
        direct = subprocess.run(
            [python, "-c", _SCORE_DIRECT, str(work), name, json.dumps(kwargs)],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
        )
        if direct.returncode != 0:
            row["error"] = "scoring in the environment failed: " + direct.stderr.strip()[-2000:]
            return row
        row["direct_s"] = round(time.perf_counter() - start, 2)
        direct_scores = torch.tensor(json.loads(direct.stdout.strip().splitlines()[-1]))
        start = time.perf_counter()
        log = work / "server.log"  # a file, not a pipe: a chatty model would fill the pipe and stall the server
        with open(log, "w") as err:
            server = subprocess.Popen(
                [python, "-m", "calibri_pipeline.rewards.server", "--reward", name, "--port", "0"]
                + ["--kwargs", json.dumps(kwargs)],
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
                env=env,
            )
        try:
            line = server.stdout.readline() if server.stdout else ""
            if "listening on" not in line:
                server.terminate()
                server.wait(timeout=30)
                row["error"] = f"the server did not start (stdout: {line.strip()!r}): " + log.read_text()[-2000:]
                return row
            url = line.split("listening on ", 1)[1].split()[0]
            batch = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
            served = HTTPReward(url, timeout=timeout)(batch, prompts)
        finally:
            server.terminate()
            server.wait(timeout=30)
        row["served_s"] = round(time.perf_counter() - start, 2)
        row["max_diff"] = float((served - direct_scores).abs().max())
        row["score_spread"] = float(direct_scores.std())
        row["runs"] = True
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="calibri reward-env", description="Build a virtualenv for one reward model and print how to serve it."
    )
    parser.add_argument("reward", choices=sorted(RECIPES))
    parser.add_argument("directory", type=Path, help="the virtualenv to create (must not exist)")
    parser.add_argument("--device", default="cpu", help="the device the printed serve command uses (cpu, cuda, ...)")
    parser.add_argument(
        "--torch-spec", default=None, help="pip requirement(s) for torch, space-separated (default: the recipe's)"
    )
    parser.add_argument("--project", type=Path, default=None, help="checkout or wheel of calibri-pipeline to install")
    parser.add_argument("--python", default=sys.executable, help="the interpreter to build the venv with")
    parser.add_argument("--port", type=int, default=8001, help="the port in the printed serve command")
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    parser.add_argument(
        "--verify", action="store_true", help="then score a tiny random-init model in it, directly and served"
    )
    parser.add_argument("--reuse", action="store_true", help="with --verify: verify an environment built before")
    args = parser.parse_args(argv)

    directory = args.directory.expanduser().resolve()
    if args.reuse:
        if not args.verify or not (directory / "bin" / "python").exists():
            print("calibri reward-env: --reuse needs --verify and an environment built before", file=sys.stderr)
            return 2
        row = verify(args.reward, directory)
        print(json.dumps(row))
        return 0 if row["runs"] else 1
    if directory.exists() and not args.dry_run:
        print(f"calibri reward-env: {directory} exists; give a new directory", file=sys.stderr)
        return 2
    project = (args.project or project_source()).resolve()
    torch_spec = tuple(args.torch_spec.split()) if args.torch_spec else None
    steps = plan(args.reward, directory, device=args.device, torch_spec=torch_spec, project=project, python=args.python)
    recipe = RECIPES[args.reward]
    print(f"# {args.reward}: {recipe.why}", flush=True)
    for step in steps:
        print("$ " + shlex.join(step), flush=True)
        if args.dry_run:
            continue
        start = time.perf_counter()
        done = subprocess.run(step)
        print(f"  ({time.perf_counter() - start:.0f} s)", flush=True)
        if done.returncode != 0:
            print(
                f"calibri reward-env: step failed (exit {done.returncode}): {shlex.join(step)}\n"
                f"the half-built environment is left in {directory} for inspection; remove it before retrying",
                file=sys.stderr,
            )
            return 1
    print(
        "\nserve it with:\n  " + recipe.serve_command(args.reward, directory / "bin" / "python", args.device, args.port)
    )
    print(f"and score with it in the pipeline as the reward 'http://127.0.0.1:{args.port}'")
    if args.verify and not args.dry_run:
        row = verify(args.reward, directory)
        print(json.dumps(row))
        return 0 if row["runs"] else 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
