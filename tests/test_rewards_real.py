"""Real reward adapters.

PickScore and CLIPScore run for real: tiny random-init ``CLIPModel``\\ s with an offline tokenizer and image
processor, both injected as objects and loaded back from disk through the hub-id (``from_pretrained``) path.
HPSv3, ImageReward and Q-Align cannot run here (their packages pin incompatible transformers / need
torchvision, and their weights live on the hub): their argument plumbing is checked against small
stand-ins that have the real call signatures, and their missing-package / trust_remote_code errors for real.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from typing import Sequence

import numpy as np
import pytest
import torch

from calibri_pipeline.prompts.base import Prompt
from calibri_pipeline.rewards.base import Reward, RewardError
from calibri_pipeline.rewards.clipscore import CLIPScore
from calibri_pipeline.rewards.hpsv3 import HPSv3Reward
from calibri_pipeline.rewards.imagereward import ImageRewardReward
from calibri_pipeline.rewards.pickscore import PickScore
from calibri_pipeline.rewards.qalign import QAlignReward
from calibri_pipeline.rewards.registry import KNOWN_REWARDS, WeightedReward, make_reward, parse_weighted

WORDS = [
    "<pad>",
    "<unk>",
    "<|startoftext|>",
    "<|endoftext|>",
    "a",
    "an",
    "red",
    "blue",
    "green",
    "circle",
    "square",
    "triangle",
    "two",
    "three",
    "of",
    "left",
    "right",
    "to",
    "the",
    "photo",
]


def _tiny_clip(seed: int = 0):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(WORDS)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>", special_tokens=[("<|startoftext|>", 2), ("<|endoftext|>", 3)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|startoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<pad>",
        unk_token="<unk>",
        model_max_length=16,
    )
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor = CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)
    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(WORDS),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=16,
            bos_token_id=2,
            eos_token_id=3,
            pad_token_id=0,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        ),
        projection_dim=16,
    )
    return CLIPModel(config).eval(), processor


@pytest.fixture(scope="module")
def tiny_clip():
    return _tiny_clip()


def _images(n: int, size: int = 40, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _prompts(texts: Sequence[str]) -> list[Prompt]:
    return [Prompt(text=t, source="test") for t in texts]


TEXTS = ["a red circle", "two blue squares", "a red circle", "a green triangle to the left of a red square", "a photo"]


def _reference_cosines(model, processor, images: torch.Tensor, texts: Sequence[str]) -> torch.Tensor:
    """The full [N images, T texts] cosine matrix, computed straight from the model."""
    from PIL import Image

    pil = [Image.fromarray((img.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()) for img in images]
    with torch.no_grad():
        pix = processor(images=pil, return_tensors="pt")["pixel_values"]
        ids = processor(text=list(texts), padding=True, return_tensors="pt")
        img_out = model.get_image_features(pixel_values=pix)
        txt_out = model.get_text_features(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"])
    img_emb = img_out if isinstance(img_out, torch.Tensor) else img_out.pooler_output
    txt_emb = txt_out if isinstance(txt_out, torch.Tensor) else txt_out.pooler_output
    img_emb = torch.nn.functional.normalize(img_emb, dim=-1)
    txt_emb = torch.nn.functional.normalize(txt_emb, dim=-1)
    return img_emb @ txt_emb.T


def test_pickscore_on_tiny_clip_matches_reference(tiny_clip) -> None:
    model, processor = tiny_clip
    images = _images(5)
    reward = PickScore(model=model, processor=processor, device="cpu", batch_size=2)
    assert isinstance(reward, Reward) and reward.name == "pickscore" and reward.higher_is_better
    scores = reward(images, _prompts(TEXTS))
    cos = _reference_cosines(model, processor, images, TEXTS)
    expected = model.logit_scale.exp().item() * cos.diagonal()
    assert scores.dtype == torch.float32 and scores.shape == (5,)
    torch.testing.assert_close(scores, expected, atol=1e-4, rtol=1e-4)
    # batching and prompt de-duplication inside a batch change nothing
    torch.testing.assert_close(
        PickScore(model=model, processor=processor, batch_size=16)(images, _prompts(TEXTS)), scores
    )
    # the prompt matters: the same images under other prompts pick other entries of the cosine matrix
    shifted = TEXTS[1:] + TEXTS[:1]
    torch.testing.assert_close(
        reward(images, _prompts(shifted)),
        model.logit_scale.exp().item() * torch.stack([cos[i, (i + 1) % 5] for i in range(5)]),
        atol=1e-4,
        rtol=1e-4,
    )
    assert not torch.allclose(scores, reward(images, _prompts(shifted)))


def test_clipscore_on_tiny_clip_matches_reference(tiny_clip) -> None:
    model, processor = tiny_clip
    images = _images(5, size=24, seed=1)
    reward = CLIPScore(model=model, processor=processor, batch_size=3)
    cos = _reference_cosines(model, processor, images, TEXTS)
    expected = 100.0 * cos.diagonal().clamp(min=0)
    torch.testing.assert_close(reward(images, _prompts(TEXTS)), expected, atol=1e-4, rtol=1e-4)
    assert reward.scale == (0.0, 100.0)


def test_clip_rewards_load_by_path_through_from_pretrained(tiny_clip, tmp_path: Path) -> None:
    model, processor = tiny_clip
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "processor")
    images = _images(3, seed=2)
    injected = PickScore(model=model, processor=processor)(images, _prompts(TEXTS[:3]))
    by_path = make_reward("pickscore", model=str(tmp_path / "model"), processor=str(tmp_path / "processor"))
    torch.testing.assert_close(by_path(images, _prompts(TEXTS[:3])), injected, atol=1e-5, rtol=1e-5)
    # bfloat16 option: same scores to bf16 precision
    bf16 = PickScore(model=str(tmp_path / "model"), processor=str(tmp_path / "processor"), dtype=torch.bfloat16)
    assert next(bf16.model.parameters()).dtype == torch.bfloat16
    torch.testing.assert_close(bf16(images, _prompts(TEXTS[:3])), injected, atol=0.6, rtol=0.05)


def test_clip_reward_input_errors(tiny_clip) -> None:
    model, processor = tiny_clip
    reward = PickScore(model=model, processor=processor)
    with pytest.raises(ValueError, match="one prompt per image"):
        reward(_images(2), _prompts(["a"]))
    with pytest.raises(ValueError, match=r"\[N, 3, H, W\]"):
        reward(torch.rand(3, 8, 8), _prompts(["a"]))
    with pytest.raises(TypeError, match="Prompt"):
        reward(_images(1), ["a red circle"])  # type: ignore[list-item]
    with pytest.raises(TypeError, match="CLIPModel"):
        CLIPScore(model=torch.nn.Linear(2, 2), processor=processor)
    with pytest.raises(ValueError, match="batch_size"):
        CLIPScore(model=model, processor=processor, batch_size=0)
    with pytest.raises(ValueError, match="processor"):
        CLIPScore(model=model)


# --- registry --------------------------------------------------------------------------------------------
class Constant:
    """A user reward reachable as 'test_rewards_real:Constant'."""

    higher_is_better = True

    def __init__(
        self, value: float = 1.0, name: str = "constant", scale: tuple[float, float] | None = (0.0, 1.0)
    ) -> None:
        self.value, self.name, self.scale = value, name, scale

    def __call__(self, images: torch.Tensor, prompts: Sequence[Prompt]) -> torch.Tensor:
        return torch.full((images.shape[0],), self.value)


def test_registry_builds_known_and_module_rewards(tiny_clip) -> None:
    model, processor = tiny_clip
    assert isinstance(make_reward("clipscore", model=model, processor=processor), CLIPScore)
    custom = make_reward("test_rewards_real:Constant", value=0.25)
    assert custom.name == "constant" and float(custom(_images(2), _prompts(["a", "b"]))[0]) == 0.25
    assert make_reward(custom) is custom
    assert set(KNOWN_REWARDS) >= {
        "world_score",
        "world_alignment",
        "world_accuracy",
        "world_quality",
        "hpsv3",
        "imagereward",
        "pickscore",
        "clipscore",
        "qalign",
    }


def test_registry_unknown_name_lists_known_ones() -> None:
    with pytest.raises(ValueError) as info:
        make_reward("hpsv2")
    message = str(info.value)
    assert "unknown reward 'hpsv2'" in message
    for name in ("world_score", "hpsv3", "pickscore", "qalign", "http://", "module:attr", "*0.7"):
        assert name in message
    with pytest.raises(ValueError, match="no attribute 'Nope'"):
        make_reward("test_rewards_real:Nope")
    with pytest.raises(TypeError, match="did not give a reward"):
        make_reward("math:pi")


def test_weighted_reward_from_string_and_dict(tiny_clip) -> None:
    model, processor = tiny_clip
    images, prompts = _images(4, seed=3), _prompts(TEXTS[:4])
    kw = {"pickscore": {"model": model, "processor": processor}, "clipscore": {"model": model, "processor": processor}}
    weighted = make_reward("pickscore*0.7+clipscore*0.3", component_kwargs=kw)
    assert isinstance(weighted, WeightedReward) and weighted.name == "pickscore*0.7+clipscore*0.3"
    ps = PickScore(model=model, processor=processor)(images, prompts)
    cs = CLIPScore(model=model, processor=processor)(images, prompts)
    torch.testing.assert_close(weighted(images, prompts), 0.7 * ps + 0.3 * cs, atol=1e-4, rtol=1e-5)
    parts = weighted.component_scores(images, prompts)
    torch.testing.assert_close(parts["clipscore"], cs)
    as_dict = make_reward({"pickscore": 0.7, "clipscore": 0.3}, component_kwargs=kw)
    torch.testing.assert_close(as_dict(images, prompts), weighted(images, prompts))
    assert weighted.scale is None  # PickScore is unbounded
    user = make_reward(
        "0.5*test_rewards_real:Constant", component_kwargs={"test_rewards_real:Constant": {"value": 4.0}}
    )
    assert float(user(images, prompts)[0]) == 2.0


def test_weighted_parsing_and_errors() -> None:
    assert parse_weighted("a*0.7+b*0.3") == [("a", 0.7), ("b", 0.3)]
    assert parse_weighted(" 2*a + b ") == [("a", 2.0), ("b", 1.0)]
    assert parse_weighted("a*-1") == [("a", -1.0)]
    for bad, msg in [
        ("a*b", "numeric weight"),
        ("a+", "empty term"),
        ("a*1*2", "name\\*weight"),
        ("a*1+a*2", "twice"),
        ("0.5*1", "no reward name"),
    ]:
        with pytest.raises(ValueError, match=msg):
            parse_weighted(bad)
    with pytest.raises(TypeError, match="component_kwargs"):
        make_reward("pickscore*0.5+clipscore*0.5", device="cpu")
    with pytest.raises(ValueError, match="not parts"):
        make_reward("test_rewards_real:Constant*1", component_kwargs={"other": {}})


def test_weighted_reward_scale_and_direction() -> None:
    a, b = Constant(1.0, "a", (0.0, 1.0)), Constant(3.0, "b", (1.0, 5.0))
    w = WeightedReward([(a, 0.5), (b, -1.0)])
    assert w.name == "a*0.5+b*-1"
    assert w.scale == (0.0 - 5.0, 0.5 - 1.0)
    assert float(w(_images(1), _prompts(["x"]))[0]) == pytest.approx(0.5 - 3.0)
    lower = Constant(1.0, "loss")
    lower.higher_is_better = False
    with pytest.raises(ValueError, match="direction"):
        WeightedReward([(a, 1.0), (lower, 1.0)])
    with pytest.raises(ValueError, match="finite"):
        WeightedReward([(a, math.nan)])
    nan_part = Constant(float("nan"), "nan_part")
    with pytest.raises(RewardError, match="nan_part"):
        WeightedReward([(a, 1.0), (nan_part, 1.0)])(_images(1), _prompts(["x"]))


# --- HPSv3 / ImageReward / Q-Align: plumbing against stand-ins with the real call signatures ----------------
class _HPSv3Like:
    """Records calls; signature of hpsv3 1.0.0's ``HPSv3RewardInferencer.reward(image_paths, prompts)``."""

    def __init__(self) -> None:
        self.calls: list[dict] = []

    def reward(self, image_paths, prompts):
        self.calls.append({"images": image_paths, "prompts": prompts})
        means = torch.tensor([float(np.asarray(im.convert("L"), dtype=np.float64).mean()) for im in image_paths])
        return torch.stack([means / 10.0, torch.full_like(means, 0.3)], dim=1)  # (mu, sigma)


