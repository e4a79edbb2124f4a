"""bf16 autocast for recovery on a CPU: it really runs in bf16, and leaves nothing of itself behind.

`--mixed-precision bf16` trains with fp32 master weights under bf16 autocast (the matrix products of
CPUs with native bf16 run ~2× faster); the returned model must evaluate in plain fp32 afterwards, and
a teacher cache computed under autocast must not be mistaken for an fp32 one.
"""

from __future__ import annotations

import pytest
import torch
from conftest import SAMPLE_TEXT, make_tiny_llama

from minigpts.data import make_windows, tokenize_stream
from minigpts.errors import UserError
from minigpts.recovery import TeacherCache, finetune
from minigpts.recovery.trainer import use_bf16_autocast

SEQ_LEN = 32


@pytest.fixture(scope="module")
def windows(tiny_tokenizer):
    all_windows = make_windows(tokenize_stream(tiny_tokenizer, [SAMPLE_TEXT] * 3), SEQ_LEN)
    return all_windows[:12], all_windows[-4:]


def _train(tiny_tokenizer, windows, tmp_path, mixed_precision, **kwargs):
    train, val = windows
    model = make_tiny_llama(len(tiny_tokenizer), seed=1)
    return finetune(
        model, tiny_tokenizer, train, val, out_dir=tmp_path / mixed_precision, max_epochs=None, max_steps=3,
        lr=1e-3, progress=False, mixed_precision=mixed_precision, **kwargs,
    )  # fmt: skip


def test_bf16_training_differs_from_fp32_and_returns_a_plain_fp32_model(tiny_tokenizer, windows, tmp_path):
    fp32_model, fp32 = _train(tiny_tokenizer, windows, tmp_path, "no")
    bf16_model, bf16 = _train(tiny_tokenizer, windows, tmp_path, "bf16")
    assert fp32.steps == bf16.steps == 3
    assert fp32.train_loss != bf16.train_loss  # autocast was on: the same seed and data give other losses
    assert all(p.dtype == torch.float32 for p in bf16_model.parameters())
    assert "_original_forward" not in vars(bf16_model)  # accelerate's autocast wrapper removed
    ids = windows[1][:2]
    reference = make_tiny_llama(len(tiny_tokenizer), seed=1)
    reference.load_state_dict(bf16_model.state_dict())
    with torch.no_grad():
        logits = bf16_model(input_ids=ids).logits
        expected = reference.eval()(input_ids=ids).logits
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, expected, rtol=0, atol=0)


def test_auto_means_bf16_only_where_it_is_native_and_bad_values_are_refused(monkeypatch):
    from minigpts.recovery import trainer

    for native in (False, True):
        monkeypatch.setattr(trainer, "cpu_has_native_bf16", lambda native=native: native)
        assert use_bf16_autocast("auto", on_gpu=False) is native
    assert use_bf16_autocast("no", on_gpu=True) is False
    assert use_bf16_autocast("bf16", on_gpu=False) is True
    with pytest.raises(UserError, match="--mixed-precision"):
        use_bf16_autocast("fp8", on_gpu=False)


@pytest.mark.parametrize("native", [False, True])
def test_bf16_on_a_cpu_that_emulates_it_warns_in_one_line(monkeypatch, capsys, native):
    from minigpts import cli
    from minigpts.recovery import trainer

    monkeypatch.setattr(trainer, "cpu_has_native_bf16", lambda: native)
    assert trainer.slow_bf16_warning("auto", on_gpu=False) is None
    assert trainer.slow_bf16_warning("bf16", on_gpu=True) is None
    warning = trainer.slow_bf16_warning("bf16", on_gpu=False)
    assert (warning is None) == native
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code = cli.main(
        ["finetune", "--model", "/nonexistent", "--data", "sample", "--out", "x", "--mixed-precision", "bf16"]
    )
    err = capsys.readouterr().err
    assert code == 2  # the missing model is still the error
    lines = [line for line in err.splitlines() if "warning:" in line]
    assert len(lines) == (0 if native else 1)
    if not native:
        assert "--mixed-precision bf16" in lines[0] and "--mixed-precision auto" in lines[0]


def test_native_bf16_detection_can_be_pinned(monkeypatch):
    from minigpts.recovery.trainer import cpu_has_native_bf16

    monkeypatch.delenv("MINIGPTS_CPU_BF16")
    detected = cpu_has_native_bf16()
    assert detected == (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    for pinned in ("0", "1"):
        monkeypatch.setenv("MINIGPTS_CPU_BF16", pinned)
        assert cpu_has_native_bf16() is (pinned == "1")


def test_a_bf16_teacher_pass_has_its_own_cache_close_to_the_fp32_one(tiny_tokenizer, windows, tmp_path):
    train = windows[0][:4]
    teacher = make_tiny_llama(len(tiny_tokenizer))
    fp32 = TeacherCache(tmp_path, teacher, top_k=8, dtype="float32")
    bf16 = TeacherCache(tmp_path, teacher, top_k=8, dtype="float32", bf16_autocast=True)
    assert fp32.dir != bf16.dir
    exact = fp32.targets(train, range(len(train)))
    approx = bf16.targets(train, range(len(train)))
    assert bf16.windows_computed == len(train)  # not served from the fp32 cache
    index = torch.arange(len(train))
    ids_fp32, lp_fp32 = exact.batch(index, "cpu")
    ids_bf16, lp_bf16 = approx.batch(index, "cpu")
    assert (ids_fp32[..., 0] == ids_bf16[..., 0]).float().mean() > 0.9  # the same argmax almost everywhere
    assert not torch.equal(lp_fp32, lp_bf16)  # the body really ran in bf16
    torch.testing.assert_close(lp_fp32.exp(), lp_bf16.exp(), rtol=0, atol=0.05)
