"""MCQ evaluation: scores equal an independent log-likelihood computation; both file formats read;
bad files are clear errors; the paper's real question sets load."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import TINY_CONFIGS, make_tiny_llama, make_tiny_model

from minigpts.errors import UserError
from minigpts.mcq import (
    MCQItem,
    _requests,
    _shared_length,
    _sliding_window,
    evaluate_mcq,
    load_mcq,
    mcq_metrics,
    score_choices,
)

SHARED_MCQ = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "mcq"

ITEMS = [
    MCQItem("Economics Test:", "Opportunity cost is", ["the next best alternative.", "a price.", "free."], 0),
    MCQItem(
        "Economics Test:", "When demand rises and supply stays the same, prices", ["go up.", "go down."], 0
    ),
    MCQItem("", "Supply and demand determine the", ["price of goods in a market economy.", "weather."], 0),
    MCQItem(
        "Skyrim", "Damn it,", [" this will not stand!", "I want to talk to you.", "Hmm?", "émojis 📈"], 1
    ),
]


def independent_scores(model, tokenizer, item: MCQItem, max_len: int | None = None, bos=()) -> list[float]:
    """One forward per (prompt, choice), float64 log-softmax, following the documented format."""
    prompt = f"{item.context}\n{item.question}" if item.context else item.question
    scores = []
    for choice in item.choices:
        prompt_ids = list(bos) + tokenizer(prompt, add_special_tokens=False)["input_ids"]
        continuation = choice if choice[0].isspace() else " " + choice
        choice_ids = tokenizer(continuation, add_special_tokens=False)["input_ids"]
        ids = (prompt_ids + choice_ids)[-max_len:] if max_len else prompt_ids + choice_ids
        with torch.no_grad():
            logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), dim=-1)
        first = len(ids) - len(choice_ids)
        scores.append(sum(logprobs[t - 1, ids[t]].item() for t in range(first, len(ids))))
    return scores


def test_scores_match_an_independent_computation(tiny_tokenizer):
    model = make_tiny_llama(len(tiny_tokenizer))
    expected = [independent_scores(model, tiny_tokenizer, item) for item in ITEMS]
    for batch_size in (1, 3, 8):  # padding and batch composition must not change a score
        got = score_choices(model, tiny_tokenizer, ITEMS, batch_size=batch_size)
        assert [len(s) for s in got] == [len(item.choices) for item in ITEMS]
        for got_row, expected_row in zip(got, expected, strict=True):
            assert got_row == pytest.approx(expected_row, abs=1e-4)

    result = evaluate_mcq(model, tiny_tokenizer, ITEMS, batch_size=3)
    argmax = [max(range(len(row)), key=row.__getitem__) for row in expected]
    assert result["accuracy"] == sum(a == item.answer for a, item in zip(argmax, ITEMS)) / len(ITEMS)
    assert result["questions"] == 4
    assert result["chance"] == pytest.approx((1 / 3 + 1 / 2 + 1 / 2 + 1 / 4) / 4)
    assert evaluate_mcq(model, tiny_tokenizer, ITEMS) == result  # deterministic
    assert not model.training


def test_long_prompts_are_cut_from_the_left(tiny_tokenizer):
    model = make_tiny_llama(len(tiny_tokenizer))
    model.config.max_position_embeddings = 24
    item = MCQItem(
        "Supply and demand determine the price of goods. " * 6, "Prices", ["go up.", "go down."], 0
    )
    got = score_choices(model, tiny_tokenizer, [item])[0]
    assert got == pytest.approx(independent_scores(model, tiny_tokenizer, item, max_len=24), abs=1e-4)


def test_prompt_starts_with_the_bos_the_tokenizer_adds_itself(tiny_tokenizer):
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer.from_str(tiny_tokenizer.backend_tokenizer.to_str())
    backend.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", 0)]
    )
    with_bos = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<|endoftext|>", eos_token="<|endoftext|>"
    )
    assert with_bos("a")["input_ids"][0] == 0
    model = make_tiny_llama(len(tiny_tokenizer))
    got = score_choices(model, with_bos, ITEMS[:2])
    for got_row, item in zip(got, ITEMS[:2], strict=True):
        assert got_row == pytest.approx(independent_scores(model, tiny_tokenizer, item, bos=[0]), abs=1e-4)


def test_accuracy_norm_divides_by_the_choice_bytes():
    item = MCQItem("", "Pick", ["a", "a much longer answer"], 1)
    scores = [[-2.0, -10.0]]  # per byte: -2.0 vs -0.5
    metrics = mcq_metrics([item], scores)
    assert metrics == {"accuracy": 0.0, "accuracy_norm": 1.0, "questions": 1, "chance": 0.5}


def test_reads_the_paper_format_jsonl_and_json_lists(tmp_path):
    paper = {
        "context": "Economics Test:",
        "questions": {
            "A basic requirement for survival is a(n)": {"choices": ["need.", "want."], "answer": 0},
            "Division of labor is a characteristic of": {
                "choices": ["crafts.", "assembly lines."],
                "answer": 1,
            },
        },
    }
    (tmp_path / "paper.json").write_text(json.dumps(paper))
    items = load_mcq(tmp_path / "paper.json")
    assert items == [
        MCQItem("Economics Test:", "A basic requirement for survival is a(n)", ["need.", "want."], 0),
        MCQItem(
            "Economics Test:", "Division of labor is a characteristic of", ["crafts.", "assembly lines."], 1
        ),
    ]

    records = [
        {"question": "2 + 2 =", "choices": ["4", "5"], "answer": 0},
        {"context": "Skyrim", "question": "Damn it,", "choices": ["no", "yes", "maybe"], "answer": 2},
    ]
    (tmp_path / "set.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    (tmp_path / "list.json").write_text(json.dumps(records))
    expected = [
        MCQItem("", "2 + 2 =", ["4", "5"], 0),
        MCQItem("Skyrim", "Damn it,", ["no", "yes", "maybe"], 2),
    ]
    assert load_mcq(tmp_path / "set.jsonl") == expected
    assert load_mcq(tmp_path / "list.json") == expected


def test_repeated_question_texts_are_all_kept(tmp_path):
    text = (
        '{"context": "c", "questions": {"Q": {"choices": ["a", "b"], "answer": 0},'
        ' "Q": {"choices": ["c", "d"], "answer": 1}}}'
    )
    (tmp_path / "dup.json").write_text(text)
    assert [item.choices for item in load_mcq(tmp_path / "dup.json")] == [["a", "b"], ["c", "d"]]


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("bad.json", "{not json", "not valid JSON"),
        ("bad.jsonl", '{"question": "q", "choices": ["a", "b"], "answer": 0}\n{oops', "line 2"),
        ("nofield.jsonl", '{"question": "q", "answer": 0}', "missing field.*choices"),
        ("range.jsonl", '{"question": "q", "choices": ["a", "b"], "answer": 2}', "out of range"),
        ("bool.jsonl", '{"question": "q", "choices": ["a", "b"], "answer": true}', "index"),
        ("one.jsonl", '{"question": "q", "choices": ["a"], "answer": 0}', "at least two"),
        ("blank.jsonl", '{"question": "q", "choices": ["a", ""], "answer": 0}', "non-empty"),
        (
            "paper.json",
            '{"context": "c", "questions": {"q": {"choices": ["a", "b"]}}}',
            "missing field.*answer",
        ),
        ("noquestions.json", '{"context": "c"}', "missing field.*questions"),
        ("empty.jsonl", "\n", "no questions"),
    ],
)
def test_bad_files_are_user_errors(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(UserError, match=message) as info:
        load_mcq(path)
    assert name in str(info.value)


def test_missing_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        load_mcq(tmp_path / "absent.json")


@pytest.mark.skipif(not SHARED_MCQ.is_dir(), reason="the shared datasets are not on this machine")
@pytest.mark.parametrize(
    ("name", "count"), [("basic_economics_dataset.json", 95), ("skyrim_question_dataset.json", 100)]
)
def test_reads_the_papers_question_sets(name, count):
    items = load_mcq(SHARED_MCQ / name)
    assert len(items) == count
    assert all(len(item.choices) == 4 and 0 <= item.answer < 4 and item.context for item in items)


# --- the shared-prefix KV cache gives the scores of the sequence-by-sequence path -----------------------

SHARED_ITEMS = [
    # a long shared context; choices of different lengths that share their first tokens
    MCQItem(
        "Economics Test: " + "Supply and demand determine the price of goods in a market economy. " * 4,
        "When demand rises and supply stays the same, prices",
        ["go up.", "go down.", "go up and down and up again, in a market economy.", "stay."],
        0,
    ),
    # the prompt ends in whitespace, which moves into the choices; a choice starts with its own space
    MCQItem(
        "Skyrim", "Damn it, ", [" this will not stand!", "Hmm?", "émojis 📈", "I want to talk to you."], 3
    ),
    # a choice whose first characters would merge with the prompt's last ones if tokenized together
    MCQItem("", "Opportunity cost is the value of the next best altern", ["ative.", "a price.", "s"], 0),
    MCQItem("Economics Test:", "2 + 2 =", ["4", "5", "four"], 0),
]


CONTEXT = "Economics Test: " + "Supply and demand determine the price of goods in a market economy. " * 3
# the paper's format: one context for every question, which then runs once for the whole set
SAME_CONTEXT = [MCQItem(CONTEXT, item.question, item.choices, item.answer) for item in SHARED_ITEMS + ITEMS]


def forward_shapes(model) -> list[tuple[int, ...]]:
    """A list that collects the shape of the input ids of every forward pass of ``model``."""
    seen: list[tuple[int, ...]] = []
    model.get_input_embeddings().register_forward_hook(lambda module, args, out: seen.append(args[0].shape))
    return seen


def assert_same_scores(model, tokenizer, items, *, batch_size: int = 8) -> None:
    cached = score_choices(model, tokenizer, items, batch_size=batch_size)
    alone = score_choices(model, tokenizer, items, batch_size=batch_size, cache=False)
    for cached_row, alone_row in zip(cached, alone, strict=True):
        assert cached_row == pytest.approx(alone_row, abs=1e-5, rel=0)
        assert max(range(len(cached_row)), key=cached_row.__getitem__) == max(
            range(len(alone_row)), key=alone_row.__getitem__
        )
    assert mcq_metrics(items, cached) == mcq_metrics(items, alone)


@pytest.mark.parametrize("name", list(TINY_CONFIGS))
def test_cached_prefix_scores_equal_the_uncached_ones_for_every_family(tiny_tokenizer, name):
    model = make_tiny_model(name, len(tiny_tokenizer), max_position_embeddings=256)
    shapes = forward_shapes(model)
    for batch_size in (1, 5, 16):  # one question per group, groups of one or two questions, all at once
        assert_same_scores(model, tiny_tokenizer, SHARED_ITEMS + ITEMS, batch_size=batch_size)
        assert_same_scores(model, tiny_tokenizer, SAME_CONTEXT, batch_size=batch_size)
    window = _sliding_window(model.config)
    if window is not None and window < 256:
        return  # a window shorter than the prompts (tiny Gemma's): mcq then runs their shared start per prompt
    shapes.clear()
    score_choices(model, tiny_tokenizer, SAME_CONTEXT)
    context = len(tiny_tokenizer(CONTEXT)["input_ids"])
    assert shapes[0] == (1, context + 1)  # the context (and "\n") ran once for every question
    assert all(width < context for _, width in shapes[1:])
    shapes.clear()
    score_choices(model, tiny_tokenizer, SHARED_ITEMS, batch_size=16)
    cached = [rows * width for rows, width in shapes]
    assert [shape for shape in shapes if shape[1] >= 78] == [(1, 78)]  # the long prompt ran once
    shapes.clear()
    score_choices(model, tiny_tokenizer, SHARED_ITEMS, batch_size=16, cache=False)
    assert sum(cached) < sum(rows * width for rows, width in shapes) / 2


@pytest.mark.parametrize(
    ("name", "overrides"),
    [
        ("mistral", dict(sliding_window=8)),  # prompts longer than the window
        ("qwen2", dict(sliding_window=8, use_sliding_window=True, max_window_layers=1)),  # mixed layers
        ("llama", dict(attn_implementation="eager")),  # masks built as additive floats, not booleans
        ("opt", dict(attn_implementation="eager")),
    ],
)
def test_cached_prefix_under_sliding_windows_and_eager_attention(tiny_tokenizer, name, overrides):
    model = make_tiny_model(name, len(tiny_tokenizer), max_position_embeddings=256, **overrides)
    for batch_size in (1, 16):
        assert_same_scores(model, tiny_tokenizer, SHARED_ITEMS + ITEMS, batch_size=batch_size)
        assert_same_scores(model, tiny_tokenizer, SAME_CONTEXT, batch_size=batch_size)


def test_cached_prefix_scores_match_an_independent_computation(tiny_tokenizer):
    model = make_tiny_model("opt", len(tiny_tokenizer), max_position_embeddings=256)  # learned positions
    items = [SHARED_ITEMS[0], *SHARED_ITEMS[2:]]  # independent_scores does not move a prompt's end space
    got = score_choices(model, tiny_tokenizer, items, batch_size=16)
    for got_row, item in zip(got, items, strict=True):
        assert got_row == pytest.approx(independent_scores(model, tiny_tokenizer, item), abs=1e-4)


def test_cached_prefix_with_prompts_cut_from_the_left(tiny_tokenizer):
    """Choices of different token lengths are cut differently, so share no prefix and run alone; choices
    of the same length still share theirs."""
    model = make_tiny_model("llama", len(tiny_tokenizer), max_position_embeddings=24)
    long = MCQItem("Supply and demand determine the price. " * 6, "Prices", ["go up.", "go down a lot."], 0)
    same = MCQItem("Supply and demand determine the price. " * 6, "Prices", ["supply.", "demand."], 0)
    assert [_shared_length(_requests(tiny_tokenizer, [item], 24)) for item in (long, same)] == [0, 22]
    assert_same_scores(model, tiny_tokenizer, [long, same, SHARED_ITEMS[3]])
    got = score_choices(model, tiny_tokenizer, [long, same])
    for got_row, item in zip(got, [long, same], strict=True):
        assert got_row == pytest.approx(independent_scores(model, tiny_tokenizer, item, max_len=24), abs=1e-4)


@pytest.mark.parametrize("name", ["llama", "qwen3", "phi", "opt"])
def test_cached_prefix_on_a_model_with_per_layer_widths(tiny_tokenizer, tmp_path, name):
    """A pruned model whose layers differ in width, reloaded from its exported remote code."""
    from transformers import AutoModelForCausalLM

    from minigpts.arch import get_adapter
    from minigpts.export import save_model
    from minigpts.plan import LayerPlan, PruningPlan
    from minigpts.surgery import apply_plan

    model = make_tiny_model(name, len(tiny_tokenizer), max_position_embeddings=256)
    adapter = get_adapter(model)
    layers = []
    for index, layer in enumerate(adapter.layers(model)):
        n_heads, n_kv, _ = adapter.head_layout(layer)
        group = n_heads // n_kv
        heads = list(range(n_heads))
        if index == 0 and adapter.head_pruning_problem(model.config) is None:
            heads = [h for h in heads if h // group != 0] if group > 1 else heads[n_heads // 2 :]
        layers.append(LayerPlan(list(range(8 * (index + 1))), heads, sorted({h // group for h in heads})))
    plan = PruningPlan(adapter.family, layers)
    plan.layout = "per-layer"
    pruned = apply_plan(model, plan)
    assert pruned.config.is_heterogeneous
    out = save_model(pruned, tiny_tokenizer, tmp_path / name, plan=plan)
    reloaded = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    assert_same_scores(reloaded, tiny_tokenizer, SHARED_ITEMS + ITEMS[:2])
    assert_same_scores(reloaded, tiny_tokenizer, SAME_CONTEXT)
