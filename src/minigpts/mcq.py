"""Multiple-choice evaluation by log-likelihood, as in the paper and lm-evaluation-harness.

Scoring protocol (printed with results so numbers can be compared):

- prompt = ``context + "\\n" + question`` (just ``question`` when the context is empty);
- continuation = the choice, joined with one space unless the choice already starts with
  whitespace; trailing whitespace of the prompt moves to the start of the continuation (lm-eval
  does the same), so the word boundary stays inside the scored text;
- prompt and continuation are tokenized **separately** and concatenated, so every choice is scored
  on exactly its own tokens and every choice of a question sees the same prompt tokens; the prompt
  gets the special-token prefix (BOS) the tokenizer adds by itself, the continuation none;
- score = Σ log p(continuation token | everything before it); ``accuracy`` takes the argmax of the
  sum, ``accuracy_norm`` of the sum divided by the UTF-8 byte length of the choice text
  (lm-eval's acc_norm); ``chance`` = mean over questions of 1 / number of choices;
- a sequence longer than the model's context is cut from the left (the prompt's start goes first).

Fast path (``score_choices``' default): the inputs of all sequences form one token tree (a node is a
token after exactly its ancestors), so the file's context, each question's prompt and equal first words
of choices run once; whole question trees are packed many to a row, and a 4D attention mask lets each
token see exactly its ancestors, at its own sequence's positions (``_score_packed``). Logits are
computed only for the columns that score a token. Models that take no custom 4D mask (flash / flex
attention) or whose sliding window would cut a sequence run each question's prompt once and every choice
from its KV cache instead (``_score_shared``). ``score_choices(..., cache=False)`` runs every sequence
whole (the naive reference). All paths score the same tokens with the same conditioning and positions,
so the scores agree to float rounding (~1e-5 nats on SmolLM2) and pick the same answers.
"""

from __future__ import annotations

import copy
import inspect
import itertools
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from minigpts.errors import UserError
from minigpts.evaluation import eval_mode


@dataclass
class MCQItem:
    """One question: the shared context (may be empty), the question, its choices and the right index."""

    context: str
    question: str
    choices: list[str]
    answer: int

    def to_dict(self) -> dict:
        return asdict(self)


class _Pairs(dict):
    """A JSON object that also remembers every (key, value) pair, so repeated question texts survive."""

    def __init__(self, pairs):
        super().__init__(pairs)
        self.pairs = pairs


def _item(where: str, context, question, choices, answer) -> MCQItem:
    if not isinstance(context, str):
        raise UserError(f"{where}: 'context' must be a string")
    if not isinstance(question, str) or not question.strip():
        raise UserError(f"{where}: 'question' must be a non-empty string")
    if not isinstance(choices, list) or len(choices) < 2:
        raise UserError(f"{where}: 'choices' must be a list of at least two strings")
    if not all(isinstance(c, str) and c for c in choices):  # whitespace-only distractors occur (Skyrim set)
        raise UserError(f"{where}: every choice must be a non-empty string")
    if isinstance(answer, bool) or not isinstance(answer, int):
        raise UserError(f"{where}: 'answer' must be the index of the right choice (an integer)")
    if not 0 <= answer < len(choices):
        raise UserError(f"{where}: answer index {answer} is out of range for {len(choices)} choices")
    return MCQItem(context=context, question=question, choices=list(choices), answer=answer)


def _require(record, fields: tuple[str, ...], where: str) -> None:
    if not isinstance(record, dict):
        raise UserError(f"{where}: expected a JSON object")
    missing = [name for name in fields if name not in record]
    if missing:
        raise UserError(
            f"{where}: missing field(s) {', '.join(missing)} (has: {', '.join(record) or 'nothing'})"
        )


def _from_records(records, where: str) -> list[MCQItem]:
    items = []
    for number, record in records:
        at = f"{where} (record {number})"
        _require(record, ("question", "choices", "answer"), at)
        items.append(
            _item(at, record.get("context", ""), record["question"], record["choices"], record["answer"])
        )
    return items