class _HPSv3OtherOrder(_HPSv3Like):
    def reward(self, prompts, image_paths):  # the other released positional order
        return super().reward(image_paths=image_paths, prompts=prompts)


@pytest.mark.parametrize("inferencer_cls", [_HPSv3Like, _HPSv3OtherOrder])
def test_hpsv3_plumbing(inferencer_cls) -> None:
    inferencer = inferencer_cls()
    reward = HPSv3Reward(inferencer=inferencer, batch_size=2, device="cpu")
    images = _images(5, size=20, seed=4)
    texts = [f"prompt {i}" for i in range(5)]
    scores = reward(images, _prompts(texts))
    assert [len(c["images"]) for c in inferencer.calls] == [2, 2, 1]
    assert [t for c in inferencer.calls for t in c["prompts"]] == texts
    first = inferencer.calls[0]["images"][0]
    assert first.mode == "RGB" and first.size == (20, 20)
    expected_mu = torch.tensor(
        [
            float(np.asarray(im.convert("L"), dtype=np.float64).mean()) / 10.0
            for c in inferencer.calls
            for im in c["images"]
        ]
    )
    torch.testing.assert_close(scores, expected_mu.float())


def test_dtypes_by_name_and_hpsv3_autocasts_on_a_cpu() -> None:
    from calibri_pipeline.rewards.common import as_dtype

    for name in ("bfloat16", "torch.bfloat16", "bf16"):
        assert as_dtype(name) is torch.bfloat16
    assert as_dtype("fp16") is torch.float16 and as_dtype(torch.float32) is torch.float32 and as_dtype(None) is None
    for bad in ("int8", "bfloat17", 3):
        with pytest.raises(ValueError, match="floating torch dtype"):
            as_dtype(bad)
    # JSON (the server's --kwargs) carries the name; on a CPU the default is bf16 (the shipped config's dtype)
    assert HPSv3Reward(inferencer=_HPSv3Like(), device="cpu").autocast_dtype is torch.bfloat16
    assert HPSv3Reward(inferencer=_HPSv3Like(), device="cpu", autocast_dtype="float32").autocast_dtype is torch.float32
    assert HPSv3Reward(inferencer=_HPSv3Like(), device="cuda").autocast_dtype is None

    class Records(_HPSv3Like):
        def reward(self, image_paths, prompts):
            self.dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None
            return super().reward(image_paths, prompts)

    inferencer = Records()
    HPSv3Reward(inferencer=inferencer, device="cpu", autocast_dtype="bf16")(_images(1), _prompts(["a"]))
    assert inferencer.dtype is torch.bfloat16


