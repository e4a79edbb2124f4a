"""MCQ evaluation: scores equal an independent log-likelihood computation; both file formats read;
bad files are clear errors; the paper's real question sets load."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import TINY_CONFIGS, make_tiny_llama, make_tiny_model

import minigpts.mcq as mcq
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


def _questions(tokenizer, items, max_len=256):
    """(requests, request indices per question) of ``items``, as ``_score_packed`` takes them."""
    requests = _requests(tokenizer, items, max_len)
    questions, cursor = [], 0
    for item in items:
        questions.append(list(range(cursor, cursor + len(item.choices))))
        cursor += len(item.choices)
    return requests, questions


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


@pytest.fixture(params=[True, False], ids=["packed", "kv-cache"])
def packing(request, monkeypatch):
    """Both fast paths: packed token trees (the default where the model takes a 4D mask) and the
    shared-prefix KV cache (the fallback)."""
    monkeypatch.setattr(mcq, "_PACK", request.param)
    return request.param


@pytest.mark.parametrize("name", list(TINY_CONFIGS))
def test_cached_prefix_scores_equal_the_uncached_ones_for_every_family(tiny_tokenizer, name, packing):
    model = make_tiny_model(name, len(tiny_tokenizer), max_position_embeddings=256)
    shapes = forward_shapes(model)
    for batch_size in (1, 5, 16):  # one question per group, groups of one or two questions, all at once
        assert_same_scores(model, tiny_tokenizer, SHARED_ITEMS + ITEMS, batch_size=batch_size)
        assert_same_scores(model, tiny_tokenizer, SAME_CONTEXT, batch_size=batch_size)
    if packing:
        if not mcq._packable(model, mcq._requests(tiny_tokenizer, SAME_CONTEXT, 256)):
            return  # tiny Gemma's short sliding window: the KV-cache path ran
        shapes.clear()
        score_choices(model, tiny_tokenizer, SAME_CONTEXT, batch_size=16)
        packed = sum(rows * width for rows, width in shapes)
        assert len(shapes) <= 2  # every question in one or two passes
        shapes.clear()
        score_choices(model, tiny_tokenizer, SAME_CONTEXT, batch_size=16, cache=False)
        assert packed < sum(rows * width for rows, width in shapes) / 3
        return
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
def test_cached_prefix_under_sliding_windows_and_eager_attention(tiny_tokenizer, name, overrides, packing):
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


def test_cached_prefix_with_prompts_cut_from_the_left(tiny_tokenizer, packing):
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
def test_cached_prefix_on_a_model_with_per_layer_widths(tiny_tokenizer, tmp_path, name, packing):
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


# --- packed token trees: many questions' choices in one pass, scores of the one-sequence-per-choice path ---

MIXED = [
    # option counts from 2 to 7, prompts from 2 to ~60 tokens, choices from 1 to ~20 tokens
    MCQItem("", "2 + 2 =", ["4", "5"], 0),
    MCQItem(
        "Economics Test: " + "Supply and demand determine the price of goods in a market economy. " * 3,
        "Opportunity cost is",
        ["the value of the next best alternative.", "a price.", "free.", "the cost.", "x"],
        0,
    ),
    MCQItem(
        "Skyrim", "Damn it,", [" this will not stand!", "Hmm?", "émojis 📈", "no", "I", "yes", "a b c"], 4
    ),
    MCQItem("Economics Test:", "Prices", ["go up.", "go up and down and up again, in a market economy."], 1),
    MCQItem("Economics Test:", "Prices", ["go up.", "go down."], 1),  # a prompt and a choice seen before
    MCQItem("Economics Test:", "Prices", ["go up.", "go down."], 0),  # the same question twice
    MCQItem("Economics Test:", "When demand rises and supply stays the same, prices", ["rise.", "fall."], 0),
]


def naive_scores(model, tokenizer, items) -> list[list[float]]:
    """The reference: every (prompt, choice) sequence alone, one forward each, float64 log-softmax."""
    scores = []
    for item in items:
        row = []
        for ids, n_choice in _requests(tokenizer, [item], 256):
            with torch.no_grad():
                logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), dim=-1)
            row.append(sum(logprobs[t - 1, ids[t]].item() for t in range(len(ids) - n_choice, len(ids))))
        scores.append(row)
    return scores


def assert_naive_scores(got, expected, items) -> None:
    assert [len(row) for row in got] == [len(item.choices) for item in items]
    for got_row, expected_row in zip(got, expected, strict=True):
        assert got_row == pytest.approx(expected_row, abs=1e-4, rel=0)
        assert max(range(len(got_row)), key=got_row.__getitem__) == max(
            range(len(expected_row)), key=expected_row.__getitem__
        )
    assert mcq_metrics(items, got) == mcq_metrics(items, expected)


@pytest.mark.parametrize(
    ("name", "overrides"),
    [
        ("llama", {}),
        ("opt", {}),  # learned positions
        ("gpt2", {}),
        ("qwen3", {}),
        ("gemma2", dict(sliding_window=256)),  # eager, soft-capped; sliding layers wider than any sequence
        ("gemma3_text", dict(sliding_window=256)),
    ],
)
def test_packed_scores_equal_the_naive_reference(tiny_tokenizer, name, overrides, monkeypatch):
    model = make_tiny_model(name, len(tiny_tokenizer), max_position_embeddings=256, **overrides)
    assert mcq._packable(model, _requests(tiny_tokenizer, MIXED, 256))
    expected = naive_scores(model, tiny_tokenizer, MIXED)
    shapes = forward_shapes(model)
    for batch_size in (1, 2, 8, 64):  # a row per question up to every question in one row
        assert_naive_scores(
            score_choices(model, tiny_tokenizer, MIXED, batch_size=batch_size), expected, MIXED
        )
    # rows of 12 tokens: trees shared by several questions are cut, a larger question runs alone
    monkeypatch.setattr(mcq, "_ROW_TOKENS", 12)
    shapes.clear()
    assert_naive_scores(score_choices(model, tiny_tokenizer, MIXED, batch_size=64), expected, MIXED)
    assert len(shapes) > 1
    for items in (MIXED[::-1], MIXED[2:3], [MIXED[4], MIXED[4]]):  # order, one question, duplicates
        got = score_choices(model, tiny_tokenizer, items, batch_size=4)
        assert_naive_scores(got, naive_scores(model, tiny_tokenizer, items), items)


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_packed_scores_ignore_the_tokenizers_padding(tiny_tokenizer, padding_side):
    """The tokenizer's padding side and pad token play no part: padding is masked out wherever it goes."""
    import copy

    model = make_tiny_model("llama", len(tiny_tokenizer), max_position_embeddings=256)
    expected = naive_scores(model, tiny_tokenizer, MIXED)
    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.padding_side = padding_side
    assert_naive_scores(score_choices(model, tokenizer, MIXED, batch_size=3), expected, MIXED)
    tokenizer.pad_token = None
    assert tokenizer.pad_token_id is None
    assert_naive_scores(score_choices(model, tokenizer, MIXED, batch_size=3), expected, MIXED)
    assert_naive_scores(score_choices(model, tokenizer, MIXED, batch_size=3, cache=False), expected, MIXED)