def _from_paper_format(data: _Pairs, where: str) -> list[MCQItem]:
    _require(data, ("context", "questions"), where)
    questions = data["questions"]
    if not isinstance(questions, _Pairs):
        raise UserError(f"{where}: 'questions' must be an object {{question text: {{choices, answer}}}}")
    items = []
    for question, spec in questions.pairs:
        at = f"{where} (question {question[:40]!r})"
        _require(spec, ("choices", "answer"), at)
        items.append(_item(at, data["context"], question, spec["choices"], spec["answer"]))
    return items


def load_mcq(path) -> list[MCQItem]:
    """Read a question set: the paper's JSON object or JSON Lines (question, choices, answer[, context]).

    A ``.jsonl`` file is read as one record per line; any other file as one JSON document, either the
    paper's ``{"context": ..., "questions": {question: {"choices": [...], "answer": i}}}`` or a list
    of records.
    """
    path = Path(path)
    where = f"--mcq {path}"
    if not path.is_file():
        raise UserError(f"{where}: no such file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise UserError(f"{where}: not UTF-8 text (byte {err.start})") from None
    if path.suffix.lower() == ".jsonl":
        records = []
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    records.append((number, json.loads(line)))
                except json.JSONDecodeError as err:
                    raise UserError(f"{where}: line {number} is not valid JSON ({err.msg})") from None
        items = _from_records(records, where)
    else:
        try:
            data = json.loads(text, object_pairs_hook=_Pairs)
        except json.JSONDecodeError as err:
            raise UserError(f"{where}: not valid JSON ({err.msg} at line {err.lineno})") from None
        if isinstance(data, list):
            items = _from_records(enumerate(data, start=1), where)
        else:
            items = _from_paper_format(data, where)
    if not items:
        raise UserError(f"{where}: holds no questions")
    return items


def _special_prefix(tokenizer) -> list[int]:
    """The ids the tokenizer puts before any text by itself (Llama's BOS; nothing for GPT-2 style)."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    start = next((i for i in range(len(full) - len(plain) + 1) if full[i : i + len(plain)] == plain), 0)
    return full[:start]


def _split_prompt(item: MCQItem, choice: str) -> tuple[str, str]:
    """(prompt, continuation): the text is prompt + " " + choice (no space when either side has one there)."""
    prompt = f"{item.context}\n{item.question}" if item.context else item.question
    separator = "" if choice[:1].isspace() or prompt[-1:].isspace() else " "
    text = prompt + separator + choice
    kept = prompt.rstrip()
    return kept, text[len(kept) :]


def _max_positions(model) -> int | None:
    config = model.config
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _requests(tokenizer, items: list[MCQItem], max_len: int | None) -> list[tuple[list[int], int]]:
    """(token ids of prompt+continuation, number of continuation tokens) for every (question, choice)."""
    prefix = _special_prefix(tokenizer)
    # lm-eval's rule for an empty prompt: condition on the start (or end) of text token
    fallback = [t for t in (tokenizer.bos_token_id, tokenizer.eos_token_id) if t is not None][:1]
    requests = []
    for number, item in enumerate(items, start=1):
        for choice in item.choices:
            prompt, continuation = _split_prompt(item, choice)
            prompt_ids = prefix + tokenizer(prompt, add_special_tokens=False)["input_ids"]
            prompt_ids = prompt_ids or fallback
            choice_ids = tokenizer(continuation, add_special_tokens=False)["input_ids"]
            if not prompt_ids or not choice_ids:
                raise UserError(f"--mcq question {number}: the prompt or a choice encodes to no tokens")
            ids = prompt_ids + choice_ids
            if max_len is not None and len(ids) > max_len:
                if len(choice_ids) >= max_len:
                    raise UserError(
                        f"--mcq question {number}: a choice has {len(choice_ids)} tokens, "
                        f"more than the model's {max_len}-token context"
                    )
                ids = ids[-max_len:]
            requests.append((ids, len(choice_ids)))
    return requests


def _select_rows(cache, rows: torch.Tensor):
    """The cache with its batch rows replaced by ``rows`` (indices into the current rows; repeats allowed)."""
    if hasattr(cache, "batch_select_indices"):
        cache.batch_select_indices(rows)
        return cache
    return tuple(tuple(tensor[rows] for tensor in layer) for layer in cache)  # legacy tuple cache


def _score_full(model, requests, indices, *, batch_size, pad_id, device, scores) -> None:
    """Score ``requests[i]`` for every i in ``indices``, each sequence on its own (no shared prefix)."""
    order = sorted(indices, key=lambda i: -len(requests[i][0]))
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        inputs = [requests[i][0][:-1] for i in batch]  # the last token predicts nothing we score
        input_ids, attention = _pad(inputs, pad_id)
        logits = model(
            input_ids=input_ids.to(device), attention_mask=attention.to(device), use_cache=False
        ).logits
        for row, index in enumerate(batch):
            ids, n_choice = requests[index]
            scores[index] = _sum_logprobs(
                logits[row, len(ids) - 1 - n_choice : len(ids) - 1], ids[-n_choice:]
            )


def _pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input ids, attention mask), right-padded to the longest row."""
    width = max(len(ids) for ids in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    for row, ids in enumerate(rows):
        input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention[row, : len(ids)] = 1
    return input_ids, attention


def _sum_logprobs(logits: torch.Tensor, targets: list[int]) -> float:
    targets = torch.tensor(targets, device=logits.device)
    logprobs = torch.log_softmax(logits.double(), dim=-1)
    return logprobs.gather(-1, targets[:, None]).sum().item()


# A forward pass costs about as much as this many more tokens (the weights are read once per pass;
# measured with a 135M-parameter model on CPU). It only decides where padded batches are cut.
_PASS_COST_TOKENS = 32
# A cached token held for a continuation counts as this fraction of a token in a batch's budget: its keys
# and values are several times smaller than a row of logits (4.3x for SmolLM2-135M).
_CACHED_TOKEN_SHARE = 0.25


def _chunks(widths: list[int], budget: float, *, held: float = 0.0) -> list[tuple[int, int]]:
    """Cut rows sorted longest first into consecutive (start, stop) batches, each run padded to its
    first row's width: the fewest padded tokens plus ``_PASS_COST_TOKENS`` per batch, where a batch of
    more than one row holds at most ``budget`` tokens, counting ``held`` more (cached ones) per row."""
    count = len(widths)
    best = [0.0] * (count + 1)
    stop = [count] * (count + 1)
    for start in range(count - 1, -1, -1):
        best[start] = math.inf
        for end in range(start + 1, count + 1):
            if end - start > 1 and (end - start) * (widths[start] + held) > budget:
                break
            cost = _PASS_COST_TOKENS + (end - start) * widths[start] + best[end]
            if cost < best[start]:
                best[start], stop[start] = cost, end
    chunks, start = [], 0
    while start < count:
        chunks.append((start, stop[start]))
        start = stop[start]
    return chunks


def _common_length(sequences: list[list[int]]) -> int:
    """Length of the longest common start of ``sequences``."""
    length = 0
    shortest = min(len(ids) for ids in sequences)
    while length < shortest and all(ids[length] == sequences[0][length] for ids in sequences):
        length += 1
    return length


def _shared_length(requests: list[tuple[list[int], int]]) -> int:
    """Tokens every request of one question shares at its start, up to the first scored token of any."""
    limit = min(len(ids) - n_choice for ids, n_choice in requests)
    return min(_common_length([ids for ids, _ in requests]), limit)


def _sliding_window(config) -> int | None:
    """The attention window of a model that has one (Mistral; Qwen2/3 with sliding layers), else None."""
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and not any("sliding" in str(kind) for kind in layer_types):
        return None
    return window if isinstance(window, int) and window > 0 else None


def _score_shared(model, requests, questions, *, batch_size, pad_id, device, scores) -> None:
    """Score every request of ``questions`` [(request indices, shared length)]: the tokens all questions
    share at their start (the file's context) run once, the rest of each question's prompt once, and
    every choice continues from that prompt's KV cache.

    A pass holds at most the tokens of ``batch_size`` of the longest sequences (the largest batch of the
    uncached path), cut by ``_chunks``. The prompts run longest first, left-padded after the common
    start so that the last column holds every prompt's last token: its logits score each choice's first
    token. The cache's rows are then repeated once per choice, and the choices' remaining tokens run as
    right-padded batches (longest first). Padding is masked out and every row's positions continue its
    own sequence, so each scored token sees exactly the tokens, at the same positions, that it sees when
    its sequence runs alone.
    """
    forward = _Forward(model, device)
    budget = batch_size * max(len(requests[i][0]) for indices, _ in questions for i in indices)
    order = sorted(questions, key=lambda question: -question[1])
    # the start every prompt shares runs once (each prompt keeps a token of its own for its logits); it
    # leaves padding between that start and the rest of the prompts, where a sliding window, which
    # counts cache slots rather than positions, would see a different span: then only if none reaches it
    window = _sliding_window(model.config)
    root = 0
    if len(order) > 1 and (window is None or 2 * budget // batch_size <= window):
        root = min(_common_length([requests[indices[0]][0] for indices, _ in order]), order[-1][1] - 1)
    root_cache = None
    if root > 0:
        root_ids = torch.tensor([requests[order[0][0][0]][0][:root]])
        ones = torch.ones_like(root_ids)
        _, root_cache = forward(root_ids, ones, ones.cumsum(-1) - 1, last_only=True)
    groups = _chunks([shared - root for _, shared in order], budget, held=root * _CACHED_TOKEN_SHARE)
    for number, (first, stop) in enumerate(groups):
        group = order[first:stop]
        width = group[0][1] - root
        prompt_ids = torch.full((len(group), width), pad_id, dtype=torch.long)
        prompt_mask = torch.zeros((len(group), width), dtype=torch.long)
        for row, (indices, shared) in enumerate(group):
            prompt_ids[row, width - shared + root :] = torch.tensor(requests[indices[0]][0][root:shared])
            prompt_mask[row, width - shared + root :] = 1
        cache = None
        if root_cache is not None:
            cache = root_cache if number == len(groups) - 1 else copy.deepcopy(root_cache)
            cache = _select_rows(cache, torch.zeros(len(group), dtype=torch.long, device=device))
        positions = root + (prompt_mask.cumsum(-1) - 1).clamp(min=0)
        prefix_mask = torch.cat([torch.ones((len(group), root), dtype=torch.long), prompt_mask], dim=1)
        logits, cache = forward(prompt_ids, prefix_mask, positions, cache, last_only=True)
        next_token = torch.log_softmax(logits[:, -1].double(), dim=-1)  # predicts token `shared`
        del logits
        _score_choices(
            forward, requests, group, next_token, cache, prefix_mask, budget, pad_id, device, scores
        )
        del cache


def _score_choices(forward, requests, group, next_token, cache, prefix_mask, budget, pad_id, device, scores):
    """``_score_shared``'s second step: every choice of one prompt batch continues from its ``cache``."""
    rows = []  # (request index, its question's row in the prompt batch, shared length)
    for owner, (indices, shared) in enumerate(group):
        for index in indices:
            ids, n_choice = requests[index]
            if len(ids) - n_choice == shared:  # the first scored token follows the prompt
                scores[index] = next_token[owner, ids[shared]].item()
            if len(ids) - 1 > shared:  # tokens left to run (the last predicts nothing we score)
                rows.append((index, owner, shared))
    rows.sort(key=lambda row: -(len(requests[row[0]][0]) - 1 - row[2]))
    widths = [len(requests[index][0]) - 1 - shared for index, _, shared in rows]
    chunks = _chunks(widths, budget, held=prefix_mask.shape[1] * _CACHED_TOKEN_SHARE)
    for part, (start, stop) in enumerate(chunks):
        chunk = rows[start:stop]
        owners = [owner for _, owner, _ in chunk]
        # the last batch may consume the prompts' cache; the others continue from a copy of it
        rows_cache = cache if part == len(chunks) - 1 else copy.deepcopy(cache)
        rows_cache = _select_rows(rows_cache, torch.tensor(owners, device=device))
        suffixes = [requests[index][0][shared:-1] for index, _, shared in chunk]
        suffix_ids, suffix_mask = _pad(suffixes, pad_id)
        offset = torch.tensor([shared for _, _, shared in chunk])[:, None]
        last = offset + torch.tensor([len(suffix) for suffix in suffixes])[:, None] - 1
        # padding repeats its row's last position, so no position goes past the model's context
        positions = torch.minimum(offset + torch.arange(suffix_ids.shape[1]), last)
        mask = torch.cat([prefix_mask[owners], suffix_mask], dim=1)
        logits, _ = forward(suffix_ids, mask, positions, rows_cache)
        del rows_cache
        for row, (index, _, shared) in enumerate(chunk):
            ids, n_choice = requests[index]
            # column j holds token shared + j and predicts token shared + j + 1
            skip = max(len(ids) - 1 - n_choice - shared, 0)
            scores[index] += _sum_logprobs(
                logits[row, skip : len(ids) - 1 - shared], ids[shared + 1 + skip :]
            )
        del logits


class _Forward:
    """One forward pass through the generic transformers API, continuing ``cache`` when one is given:
    (logits, the cache extended by these tokens)."""

    def __init__(self, model, device):
        try:
            parameters = inspect.signature(model.forward).parameters
        except (TypeError, ValueError):
            parameters = {}
        self.model, self.device = model, device
        # transformers 5 renamed ``past_key_values`` to ``cache``; remote code may still use the old name
        self.cache_arg = "cache" if "cache" in parameters else "past_key_values"
        self.keeps_logits = "logits_to_keep" in parameters

    def __call__(self, input_ids, attention_mask, position_ids, cache=None, *, last_only=False):
        extra = {self.cache_arg: cache} if cache is not None else {}
        if last_only and self.keeps_logits:
            extra["logits_to_keep"] = 1
        output = self.model(
            input_ids=input_ids.to(self.device),
            attention_mask=attention_mask.to(self.device),
            position_ids=position_ids.to(self.device),
            use_cache=True,
            **extra,
        )
        cache = getattr(output, "cache", None)
        return output.logits, cache if cache is not None else output.past_key_values


# --- every question's choices as one token tree, many trees packed per row (the default) ------------------

# Packing is used where the model takes a custom 4D attention mask (transformers' sdpa and eager
# attention); tests switch it off to run the KV-cache path on every family.
_PACK = True
# A packed row holds about this many tokens: attention over a row grows with its square, the rest of the
# pass with its length (at 128 attention is a few % of a 135M model's pass).
_ROW_TOKENS = 128


def _packable(model, requests) -> bool:
    """Whether ``model`` can score packed token trees: it honours a custom 4D mask, and no sliding window
    cuts any sequence (the mask then holds the whole attention pattern)."""
    if not _PACK or getattr(model.config, "_attn_implementation", None) not in ("sdpa", "eager"):
        return False
    window = _sliding_window(model.config)
    return window is None or max(len(ids) for ids, _ in requests) <= window


class _Trie:
    """The inputs of every request (its ids but the last) as one token tree: a node is a token at its
    depth (= position) after exactly its ancestors, so equal starts (the file's context, a question's
    prompt, the first words of choices) run once. ``needed[node]`` = [(request, token it predicts)];
    ``shared[node]``: requests of more than one question pass through the node."""

    def __init__(self, requests, questions: list[list[int]]):
        self.token: list[int] = []
        self.parent: list[int] = []
        self.depth: list[int] = []
        self.children: list[list[int]] = []
        self.owner: list[int] = []  # the first question through the node
        self.shared: list[bool] = []
        self.top: list[int] = []
        self.needed: dict[int, list[tuple[int, int]]] = {}
        edges: dict[tuple[int, int], int] = {}
        for question, indices in enumerate(questions):
            for index in indices:
                ids, n_choice = requests[index]
                path, node = [], -1
                for depth, token in enumerate(ids[:-1]):
                    child = edges.get((node, token))
                    if child is None:
                        child = edges[(node, token)] = len(self.token)
                        self.token.append(token)
                        self.parent.append(node)
                        self.depth.append(depth)
                        self.children.append([])
                        self.owner.append(question)
                        self.shared.append(False)
                        (self.children[node] if node >= 0 else self.top).append(child)
                    elif self.owner[child] != question:
                        self.shared[child] = True
                    node = child
                    path.append(node)
                for position in range(len(ids) - n_choice, len(ids)):  # token `position` is scored ...
                    self.needed.setdefault(path[position - 1], []).append((index, ids[position]))  # ... here

    def subtree(self, start: int) -> list[int]:
        nodes, todo = [], [start]
        while todo:
            node = todo.pop()
            nodes.append(node)
            todo.extend(reversed(self.children[node]))
        return nodes

    def units(self, capacity: int) -> list[tuple[list[int], list[int]]]:
        """The tree cut into (ancestors, nodes) units of at most ``capacity`` tokens where it can be: a
        unit owns ``nodes`` (a subtree, parents first) and needs its ``ancestors`` in the same row. A
        unit too large is cut below a node that several questions share (its ancestors then run once per
        unit); one question's tree stays whole, so its prompt runs once however long it is."""
        units, todo = [], [([], self.subtree(start)) for start in reversed(self.top)]
        while todo:
            ancestors, nodes = todo.pop()
            root = nodes[0]
            if len(ancestors) + len(nodes) <= capacity or not self.shared[root]:
                units.append((ancestors, nodes))
                continue
            if root in self.needed:
                units.append((ancestors, [root]))
            below = ancestors + [root]
            todo.extend((below, self.subtree(child)) for child in reversed(self.children[root]))
        return units


def _pack_rows(units: list[tuple[list[int], list[int]]], capacity: int) -> list[tuple[list[int], set[int]]]:
    """Rows of (columns: nodes, parents first; the nodes the row owns), filled first fit by decreasing
    unit size; ancestors that units of a row share are counted and placed once."""
    rows: list[tuple[list[int], set[int], set[int]]] = []  # (columns, their set, owned)
    for ancestors, nodes in sorted(units, key=lambda unit: -(len(unit[0]) + len(unit[1]))):
        for row in rows:
            missing = [node for node in ancestors + nodes if node not in row[1]]
            if len(row[0]) + len(missing) <= capacity:
                break
        else:
            row = ([], set(), set())
            rows.append(row)
            missing = ancestors + nodes
        columns, present, owned = row
        columns.extend(missing)  # a unit of one shared node may already be there as an ancestor
        present.update(missing)
        owned.update(nodes)
    return [(columns, owned) for columns, _, owned in rows]


def _score_packed(model, requests, questions, *, batch_size, pad_id, device, scores) -> None:
    """Score every request of ``questions`` (lists of request indices) from packed token trees (``_Trie``).

    A row holds whole units of the tree (about ``_ROW_TOKENS`` tokens in all); a 4D attention mask lets
    every token see exactly its ancestors and position ids give each token its depth, so every scored
    token sees the tokens, at the positions, it sees when its sequence runs alone. Tokens whose logits
    score something come last in their row, so the model computes logits only for the last columns
    (``logits_to_keep``). Rows sorted longest first are cut into passes by ``_chunks``: a pass holds at
    most the tokens of ``batch_size`` of the longest sequences, unless one question's tree is larger (it
    then runs alone).
    """
    indices = [index for question in questions for index in question]
    trie = _Trie(requests, questions)
    budget = batch_size * max(len(requests[i][0]) for i in indices)
    capacity = min(_ROW_TOKENS, budget)
    rows = _pack_rows(trie.units(capacity), capacity)
    rows.sort(key=lambda row: -len(row[0]))
    try:
        keeps_logits = "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        keeps_logits = False
    eager = model.config._attn_implementation == "eager"
    dtype = next(model.parameters()).dtype
    totals = torch.zeros(len(requests), dtype=torch.float64)
    for first, stop in _chunks([len(columns) for columns, _ in rows], budget):
        input_ids, positions, allowed, keep, picks = _packed_batch(trie, rows[first:stop], pad_id)
        mask = allowed[:, None]
        if eager:  # eager attention adds the mask to the scores
            mask = torch.zeros(mask.shape, dtype=dtype).masked_fill(~mask, torch.finfo(dtype).min)
        extra = {"logits_to_keep": keep} if keeps_logits else {}
        logits = model(
            input_ids=input_ids.to(device),
            attention_mask=mask.to(device),
            position_ids=positions.to(device),
            use_cache=False,
            **extra,
        ).logits[:, -keep:]
        cells = sorted({(row, col) for row, col, _, _ in picks})
        cell = {key: number for number, key in enumerate(cells)}
        chosen = logits[[r for r, _ in cells], [c for _, c in cells]]  # (scoring columns, vocabulary)
        del logits
        norm = torch.cat([torch.logsumexp(part.double(), dim=-1) for part in chosen.split(64)])
        where = torch.tensor([cell[(row, col)] for row, col, _, _ in picks], device=chosen.device)
        targets = torch.tensor([target for _, _, _, target in picks], device=chosen.device)
        values = chosen[where, targets].double() - norm[where]
        totals.index_add_(0, torch.tensor([index for _, _, index, _ in picks]), values.cpu())
        del chosen
    for index in indices:
        scores[index] = totals[index].item()


def _packed_batch(trie: _Trie, batch, pad_id: int):
    """One pass of ``_score_packed``: (input ids, positions, allowed attention [row, from, to], logits to
    keep, [(row, kept column, request, target)])."""
    width = len(batch[0][0])
    keep = max(sum(node in trie.needed for node in owned) for _, owned in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    positions = torch.zeros((len(batch), width), dtype=torch.long)
    allowed = torch.zeros((len(batch), width, width), dtype=torch.bool)
    allowed[:, torch.arange(width), torch.arange(width)] = True  # padding sees itself only
    mask_rows, mask_from, mask_to = [], [], []
    picks = []  # (row, kept column, request, target)
    for row, (columns, owned) in enumerate(batch):
        scoring = [node for node in columns if node in owned and node in trie.needed]
        order = [node for node in columns if node not in owned or node not in trie.needed] + scoring
        start = width - len(order)  # padding on the left, scoring columns on the right
        column = {node: start + offset for offset, node in enumerate(order)}
        input_ids[row, start:] = torch.tensor([trie.token[node] for node in order])
        positions[row, start:] = torch.tensor([trie.depth[node] for node in order])
        for node in order:
            here, ancestor = column[node], trie.parent[node]
            while ancestor >= 0:
                mask_rows.append(row)
                mask_from.append(here)
                mask_to.append(column[ancestor])
                ancestor = trie.parent[ancestor]
        for node in scoring:
            for index, target in trie.needed[node]:
                picks.append((row, column[node] - (width - keep), index, target))
    allowed[mask_rows, mask_from, mask_to] = True
    return input_ids, positions, allowed, keep, picks


def score_choices(
    model, tokenizer, items: list[MCQItem], *, batch_size: int = 8, cache: bool = True
) -> list[list[float]]:
    """Summed log-likelihood (nats) of every choice's tokens given its prompt, per question.

    With ``cache`` (the default) every question's prompt and choices run as one packed token tree, many
    questions per pass (``_score_packed``), or, on a model that takes no custom 4D attention mask, the
    tokens a question's choices share at their start (the prompt) run once and every choice continues
    from their KV cache (``_score_shared``); without ``cache``, or on the KV-cache path for a question
    whose choices share no first token (a prompt cut differently per choice), every (prompt, choice)
    sequence runs on its own, ``batch_size`` at a time, longest first. Both score the
    same tokens with the same conditioning and positions, so they differ only by float rounding
    (log-probabilities are summed in float64). A forward pass holds at most the tokens of ``batch_size``
    of the longest sequences. Runs on the model's device, in inference mode; the model is put in eval
    mode for the call and restored afterwards. Under ``torch.distributed`` each process scores a
    contiguous share of the questions and the scores are all-reduced (every process gets them all).
    """
    from minigpts import distributed

    if distributed.active():
        start, stop = distributed.bounds(len(items))
        local = _score_choices_local(model, tokenizer, items[start:stop], batch_size=batch_size, cache=cache)
        offsets = _choice_offsets(items)
        flat = torch.zeros(offsets[-1], dtype=torch.float64)
        values = [score for question in local for score in question]
        flat[offsets[start] : offsets[stop]] = torch.tensor(values, dtype=torch.float64)
        distributed.reduce([flat])  # zeros elsewhere: the sum is each question's own scores
        flat = flat.tolist()
        return [flat[start:stop] for start, stop in itertools.pairwise(offsets)]
    return _score_choices_local(model, tokenizer, items, batch_size=batch_size, cache=cache)


def _score_choices_local(
    model, tokenizer, items: list[MCQItem], *, batch_size: int = 8, cache: bool = True
) -> list[list[float]]:
    """``score_choices`` on this process alone."""
    requests = _requests(tokenizer, items, _max_positions(model))
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    scores = [0.0] * len(requests)
    offsets = _choice_offsets(items)
    questions = [list(range(start, stop)) for start, stop in itertools.pairwise(offsets)]
    alone: list[int] = []
    shared: list[tuple[list[int], int]] = []
    for indices in questions:
        length = _shared_length([requests[i] for i in indices]) if cache else 0
        if length:
            shared.append((indices, length))
        else:
            alone.extend(indices)
    packed = cache and bool(requests) and _packable(model, requests)  # a rank may get no questions
    with eval_mode(model), torch.inference_mode():
        common = dict(batch_size=batch_size, pad_id=pad_id, device=device, scores=scores)
        if packed:
            _score_packed(model, requests, questions, **common)
        elif shared:
            _score_shared(model, requests, shared, **common)
        if alone and not packed:
            _score_full(model, requests, alone, **common)
    return [scores[start:stop] for start, stop in itertools.pairwise(offsets)]


def _choice_offsets(items: list[MCQItem]) -> list[int]:
    """Where each question's choices start in the flat list of every choice, then the total."""
    return list(itertools.accumulate((len(item.choices) for item in items), initial=0))


def mcq_metrics(items: list[MCQItem], scores: list[list[float]]) -> dict:
    """accuracy (argmax of the summed log-likelihood), accuracy_norm (per UTF-8 byte of the choice), chance."""
    correct = correct_norm = 0
    for item, choice_scores in zip(items, scores, strict=True):
        best = max(range(len(choice_scores)), key=choice_scores.__getitem__)
        per_byte = [
            s / max(1, len(c.encode("utf-8"))) for s, c in zip(choice_scores, item.choices, strict=True)
        ]
        best_norm = max(range(len(per_byte)), key=per_byte.__getitem__)
        correct += best == item.answer
        correct_norm += best_norm == item.answer
    n = len(items)
    return {
        "accuracy": correct / n,
        "accuracy_norm": correct_norm / n,
        "questions": n,
        "chance": sum(1 / len(item.choices) for item in items) / n,
    }


def evaluate_mcq(model, tokenizer, items: list[MCQItem], *, batch_size: int = 8, cache: bool = True) -> dict:
    """{accuracy, accuracy_norm, questions, chance} of ``model`` on ``items`` (see the module docstring;
    ``cache`` as in ``score_choices``)."""
    if not items:
        raise UserError("--mcq: no questions to evaluate")
    return mcq_metrics(items, score_choices(model, tokenizer, items, batch_size=batch_size, cache=cache))