def test_hpsv3_bad_output_shape_is_an_error() -> None:
    class Flat:
        def reward(self, image_paths, prompts):
            return torch.ones(len(prompts))

    with pytest.raises(RewardError, match=r"\[batch, 2\]"):
        HPSv3Reward(inferencer=Flat())(_images(2), _prompts(["a", "b"]))


class _ImageRewardLike:
    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []

    def inference_rank(self, prompt, generations_list):
        self.calls.append((prompt, len(generations_list)))
        rewards = [len(prompt) + im.getpixel((0, 0))[0] / 255.0 for im in generations_list]
        ranks = list(range(1, len(rewards) + 1))
        return (ranks[0], rewards[0]) if len(rewards) == 1 else (ranks, rewards)  # the package squeezes


def test_imagereward_groups_by_prompt_and_keeps_order() -> None:
    scorer = _ImageRewardLike()
    reward = ImageRewardReward(scorer=scorer, batch_size=2)
    images = _images(5, size=8, seed=5)
    texts = ["aa", "b", "aa", "aa", "ccc"]
    scores = reward(images, _prompts(texts))
    assert scorer.calls == [("aa", 2), ("aa", 1), ("b", 1), ("ccc", 1)]
    first_px = (images[:, 0, 0, 0] * 255).round() / 255
    expected = torch.tensor([len(t) for t in texts], dtype=torch.float32) + first_px
    torch.testing.assert_close(scores, expected, atol=1e-6, rtol=0)