def test_packed_trees_share_starts_and_own_every_scored_token(tiny_tokenizer):
    requests, questions = _questions(tiny_tokenizer, MIXED)
    trie = mcq._Trie(requests, questions)
    # one node per distinct (start of a sequence): the file's context and repeated prompts run once
    starts = {tuple(ids[: depth + 1]) for ids, _ in requests for depth in range(len(ids) - 1)}
    assert len(trie.token) == len(starts)
    assert sum(len(needed) for needed in trie.needed.values()) == sum(n for _, n in requests)
    for capacity in (4, 12, 40, 1000):
        units = trie.units(capacity)
        owned = [node for _, nodes in units for node in nodes]
        assert len(owned) == len(set(owned))  # a node is owned once ...
        assert set(trie.needed) <= set(owned)  # ... and every node a score needs is owned
        for ancestors, nodes in units:
            for node in nodes:  # a unit holds every ancestor of its nodes
                parent = trie.parent[node]
                assert parent == -1 or parent in ancestors or parent in nodes
        for columns, row_owned in mcq._pack_rows(units, capacity):
            assert len(columns) == len(set(columns)) and row_owned <= set(columns)
            # a row keeps to the capacity unless it holds one unit that is larger on its own
            assert len(columns) <= capacity or any(set(nodes) == row_owned for _, nodes in units)
    # a question's tree stays whole: its prompt runs once however small the rows
    for _, nodes in trie.units(4):
        assert len({trie.owner[node] for node in nodes}) == 1 or len(nodes) == 1


def test_packing_needs_a_4d_mask_and_no_sliding_window_cut(tiny_tokenizer):
    requests = _requests(tiny_tokenizer, SHARED_ITEMS, 256)
    longest = max(len(ids) for ids, _ in requests)
    assert mcq._packable(make_tiny_model("llama", len(tiny_tokenizer)), requests)
    assert mcq._packable(make_tiny_model("llama", len(tiny_tokenizer), attn_implementation="eager"), requests)
    mistral = make_tiny_model("mistral", len(tiny_tokenizer), max_position_embeddings=256, sliding_window=8)
    assert not mcq._packable(mistral, requests)  # the KV-cache path runs (tested above)
    wide = make_tiny_model(
        "mistral", len(tiny_tokenizer), max_position_embeddings=256, sliding_window=longest
    )
    assert mcq._packable(wide, requests)
    model = make_tiny_model("llama", len(tiny_tokenizer))
    model.config._attn_implementation = "flash_attention_2"  # takes no custom mask
    assert not mcq._packable(model, requests)


def test_data_parallel_shares_add_up_to_the_single_process_scores(tiny_tokenizer, monkeypatch):
    """Under torch.distributed each rank scores its share (possibly none) and the shares are summed."""
    from minigpts import distributed

    model = make_tiny_model("llama", len(tiny_tokenizer), max_position_embeddings=256)
    items = MIXED[:3]
    single = score_choices(model, tiny_tokenizer, items, batch_size=4)
    world = 4  # more ranks than questions: the last gets none
    shares = [(0, 1), (1, 2), (2, 3), (3, 3)]
    total = [[0.0] * len(item.choices) for item in items]
    monkeypatch.setattr(distributed, "active", lambda: True)
    monkeypatch.setattr(distributed, "reduce", lambda tensors: None)
    for rank in range(world):
        monkeypatch.setattr(distributed, "bounds", lambda n, align=1, rank=rank: shares[rank])
        local = score_choices(model, tiny_tokenizer, items, batch_size=4)
        total = [[a + b for a, b in zip(x, y, strict=True)] for x, y in zip(total, local, strict=True)]
    for got_row, single_row in zip(total, single, strict=True):
        assert got_row == pytest.approx(single_row, abs=1e-6, rel=0)
