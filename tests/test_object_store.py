"""Object store: local directory and a real S3 API (moto server on loopback), keys, atomicity, errors."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from calibri_pipeline.storage.object_store import ObjectStateStore, ObjectStore, ObjectStoreError, validate_key


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ObjectStore:
    """The same behaviour is required of both backends."""
    if request.param == "local":
        return ObjectStore(tmp_path / "objects")
    bucket = request.getfixturevalue("s3_bucket")
    return ObjectStore(f"s3://{bucket}/runs/r1")


# -- keys -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "key",
    ["a", "a.png", "model=toy/reward=world/img_0001.png", "x@1,2+3/y-z", "_hidden_ok/x", "0/1/2"],
)
def test_valid_keys_pass(key: str) -> None:
    assert validate_key(key) == key


@pytest.mark.parametrize(
    ("key", "message"),
    [
        ("", "empty"),
        ("../escape", "path traversal"),
        ("a/../../b", "path traversal"),
        ("a/./b", "path traversal"),
        ("a//b", "empty, '.' or '..' segment"),
        ("a/", "empty, '.' or '..' segment"),
        ("/etc/passwd", "absolute"),
        ("C:/windows", "absolute"),
        ("a\\b", "backslash"),
        ("..\\..\\x", "backslash"),
        (".hidden", "unsafe characters"),
        ("a/.calibri-tmp-1-x", "unsafe characters"),
        ("white space", "unsafe characters"),
        ("a?b", "unsafe characters"),
        ("ключ", "unsafe characters"),
        ("-rf", "unsafe characters"),
        ("x" * 256, "longer than 255"),
        ("a/" * 600 + "b", "at most 1024"),
    ],
)
def test_unsafe_keys_are_refused(key: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        validate_key(key)


def test_non_string_key_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="must be a str"):
        validate_key(3)  # type: ignore[arg-type]


def test_traversal_never_touches_the_file_system(tmp_path: Path) -> None:
    store = ObjectStore(tmp_path / "root")
    for call in (
        lambda: store.put_bytes("../outside.txt", b"x"),
        lambda: store.put_json("a/../../outside.json", {}),
        lambda: store.get_bytes("../../etc/passwd"),
        lambda: store.exists("/etc/passwd"),
        lambda: store.delete_prefix(".."),
        lambda: store.list("../"),
    ):
        with pytest.raises(ValueError):
            call()
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # not even the root was created


# -- URLs and credentials -----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("", "empty"),
        ("ftp://host/x", "scheme 'ftp' is not supported"),
        ("gs://bucket/x", "scheme 'gs' is not supported"),
        ("s3://AKIAXXX:supersecret@bucket/x", "must not carry credentials"),
        ("s3://Bad_Bucket/x", "not a valid S3 bucket name"),
        ("s3://bucket/../x", "path traversal"),
        ("s3://bucket/x?versionId=1", "query or fragment"),
        ("file://otherhost/x", "file:///absolute/path"),
    ],
)
def test_bad_urls_are_refused(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as info:
        ObjectStore(url)
    assert "supersecret" not in str(info.value)


def test_missing_s3_credentials_give_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID", raising=False)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "only-half-of-it")
    with pytest.raises(ObjectStoreError, match="S3 credentials missing: AWS_ACCESS_KEY_ID not set") as info:
        ObjectStore("s3://some-bucket/prefix")
    assert "only-half-of-it" not in str(info.value)


def test_local_urls_resolve_to_the_same_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    by_path = ObjectStore("objects")
    by_url = ObjectStore(f"file://{tmp_path}/objects")
    assert by_path.url == by_url.url == f"file://{tmp_path}/objects"
    by_path.put_bytes("k", b"1")
    assert by_url.get_bytes("k") == b"1"


# -- behaviour shared by both backends -----------------------------------------------------------
def test_bytes_json_and_listing_round_trip(store: ObjectStore) -> None:
    assert store.list() == []
    uri = store.put_bytes("model=toy/a.bin", b"\x00\x01payload")
    assert uri == store.uri("model=toy/a.bin")
    assert store.key_of(uri) == "model=toy/a.bin"
    assert store.get_bytes("model=toy/a.bin") == b"\x00\x01payload"
    store.put_json("model=toy/meta.json", {"steps": 4, "names": ["b0", "b1"], "alpha": 0.5})
    assert store.get_json("model=toy/meta.json") == {"steps": 4, "names": ["b0", "b1"], "alpha": 0.5}
    store.put_bytes("model=other/x.bin", b"x")
    assert store.list() == ["model=other/x.bin", "model=toy/a.bin", "model=toy/meta.json"]
    assert store.list("model=toy") == ["model=toy/a.bin", "model=toy/meta.json"]
    assert store.list("model=nothing") == []
    assert store.exists("model=toy/a.bin")
    assert not store.exists("model=toy")  # a prefix is not an object
    assert not store.exists("model=toy/missing.bin")
    store.put_bytes("model=toy/a.bin", b"replaced")
    assert store.get_bytes("model=toy/a.bin") == b"replaced"


def test_missing_objects_raise_file_not_found(store: ObjectStore) -> None:
    with pytest.raises(FileNotFoundError, match="no object 'nope.json'"):
        store.get_json("nope.json")
    store.put_bytes("dir/x", b"1")
    with pytest.raises(FileNotFoundError):
        store.get_bytes("dir")


def test_delete_prefix_and_delete(store: ObjectStore) -> None:
    for i in range(3):
        store.put_bytes(f"run=a/img_{i}.png", b"x")
    store.put_bytes("run=ab/keep.png", b"x")  # shares a string prefix, not a segment prefix
    assert store.delete_prefix("run=a") == 3
    assert store.list() == ["run=ab/keep.png"]
    assert store.delete_prefix("run=a") == 0
    with pytest.raises(ValueError, match="whole object store"):
        store.delete_prefix("")
    assert store.delete("run=ab/keep.png") is True
    assert store.delete("run=ab/keep.png") is False
    assert store.list() == []


def test_png_round_trip_from_tensor_numpy_and_pil(store: ObjectStore) -> None:
    generator = torch.Generator().manual_seed(0)
    image = torch.rand(3, 8, 12, generator=generator)
    image[0, 0, 0] = 1.3  # slightly out of range values are clamped, as a sampler may produce them
    image[1, 0, 0] = -0.2
    store.put_png("img/float.png", image)
    loaded = np.asarray(store.get_png("img/float.png"))
    expected = np.rint(image.clamp(0, 1).permute(1, 2, 0).numpy() * 255).astype(np.uint8)
    assert loaded.shape == (8, 12, 3) and np.array_equal(loaded, expected)

    as_uint8 = torch.from_numpy(expected).permute(2, 0, 1).contiguous()
    store.put_png("img/uint8.png", as_uint8)
    assert np.array_equal(np.asarray(store.get_png("img/uint8.png")), expected)

    store.put_png("img/gray.png", np.full((5, 4), 0.5, dtype=np.float32))
    gray = store.get_png("img/gray.png")
    assert gray.mode == "L" and np.asarray(gray).max() == 128

    store.put_png("img/pil.png", Image.new("RGBA", (3, 2), (1, 2, 3, 4)))
    assert store.get_png("img/pil.png").getpixel((0, 0)) == (1, 2, 3, 4)
    assert store.get_bytes("img/pil.png")[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    ("image", "error", "message"),
    [
        (torch.rand(2, 3, 8, 8), ValueError, "one image at a time"),
        (torch.rand(5, 8, 8), ValueError, r"\[C, H, W\]"),
        (torch.full((3, 4, 4), float("nan")), ValueError, "NaN or infinite"),
        (np.zeros((4, 4, 3), dtype=np.int64), TypeError, "uint8 or float"),
        ("not an image", TypeError, "PIL image"),
    ],
)
def test_bad_images_are_refused_and_nothing_is_written(
    local_store: ObjectStore, image: object, error: type, message: str
) -> None:
    with pytest.raises(error, match=message):
        local_store.put_png("img/bad.png", image)
    assert local_store.list() == []


def test_safetensors_round_trip_with_metadata(store: ObjectStore) -> None:
    tensors = {
        "coefficients": torch.linspace(0.5, 1.5, 7),
        "weights": torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.bfloat16).t(),  # non-contiguous
        "step": torch.tensor([3], dtype=torch.int64),
    }
    store.put_safetensors("cal/best.safetensors", tensors, metadata={"granularity": "block", "model": "toy"})
    loaded = store.get_safetensors("cal/best.safetensors")
    assert set(loaded) == set(tensors)
    for name, tensor in tensors.items():
        assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor)
    assert store.get_safetensors_metadata("cal/best.safetensors") == {"granularity": "block", "model": "toy"}


def test_bad_safetensors_input_and_corrupt_objects(local_store: ObjectStore) -> None:
    with pytest.raises(TypeError, match="must map a str to a torch.Tensor"):
        local_store.put_safetensors("t.safetensors", {"w": [1.0, 2.0]})  # type: ignore[dict-item]
    with pytest.raises(TypeError, match="metadata must map str to str"):
        local_store.put_safetensors("t.safetensors", {"w": torch.ones(1)}, metadata={"steps": 4})  # type: ignore[dict-item]
    local_store.put_bytes("corrupt.safetensors", b"\xff" * 20)
    with pytest.raises(ValueError, match="not a valid safetensors file"):
        local_store.get_safetensors("corrupt.safetensors")
    local_store.put_bytes("bad.json", b"{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        local_store.get_json("bad.json")
    assert local_store.list() == ["bad.json", "corrupt.safetensors"]


def test_json_refuses_nan_and_non_serialisable_values(local_store: ObjectStore) -> None:
    with pytest.raises(ValueError, match="NaN or infinity"):
        local_store.put_json("x.json", {"best": float("nan")})
    with pytest.raises(TypeError, match="not JSON-serialisable"):
        local_store.put_json("x.json", {"t": torch.ones(1)})
    assert not local_store.exists("x.json")


def test_state_store_adapter_speaks_the_engine_protocol(store: ObjectStore) -> None:
    from calibri_pipeline.method.state_store import StateStore

    state = store.state_store("calibration/toy-world")
    assert isinstance(state, ObjectStateStore) and isinstance(state, StateStore)
    assert not state.exists("manifest.json")
    state.save("manifest.json", b'{"generation": 0}')
    state.save("generation-000000.json", b"{}")
    assert state.load("manifest.json") == b'{"generation": 0}'
    assert state.exists("generation-000000.json")
    assert store.list("calibration") == [
        "calibration/toy-world/generation-000000.json",
        "calibration/toy-world/manifest.json",
    ]
    with pytest.raises(FileNotFoundError, match="no state 'missing.json'"):
        state.load("missing.json")
    with pytest.raises(ValueError):
        state.save("../escape.json", b"x")


# -- local atomicity ---------------------------------------------------------------------------
def test_failed_local_write_keeps_the_old_object_and_leaves_no_temp_file(
    local_store: ObjectStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    local_store.put_bytes("dir/x.json", b"old")

    def disk_went_away(src: str, dst: str) -> None:
        raise OSError("disk went away")

    monkeypatch.setattr(os, "replace", disk_went_away)
    with pytest.raises(OSError, match="disk went away"):
        local_store.put_bytes("dir/x.json", b"new")
    monkeypatch.undo()
    assert local_store.get_bytes("dir/x.json") == b"old"
    root = Path(local_store.url.removeprefix("file://"))
    assert sorted(p.name for p in (root / "dir").iterdir()) == ["x.json"]


def test_process_killed_mid_write_never_exposes_a_partial_object(local_store: ObjectStore) -> None:
    """A writer dies (os._exit, like kill -9) after writing its temp file but before the rename."""
    local_store.put_bytes("state.json", b'{"generation": 1}')
    root = local_store.url.removeprefix("file://")
    child = textwrap.dedent(
        f"""
        import os
        from calibri_pipeline.storage.object_store import ObjectStore
        store = ObjectStore({root!r})
        os.replace = lambda src, dst: os._exit(9)  # die exactly between write and rename
        store.put_bytes("state.json", b'{{"generation": 2}}' * 1000)
        """
    )
    result = subprocess.run([sys.executable, "-c", child], capture_output=True, timeout=60)
    assert result.returncode == 9, result.stderr.decode()
    assert local_store.get_bytes("state.json") == b'{"generation": 1}'
    leftovers = [p.name for p in Path(root).iterdir() if p.name != "state.json"]
    assert len(leftovers) == 1 and leftovers[0].startswith(".calibri-tmp-")  # the dead writer's temp file
    assert local_store.list() == ["state.json"]  # ...which no reader ever sees


# -- S3 specifics ---------------------------------------------------------------------------------
def test_s3_objects_land_under_the_prefix_and_no_secret_is_logged(
    s3_bucket: str, s3_env: str, caplog: pytest.LogCaptureFixture
) -> None:
    import boto3

    caplog.set_level(logging.DEBUG)
    store = ObjectStore(f"s3://{s3_bucket}/experiments/one")
    uri = store.put_json("a/b.json", {"x": 1})
    assert uri == f"s3://{s3_bucket}/experiments/one/a/b.json"
    body = boto3.client("s3", endpoint_url=s3_env).get_object(Bucket=s3_bucket, Key="experiments/one/a/b.json")["Body"]
    assert json.loads(body.read()) == {"x": 1}
    secret = os.environ["AWS_SECRET_ACCESS_KEY"]
    assert secret not in repr(store) and secret not in uri
    assert secret not in caplog.text


def test_s3_missing_bucket_is_a_clear_error(s3_env: str) -> None:
    store = ObjectStore("s3://calibri-no-such-bucket/x")
    with pytest.raises(ObjectStoreError, match="does the bucket exist"):
        store.put_bytes("k", b"1")