class _OneAlignLike:
    def __init__(self) -> None:
        self.calls: list[dict] = []

    def score(self, images, task_="quality", input_="image"):
        self.calls.append({"n": len(images), "task_": task_, "input_": input_})
        return torch.tensor([1.0 + 4.0 * im.getpixel((0, 0))[1] / 255.0 for im in images], dtype=torch.float16)


def test_qalign_plumbing_and_trust_remote_code_gate() -> None:
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        QAlignReward()
    with pytest.raises(ValueError, match="trust_remote_code"):
        make_reward("qalign")
    with pytest.raises(ValueError, match="task"):
        QAlignReward(_OneAlignLike(), task="beauty")
    model = _OneAlignLike()
    reward = QAlignReward(model, task="aesthetics", batch_size=3)
    assert reward.name == "qalign-aesthetics" and reward.scale == (1.0, 5.0)
    images = _images(4, size=8, seed=6)
    scores = reward(images, _prompts(["x"] * 4))
    assert model.calls == [
        {"n": 3, "task_": "aesthetics", "input_": "image"},
        {"n": 1, "task_": "aesthetics", "input_": "image"},
    ]
    expected = (1.0 + 4.0 * (images[:, 1, 0, 0] * 255).round() / 255).half().float()
    torch.testing.assert_close(scores, expected)


