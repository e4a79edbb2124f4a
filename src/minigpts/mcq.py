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
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from minigpts.errors import UserError

PROMPT_FORMAT = 'context + "\\n" + question, then " " + choice; prompt and choice tokenized separately'


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


def score_choices(model, tokenizer, items: list[MCQItem], *, batch_size: int = 8) -> list[list[float]]:
    """Summed log-likelihood (nats) of every choice's tokens given its prompt, per question.

    Requests are batched longest first (right padding with an attention mask), on the model's device,
    in inference mode; the model is put in eval mode for the call and restored afterwards.
    """
    requests = _requests(tokenizer, items, _max_positions(model))
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    order = sorted(range(len(requests)), key=lambda i: -len(requests[i][0]))
    scores = [0.0] * len(requests)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                batch = order[start : start + batch_size]
                inputs = [requests[i][0][:-1] for i in batch]  # the last token predicts nothing we score
                width = max(len(ids) for ids in inputs)
                input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
                attention = torch.zeros((len(batch), width), dtype=torch.long)
                for row, ids in enumerate(inputs):
                    input_ids[row, : len(ids)] = torch.tensor(ids)
                    attention[row, : len(ids)] = 1
                logits = model(
                    input_ids=input_ids.to(device), attention_mask=attention.to(device), use_cache=False
                ).logits
                for row, index in enumerate(batch):
                    ids, n_choice = requests[index]
                    targets = torch.tensor(ids[-n_choice:], device=logits.device)
                    positions = slice(len(ids) - 1 - n_choice, len(ids) - 1)
                    logprobs = torch.log_softmax(logits[row, positions].float(), dim=-1)
                    scores[index] = logprobs.gather(-1, targets[:, None]).sum().item()
    finally:
        model.train(was_training)
    per_question, cursor = [], 0
    for item in items:
        per_question.append(scores[cursor : cursor + len(item.choices)])
        cursor += len(item.choices)
    return per_question


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


def evaluate_mcq(model, tokenizer, items: list[MCQItem], *, batch_size: int = 8) -> dict:
    """{accuracy, accuracy_norm, questions, chance} of ``model`` on ``items`` (see the module docstring)."""
    if not items:
        raise UserError("--mcq: no questions to evaluate")
    return mcq_metrics(items, score_choices(model, tokenizer, items, batch_size=batch_size))
