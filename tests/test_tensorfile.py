"""The streaming safetensors writer writes what safetensors' own save_file writes."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from minigpts.tensorfile import DeferredTensor, write_safetensors


def mixed_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "b.gram.1": torch.randn(5, 5, generator=g),
        "a.gram.0": torch.randn(3, 3, generator=g),
        "l1.0": torch.randn(7, generator=g, dtype=torch.float64),
        "counts": torch.randint(0, 1000, (11,), generator=g),
        "half": torch.randn(2, 3, generator=g).half(),
        "brain": torch.randn(4, generator=g).bfloat16(),
        "int32": torch.arange(6, dtype=torch.int32).view(2, 3),
        "int16": torch.arange(3, dtype=torch.int16),
        "int8": torch.tensor([-3, 4], dtype=torch.int8),
        "uint8": torch.tensor([1, 200, 3], dtype=torch.uint8),
        "mask": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5, dtype=torch.float64),
        "empty": torch.zeros(0, 4),
        "ünïcode": torch.ones(2),
    }


def read(path):
    """The tensors in the file's order (of their offsets) and the metadata."""
    with safe_open(str(path), framework="pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.offset_keys()}, handle.metadata()


def assert_same_content(expected_path, actual_path) -> None:
    (x, x_meta), (y, y_meta) = read(expected_path), read(actual_path)
    assert x_meta == y_meta
    assert list(x) == list(y)  # the same layout
    for key in x:
        assert x[key].dtype == y[key].dtype and torch.equal(x[key], y[key]), key


@pytest.mark.parametrize("metadata", [None, {}, {"format": "pt"}])
def test_byte_identical_to_save_file(tmp_path, metadata):
    """With at most one metadata key (save_file orders several as a hash map does) the files are equal."""
    tensors = mixed_tensors()
    save_file(tensors, tmp_path / "reference.safetensors", metadata=metadata)
    write_safetensors(tmp_path / "streamed.safetensors", tensors, metadata=metadata)
    assert (tmp_path / "streamed.safetensors").read_bytes() == (
        tmp_path / "reference.safetensors"
    ).read_bytes()


def test_same_content_as_save_file_with_metadata_and_deferred_tensors(tmp_path):
    """Several metadata strings (JSON in them), deferred tensors read in the file's order, one at a
    time, converted to their announced dtype; the header reads back with safe_open."""
    tensors = mixed_tensors()
    metadata = {"format": "minigpts", "n_tokens": "160", "metadata": '{"a": [1, 2], "b": "é\\n"}', "x": ""}
    save_file(tensors, tmp_path / "reference.safetensors", metadata=metadata)
    reads = []

    def deferred(name, tensor):
        def read_it():
            reads.append(name)
            return tensor.double()  # converted back on writing

        return DeferredTensor(tensor.dtype, tuple(tensor.shape), read_it)

    streamed = dict(tensors)
    for name in ("a.gram.0", "b.gram.1", "half"):
        streamed[name] = deferred(name, tensors[name])
    write_safetensors(tmp_path / "streamed.safetensors", streamed, metadata=metadata)
    assert_same_content(tmp_path / "reference.safetensors", tmp_path / "streamed.safetensors")
    assert reads == ["a.gram.0", "b.gram.1", "half"]  # F32 before F16, then by name


def test_refuses_a_tensor_that_is_not_what_it_announced(tmp_path):
    bad = DeferredTensor(torch.float32, (2, 2), lambda: torch.zeros(3))
    with pytest.raises(ValueError, match=r"'bad' has shape \(3,\), announced \(2, 2\)"):
        write_safetensors(tmp_path / "bad.safetensors", {"bad": bad})
    with pytest.raises(TypeError, match="metadata must map str to str"):
        write_safetensors(tmp_path / "bad.safetensors", {"x": torch.zeros(1)}, metadata={"n": 3})
