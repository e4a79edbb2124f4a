"""Model resolution: the embedded SmolLM2 alias, local directories, and clear errors."""

from __future__ import annotations

import json

import pytest
import torch

from minigpts.errors import UserError
from minigpts.models import load_model


def test_local_directory_round_trip(tmp_path, tiny_tokenizer, tiny_llama):
    tiny_llama.save_pretrained(tmp_path / "m")
    tiny_tokenizer.save_pretrained(tmp_path / "m")
    loaded = load_model(str(tmp_path / "m"), device="cpu")
    ids = torch.tensor([[1, 5, 9, 20]])
    with torch.no_grad():
        assert torch.equal(loaded.model(ids).logits, tiny_llama(ids).logits)
    assert loaded.model.dtype == torch.float32


def test_missing_model_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="no such file or directory"):
        load_model(str(tmp_path / "nope"), device="cpu")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="without config.json"):
        load_model(str(tmp_path / "empty"), device="cpu")


def test_non_causal_model_is_a_clear_error(tmp_path):
    from transformers import T5Config

    T5Config(d_model=32, num_layers=1, num_heads=2, d_ff=64).save_pretrained(tmp_path / "t5")
    with pytest.raises(UserError, match="not a causal language model"):
        load_model(str(tmp_path / "t5"), device="cpu")


def test_bad_device_and_dtype(tmp_path):
    with pytest.raises(UserError, match="--dtype"):
        load_model("smollm2-135m", device="cpu", dtype="int3")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="no CUDA GPU"):
            load_model("smollm2-135m", device="cuda")


@pytest.mark.slow
def test_embedded_model_loads_saves_and_reloads_identically(smollm2, tmp_path):
    model, tokenizer = smollm2.model, smollm2.tokenizer
    assert model.config.model_type == "llama" and len(tokenizer) == 49152
    assert not hasattr(model.config, "quantization_config")
    model.save_pretrained(tmp_path / "copy")
    tokenizer.save_pretrained(tmp_path / "copy")
    assert "quantization_config" not in json.loads((tmp_path / "copy" / "config.json").read_text())
    again = load_model(str(tmp_path / "copy"), device="cpu")
    ids = tokenizer("Supply and demand set prices.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(model(ids).logits, again.model(ids).logits)
    assert again.tokenizer("Supply and demand")["input_ids"] == tokenizer("Supply and demand")["input_ids"]
