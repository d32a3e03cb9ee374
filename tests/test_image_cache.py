"""The image cache: keys from what determines an image, 8-bit images scored like their PNGs, the
unmodified model's entries shared by every vector that is bitwise the unmodified model, and the
pipeline's stored cache (object store + catalog) read back by a fresh process."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from calibri_pipeline.method.population import (
    LocalEvaluator,
    MemoryImageCache,
    SamplingSettings,
    image_key,
    quantize_8bit,
    unmodified_guidance,
)
from calibri_pipeline.method.space import CalibrationSpace, SearchSpace
from calibri_pipeline.prompts.base import Prompt


class MeanPixel:
    name = "mean_pixel"
    higher_is_better = True
    scale = (0.0, 1.0)

    def __call__(self, images, prompts):
        return images.mean(dim=(1, 2, 3))


@pytest.fixture(scope="module")
def backbone():
    from calibri_pipeline.backbones.toy import ToyBackbone
    from calibri_pipeline.text_encoder import MiniLMTextEncoder

    from tiny_models import tiny_toy_transformer

    config, transformer = tiny_toy_transformer(1, gain=3.0)
    return ToyBackbone(transformer, config, MiniLMTextEncoder(max_length=8), default_steps=2, default_guidance=2.5)


PROMPTS = [Prompt("a red cube #1"), Prompt("two green balls #2"), Prompt("a blue ring #3")]


def _evaluator(backbone, cache, n_models=1, steps=2, guidance=2.5):
    search = SearchSpace.for_model(
        CalibrationSpace.from_transformer(backbone.transformer, "block"), n_models, uses_cfg=True
    )
    return LocalEvaluator(
        backbone, search, MeanPixel(), SamplingSettings(steps=steps, guidance=guidance), cache=cache, model="tiny"
    )


def test_a_second_call_reads_every_image_and_scores_it_the_same(backbone):
    cache = MemoryImageCache()
    ev = _evaluator(backbone, cache)
    vectors = ev.search.check(torch.tensor([[1.0, 1.0, 1.0], [0.5, 1.2, 1.0]]))
    first = ev(vectors, PROMPTS, [1, 2, 3])
    assert (first.generated, first.cached) == (6, 0) and len(cache) == 6
    second = ev(vectors, PROMPTS, [1, 2, 3])
    assert (second.generated, second.cached) == (0, 6)
    np.testing.assert_array_equal(second.scores["mean_pixel"], first.scores["mean_pixel"])  # the same 8-bit images
    assert second.keys == first.keys
    # training buckets are not kept (store=False), but still read what is there
    fresh = ev(vectors, PROMPTS, [7, 8, 9], store=False)
    assert fresh.generated == 6 and len(cache) == 6


def test_keys_change_with_everything_that_determines_an_image(backbone):
    ev = _evaluator(backbone, None)
    ident = ev.identity
    base = image_key(ident, "a red cube", 1, 2, 2.5, "baseline")
    assert (
        len(
            {
                base,
                image_key(ident, "a red cube", 2, 2, 2.5, "baseline"),
                image_key(ident, "a blue cube", 1, 2, 2.5, "baseline"),
                image_key(ident, "a red cube", 1, 4, 2.5, "baseline"),
                image_key(ident, "a red cube", 1, 2, 3.0, "baseline"),
                image_key(ident, "a red cube", 1, 2, 2.5, "v-1"),
                image_key(dict(ident, weights="other"), "a red cube", 1, 2, 2.5, "baseline"),
            }
        )
        == 7
    )
    assert image_key(ident, "a red cube", 1, 2, 2.5, "baseline") == base  # stable


def test_vectors_that_are_the_unmodified_model_share_its_entries(backbone):
    space = CalibrationSpace.from_transformer(backbone.transformer, "block")
    single = SearchSpace.for_model(space, 1, uses_cfg=True)
    pair = SearchSpace.for_model(space, 2, uses_cfg=True)
    assert unmodified_guidance(single, single.check(single.x0(2.5))[0], 2.5) == 2.5
    assert unmodified_guidance(pair, pair.check(pair.x0(2.0))[0], 2.5) == 2.0  # CFG at 2 whatever the sampler's 2.5
    tuned = pair.check(pair.x0(2.0))[0].clone()
    tuned[0] = 0.9
    assert unmodified_guidance(pair, tuned, 2.5) is False
    three = SearchSpace.for_model(space, 3, uses_cfg=True)  # a third pass changes the batch: not bitwise
    assert unmodified_guidance(three, three.check(three.x0(2.5))[0], 2.5) is False

    cache = MemoryImageCache()
    baseline_at_2 = LocalEvaluator(
        backbone, None, MeanPixel(), SamplingSettings(steps=2, guidance=2.0), cache=cache, model="tiny"
    )
    plain = baseline_at_2(None, PROMPTS, [4, 5, 6])
    ensemble = _evaluator(backbone, cache, n_models=2)(pair.x0(2.0)[None], PROMPTS, [4, 5, 6])
    assert ensemble.cached == 3 and ensemble.keys[0] == plain.keys[0]
    np.testing.assert_array_equal(ensemble.scores["mean_pixel"], plain.scores["mean_pixel"])
    # and sampling it for real gives the same image, bit for bit (no cache)
    direct = _evaluator(backbone, None, n_models=2)(pair.x0(2.0)[None], PROMPTS, [4, 5, 6])
    np.testing.assert_array_equal(direct.scores["mean_pixel"], plain.scores["mean_pixel"])


def test_images_are_scored_as_8_bit_pngs(tmp_path, backbone):
    from calibri_pipeline.storage.image_cache import read_png_tensor
    from calibri_pipeline.storage.object_store import ObjectStore

    images = backbone.generate(PROMPTS, [1, 2, 3])
    q = quantize_8bit(images)
    assert torch.equal(q, torch.round(q * 255) / 255) and (q - images).abs().max() <= 0.5 / 255 + 1e-7
    store = ObjectStore(tmp_path / "objects")
    for i, image in enumerate(images):
        uri = store.put_png(f"x/{i}.png", image)
        assert torch.equal(read_png_tensor(store, uri), q[i])  # what the cache reads back is what was scored


def test_an_evaluator_without_rewards_only_makes_images(backbone):
    cache = MemoryImageCache()
    ev = LocalEvaluator(backbone, None, [], SamplingSettings(steps=2), cache=cache, model="tiny")
    result = ev(None, PROMPTS, [1, 2, 3], keep_images=True)
    assert result.scores == {} and result.images.shape == (3, 3, 8, 8) and len(cache) == 3


def test_the_stored_cache_survives_the_process(tmp_path, backbone):
    from calibri_pipeline.storage.catalog import Catalog
    from calibri_pipeline.storage.image_cache import StoredImageCache
    from calibri_pipeline.storage.object_store import ObjectStore

    store, catalog = ObjectStore(tmp_path / "objects"), Catalog(tmp_path / "catalog.duckdb")
    cache = StoredImageCache(store, catalog, "tiny")
    ev = _evaluator(backbone, cache)
    vector = ev.search.check(torch.tensor([0.8, 1.0, 1.0]))
    first = ev(vector, PROMPTS, [1, 2, 3])
    rows = catalog.query("SELECT * FROM image_cache ORDER BY prompt_id")
    assert (
        rows.height == 3
        and set(rows["vector_id"]) != {"baseline"}
        and rows["vector"][0].to_list() == pytest.approx([0.8, 1.0, 1.0])
    )
    assert all(store.exists(store.key_of(u)) for u in rows["uri"])
    assert all("/nfe2/g2.5/" in u for u in rows["uri"])  # people can find an image by setting and NFE
    again = _evaluator(backbone, StoredImageCache(store, catalog, "tiny"))  # a new process: the catalog knows
    second = again(vector, PROMPTS, [1, 2, 3])
    assert second.cached == 3 and second.generated == 0
    np.testing.assert_array_equal(second.scores["mean_pixel"], first.scores["mean_pixel"])
    with pytest.raises(ValueError, match="holds images of model 'tiny'"):
        from calibri_pipeline.method.population import CachedImage

        cache.put([CachedImage("k", torch.zeros(3, 8, 8), "other", "i", PROMPTS[0], 0, 2, 2.5, "baseline", None)])
