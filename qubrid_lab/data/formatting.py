"""Dataset rows to training examples: token ids plus labels, with -100 where no loss is taken.

qa: the user turn (question, then a blank line and the context when there is one) is rendered with the base
model's own chat template and its generation prompt, exactly as the chat endpoint renders a request, and takes
no loss. The answer follows as the assistant turn and takes the loss up to and including the template's
end-of-turn token (``<|im_end|>``, ``<|eot_id|>``, ``</s>``...), so the model learns to stop after answering.
Whatever the template writes after that token (a newline before the next turn) is never generated and is
left out. A template that closes the turn without a special token gets the tokenizer's EOS appended.
Special-token text inside the data ("<|im_end|>" typed in a cell) is encoded as plain text, so rows cannot
forge turns or end the answer early.

not_qa: causal language modelling on the text, encoded as the completions endpoint encodes a prompt, plus EOS;
every token takes the loss.

chat (JSONL conversations): each assistant turn with weight 1 takes the loss as a qa answer does, after its
history rendered as the chat endpoint would render it for that turn; everything else (system, user, weight-0
assistant turns, the template's turn headers) takes none.

Cells are stripped of surrounding whitespace; a row whose required cell is then empty is skipped.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from qubrid_lab.data.columns import ColumnPlan

IGNORE_INDEX = -100  # label value the loss skips (prompt tokens, and padding in a batch)


@dataclass
class ExampleSet:
    """Training examples (``{"input_ids", "labels"}``) and what was dropped or cut on the way."""

    examples: list[dict[str, list[int]]] = field(default_factory=list)
    skipped_empty: int = 0  # rows whose question/answer (qa) or text (not_qa) is empty
    truncated: int = 0  # rows cut to max_seq_length (qa: the answer is cut, the prompt kept)
    skipped_too_long: int = 0  # qa rows whose prompt alone leaves no room for one answer token


def build_examples(rows: list[dict[str, str]], plan: ColumnPlan, tokenizer, max_seq_length: int) -> ExampleSet:
    """Tokenize dataset ``rows`` for ``plan.task_type`` with the base model's ``tokenizer``.

    Examples are at most ``max_seq_length`` tokens and keep the order of the rows they come from.
    """
    if max_seq_length < 1:
        raise ValueError(f"max_seq_length must be at least 1, got {max_seq_length}")
    if plan.task_type == "qa":
        return _qa_examples(rows, plan, tokenizer, max_seq_length)
    if plan.task_type == "chat":
        return _chat_examples(rows, plan, tokenizer, max_seq_length)
    return _text_examples(rows, plan, tokenizer, max_seq_length)


def _require_template(tokenizer, task_type: str) -> None:
    if not tokenizer.chat_template:
        raise ValueError(
            f"The base model's tokenizer has no chat template; {task_type} fine-tuning needs a chat model."
        )


def _qa_examples(rows, plan: ColumnPlan, tokenizer, max_seq_length: int) -> ExampleSet:
    _require_template(tokenizer, "qa")
    result = ExampleSet()
    conversations = []
    for row in rows:
        question, answer = _cell(row, plan.question), _cell(row, plan.answer)
        if not question or not answer:
            result.skipped_empty += 1
            continue
        context = _cell(row, plan.context) if plan.context else ""
        user = f"{question}\n\n{context}" if context else question
        conversations.append([{"role": "user", "content": user}, {"role": "assistant", "content": answer}])
    if not conversations:
        return result

    # 1. Both renderings, batched: the prompt as the chat endpoint serves it, the whole conversation.
    marked = _with_added_token_text(tokenizer, conversations)
    prompts = _chat_ids(tokenizer, [c[:1] for c in conversations], marked, add_generation_prompt=True)
    fulls = _chat_ids(tokenizer, conversations, marked)
    control_ids = _control_token_ids(tokenizer)
    for conversation, prompt, full in zip(conversations, prompts, fulls):
        # 2. The answer is what the full rendering adds to the prompt, when the prompt is its prefix.
        if full[: len(prompt)] == prompt:
            completion = full[len(prompt) :]
        else:
            completion = _assistant_turn_apart(tokenizer, conversation)
        completion = _through_end_of_turn(completion, control_ids, tokenizer)
        # 3. Keep the prompt whole; cut the answer, or drop the row when not one answer token fits.
        room = max_seq_length - len(prompt)
        if room < 1:
            result.skipped_too_long += 1
            continue
        if len(completion) > room:
            completion = completion[:room]
            result.truncated += 1
        result.examples.append(
            {"input_ids": list(prompt) + completion, "labels": [IGNORE_INDEX] * len(prompt) + completion}
        )
    return result


def _chat_examples(rows, plan: ColumnPlan, tokenizer, max_seq_length: int) -> ExampleSet:
    _require_template(tokenizer, "chat")
    result = ExampleSet()
    control_ids = _control_token_ids(tokenizer)
    for row in rows:
        turns = row[plan.messages]
        messages = [{"role": m["role"], "content": m["content"]} for m in turns]
        trained = [
            k for k, m in enumerate(turns) if m["role"] == "assistant" and m.get("weight", 1) and m["content"].strip()
        ]
        if not trained:
            result.skipped_empty += 1
            continue
        # 1. Each trained turn's prompt (its history, as the chat endpoint renders it) and the turn itself.
        histories, throughs = [messages[:k] for k in trained], [messages[: k + 1] for k in trained]
        prompts = _chat_ids(
            tokenizer, histories, _with_added_token_text(tokenizer, histories), add_generation_prompt=True
        )
        fulls = _chat_ids(tokenizer, throughs, _with_added_token_text(tokenizer, throughs))
        ids: list[int] = []
        labels: list[int] = []
        for through, prompt, full in zip(throughs, prompts, fulls):
            # 2. A template that renders history differently from a live prompt: train this turn after its own
            #    prompt, dropping what came before.
            if prompt[: len(ids)] != ids:
                ids, labels = [], []
            completion = (
                full[len(prompt) :] if full[: len(prompt)] == prompt else _assistant_turn_apart(tokenizer, through)
            )
            completion = _through_end_of_turn(completion, control_ids, tokenizer)
            context = prompt[len(ids) :]
            ids += list(context) + completion
            labels += [IGNORE_INDEX] * len(context) + completion
        # 3. Cut to max_seq_length; drop the conversation when no trained token is left.
        if len(ids) > max_seq_length:
            ids, labels = ids[:max_seq_length], labels[:max_seq_length]
            if all(label == IGNORE_INDEX for label in labels):
                result.skipped_too_long += 1
                continue
            result.truncated += 1
        result.examples.append({"input_ids": ids, "labels": labels})
    return result


def _chat_ids(tokenizer, conversations: list[list[dict[str, str]]], marked: set[int], **options) -> list[list[int]]:
    """Token ids of each conversation rendered by the chat template, special-token text in cells as text.

    transformers sanitizes row by row (about 1 ms a row), so only the ``marked`` conversations, whose cells
    contain the text of an added token, take that path; the others are encoded in one batch.
    """
    ids: list[list[int]] = [[] for _ in conversations]
    plain = [i for i in range(len(conversations)) if i not in marked]
    for indices, sanitize in ((plain, False), (sorted(marked), True)):
        if indices:
            encoded = tokenizer.apply_chat_template(
                [conversations[i] for i in indices],
                tokenize=True,
                return_dict=False,
                sanitize_control_tokens=sanitize,
                **options,
            )
            for index, row_ids in zip(indices, encoded):
                ids[index] = list(row_ids)
    return ids


def _with_added_token_text(tokenizer, conversations: list[list[dict[str, str]]]) -> set[int]:
    """Indices of the conversations whose cells contain the text of one of the tokenizer's added tokens."""
    texts = {token.content for token in tokenizer.added_tokens_decoder.values()} | set(tokenizer.all_special_tokens)
    texts = sorted((text for text in texts if text.strip()), key=len, reverse=True)
    if not texts:
        return set()
    pattern = re.compile("|".join(map(re.escape, texts)))
    return {
        i for i, conversation in enumerate(conversations) if any(pattern.search(m["content"]) for m in conversation)
    }