@pytest.mark.parametrize(
    ("factory", "module", "pip_name"),
    [(HPSv3Reward, "hpsv3", "pip install hpsv3"), (ImageRewardReward, "ImageReward", "pip install image-reward")],
)
def test_missing_packages_say_how_to_install(factory, module: str, pip_name: str) -> None:
    if importlib.util.find_spec(module) is not None:
        pytest.skip(f"{module} is installed here")
    with pytest.raises(ImportError, match=pip_name) as info:
        factory()
    assert f"calibri reward-env {factory.name} DIR" in str(info.value)


def test_registry_builds_the_world_rewards() -> None:
    from calibri_pipeline.rewards.world import WorldAccuracy, WorldAlignment, WorldQuality, WorldScore

    expected = {
        "world_score": WorldScore,
        "world_alignment": WorldAlignment,
        "world_accuracy": WorldAccuracy,
        "world_quality": WorldQuality,
    }
    for name, cls in expected.items():
        reward = make_reward(name)
        assert isinstance(reward, cls) and reward.name == name
    custom = make_reward("world_score", alignment_weight=1.0, quality_weight=0.0)
    assert custom.alignment_weight == 1.0
    mix = make_reward({"world_alignment": 0.7, "world_quality": 0.3})
    assert mix.name == "world_alignment*0.7+world_quality*0.3" and mix.scale == pytest.approx((0.0, 1.0))
