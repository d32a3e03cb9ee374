"""Diversity (paper Appendix B) on hand-made vectors, and the two feature extractors for real."""

from __future__ import annotations

import math

import pytest
import torch

from calibri_pipeline.features import DinoFeatures, EfficientNetLite0Features, make_feature_extractor, resize_images
from calibri_pipeline.method.diversity import diversity, diversity_per_prompt


@pytest.mark.parametrize(
    ("vectors", "expected"),
    [
        ([[1.0, 0.0], [0.0, 1.0]], 1.0),  # orthogonal
        ([[2.0, 0.0], [3.0, 0.0]], 0.0),  # same direction, different norms
        ([[1.0, 0.0], [-1.0, 0.0]], 2.0),  # opposite
        ([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], 2.0 / 3.0),  # pairs: 1, 0, 0
        ([[1.0, 1.0], [1.0, 0.0]], 1.0 - 1.0 / math.sqrt(2.0)),
        ([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 1.0, 0.0]], 1.0 - math.sqrt(2.0) / 6.0),
    ],
)
def test_diversity_exact_values(vectors: list[list[float]], expected: float) -> None:
    assert diversity(torch.tensor(vectors)) == pytest.approx(expected, abs=1e-12)


def test_diversity_is_order_invariant_and_float64_accurate() -> None:
    gen = torch.Generator().manual_seed(0)
    feats = torch.randn(6, 16, generator=gen)
    perm = torch.randperm(6, generator=gen)
    assert diversity(feats) == pytest.approx(diversity(feats[perm]), abs=1e-12)
    # brute force over pairs
    cos = [
        float(torch.nn.functional.cosine_similarity(feats[i].double(), feats[j].double(), dim=0))
        for i in range(6)
        for j in range(i + 1, 6)
    ]
    assert diversity(feats) == pytest.approx(1.0 - sum(cos) / len(cos), abs=1e-12)


@pytest.mark.parametrize(
    ("features", "message"),
    [
        (torch.ones(1, 4), "at least 2"),
        (torch.ones(4), "2-D"),
        (torch.tensor([[1.0, 0.0], [0.0, 0.0]]), "all zeros"),
        (torch.tensor([[1.0, float("nan")], [0.0, 1.0]]), "NaN"),
    ],
)
def test_diversity_rejects_bad_input(features: torch.Tensor, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        diversity(features)


def test_diversity_per_prompt_groups_rows() -> None:
    feats = torch.tensor([[1.0, 0.0], [5.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 2.0]])
    ids = ["a", "b", "a", "b", "b"]
    out = diversity_per_prompt(feats, ids)
    assert list(out) == ["a", "b"]
    assert out["a"] == pytest.approx(1.0)
    assert out["b"] == pytest.approx(2.0 / 3.0)  # pairs (5,0)-(1,0)=1, (5,0)-(0,2)=0, (1,0)-(0,2)=0
    with pytest.raises(ValueError, match="single image"):
        diversity_per_prompt(feats[:4], ["a", "a", "b", "c"])
    with pytest.raises(ValueError, match="prompt ids"):
        diversity_per_prompt(feats, ["a"])


def _disc_image(size: int, cx: float, colour: tuple[float, float, float]) -> torch.Tensor:
    ys, xs = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    inside = ((xs - cx) ** 2 + (ys - 0.5) ** 2) < 0.06
    img = torch.full((3, size, size), 0.95)
    for c in range(3):
        img[c][inside] = colour[c]
    return img


@pytest.fixture(scope="module")
def effnet() -> EfficientNetLite0Features:
    return EfficientNetLite0Features(batch_size=4)


def test_efficientnet_lite0_loads_offline_and_embeds_any_size(effnet: EfficientNetLite0Features) -> None:
    small = torch.stack([_disc_image(32, 0.4, (0.9, 0.1, 0.1)), _disc_image(32, 0.6, (0.9, 0.1, 0.1))])
    feats = effnet(small)
    assert feats.shape == (2, 1280) and feats.dtype == torch.float32
    assert torch.isfinite(feats).all()
    # non-square, other size: resized inside
    assert effnet(torch.rand(3, 3, 48, 40)).shape == (3, 1280)
    # batching does not change results (eval mode: BatchNorm uses running stats)
    five = torch.rand(5, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(effnet(five), torch.cat([effnet(five[:2]), effnet(five[2:])]), atol=1e-4, rtol=1e-4)


def test_efficientnet_diversity_orders_image_sets(effnet: EfficientNetLite0Features) -> None:
    same = torch.stack([_disc_image(32, 0.5, (0.1, 0.2, 0.9))] * 3)
    shifted = torch.stack([_disc_image(32, cx, (0.1, 0.2, 0.9)) for cx in (0.35, 0.5, 0.65)])
    varied = torch.stack(
        [
            _disc_image(32, 0.5, (0.1, 0.2, 0.9)),
            torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(2)),
            torch.zeros(3, 32, 32),
        ]
    )
    d_same, d_shifted, d_varied = (diversity(effnet(x)) for x in (same, shifted, varied))
    assert d_same == pytest.approx(0.0, abs=1e-5)
    assert 0.0 < d_shifted < d_varied


def test_features_reject_bad_images(effnet: EfficientNetLite0Features) -> None:
    with pytest.raises(ValueError, match=r"\[N, 3, H, W\]"):
        effnet(torch.rand(3, 32, 32))
    with pytest.raises(TypeError, match="floating point"):
        effnet(torch.zeros(1, 3, 8, 8, dtype=torch.uint8))


def _tiny_dinov2():
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    cfg = Dinov2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32, patch_size=8
    )
    return Dinov2Model(cfg).eval()


def test_dino_features_on_tiny_random_dinov2() -> None:
    model = _tiny_dinov2()
    extractor = DinoFeatures(model, batch_size=2, image_size=32)
    images = torch.rand(5, 3, 64, 48, generator=torch.Generator().manual_seed(3))
    feats = extractor(images)
    assert feats.shape == (5, 32)
    # the same computation by hand: resize, ImageNet-normalise, CLS pooler output
    x = resize_images(images, 32)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = model(pixel_values=(x - mean) / std).pooler_output
    torch.testing.assert_close(feats, expected, atol=1e-5, rtol=1e-5)
    assert diversity(extractor(torch.stack([images[0]] * 2))) == pytest.approx(0.0, abs=1e-6)


def test_make_feature_extractor_names() -> None:
    with pytest.raises(ValueError, match="efficientnet-lite0"):
        make_feature_extractor("resnet")
    assert make_feature_extractor("dino", model=_tiny_dinov2(), image_size=32).name.startswith("dino:")