def _assistant_turn_apart(tokenizer, conversation: list[dict[str, str]]) -> list[int]:
    """The assistant turn tokenized on its own, for templates whose prompt is not a prefix of the full chat.

    That happens when the generation prompt differs from how a finished assistant turn is rendered (templates
    that open a reasoning block for generation but strip it from history), or when tokens merge across the
    boundary. The answer text is followed by whatever the template writes after it (the end of turn).
    """
    answer = conversation[-1]["content"]
    rendered = tokenizer.apply_chat_template(conversation, tokenize=False)
    end = rendered.rfind(answer)
    closing = rendered[end + len(answer) :] if end >= 0 else ""
    ids = tokenizer(answer, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    return ids + (tokenizer(closing, add_special_tokens=False)["input_ids"] if closing else [])


def _through_end_of_turn(completion: list[int], control_ids: set[int], tokenizer) -> list[int]:
    """The answer tokens through the end-of-turn token, dropping the whitespace the template writes after it.

    The end of turn is the last special token when only whitespace follows it; a turn that does not end that
    way gets the tokenizer's EOS appended, so every answer teaches the model to stop.
    """
    last = next((i for i in range(len(completion) - 1, -1, -1) if completion[i] in control_ids), None)
    if last is not None and not tokenizer.decode(completion[last + 1 :]).strip():
        return list(completion[: last + 1])
    return list(completion) + ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])


def _control_token_ids(tokenizer) -> set[int]:
    special_added = {index for index, token in tokenizer.added_tokens_decoder.items() if token.special}
    return special_added | set(tokenizer.all_special_ids)


def _text_examples(rows, plan: ColumnPlan, tokenizer, max_seq_length: int) -> ExampleSet:
    result = ExampleSet()
    texts = []
    for row in rows:
        text = _cell(row, plan.text)
        if text:
            texts.append(text)
        else:
            result.skipped_empty += 1
    if not texts:
        return result
    eos = tokenizer.eos_token_id
    for ids in tokenizer(texts, add_special_tokens=True)["input_ids"]:
        ids = list(ids) + ([eos] if eos is not None and ids[-1:] != [eos] else [])
        if len(ids) > max_seq_length:
            ids = ids[:max_seq_length]
            result.truncated += 1
        result.examples.append({"input_ids": ids, "labels": list(ids)})
    return result


def _cell(row: dict[str, str], column: str | None) -> str:
    return (row.get(column) or "").strip() if column else ""
