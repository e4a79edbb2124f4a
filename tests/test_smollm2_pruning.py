"""On the real SmolLM2 and the bundled corpus: contextual (l1) pruning beats random pruning of equal size."""

from __future__ import annotations

import copy

import pytest

from minigpts.cli import sample_data_dir
from minigpts.data import load_corpus
from minigpts.evaluation import evaluate
from minigpts.pipeline import AnalysisOptions, PlanOptions, apply_full_plan, build_plan, run_analysis


@pytest.mark.slow
def test_l1_beats_random_at_equal_size_on_held_out_text(smollm2):
    corpus = load_corpus(str(sample_data_dir() / "economics.*.jsonl"))
    options = AnalysisOptions(calib_tokens=4096, seq_len=512, batch_size=4)
    stats = run_analysis(
        smollm2.model, smollm2.tokenizer, corpus, options, model_name="smollm2", progress=False
    )
    results = {}
    for criterion in ("l1", "random"):
        plan = build_plan(
            smollm2.model, smollm2.tokenizer, stats, PlanOptions(criterion=criterion, mlp_ratio=0.5)
        )
        model, tokenizer = apply_full_plan(copy.deepcopy(smollm2.model), smollm2.tokenizer, plan)
        results[criterion] = evaluate(
            model,
            tokenizer,
            corpus.split("test"),
            model_name=criterion,
            seq_len=512,
            max_tokens=2048,
            progress=False,
        )
    assert results["l1"].params == results["random"].params < 0.75 * 134_515_008
    assert results["l1"].eval_bytes == results["random"].eval_bytes
    assert results["l1"].bits_per_byte < results["random"].bits_per_byte
