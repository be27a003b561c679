"""The data sets users already have: TRL's dataset formats, standard and conversational, stored as
JSONL, JSON, Parquet or a `datasets.save_to_disk` directory (or a hub id where a hub is reachable),
read with the `datasets` library.

    job   format              columns
    sft   language modeling   text | messages
          prompt-completion   prompt + completion    (prompt + response: this project's demo data)
    rm    preference          prompt + chosen + rejected, or chosen + rejected (the prompt inside both)
    ppo   prompt-only         prompt

A value is a string (standard) or a list of {"role", "content"} messages (conversational). The
format is found from the columns; other names are mapped with `columns` ({"prompt": "question"}).

How a row becomes tokens (the same rules as services.common.text, so that SFT, the reward model,
PPO and the services agree):
- a string prompt is one user turn through the tokenizer's chat template (format_prompt);
- a conversation is rendered by the chat template, system prompts and every turn included;
- SFT learns the completion only: for a conversation, the tokens of its assistant turns (each as
  the template closes it); for `text`, every token;
- a response or a completion string ends with EOS.
"""
from __future__ import annotations

import logging
import pathlib
from typing import Any

from services.common.errors import InvalidArgument
from services.common.text import encode_pair, format_prompt
from services.trainer.data import IGNORE_INDEX

log = logging.getLogger(__name__)

# job -> formats in the order they are tried: (name, the columns that make it)
FORMATS = {
    "sft": [("messages", ("messages",)), ("prompt_completion", ("prompt", "completion")),
            ("prompt_completion", ("prompt", "response")), ("text", ("text",))],
    "rm": [("explicit_preference", ("prompt", "chosen", "rejected")), ("implicit_preference", ("chosen", "rejected"))],
    "ppo": [("prompt_only", ("prompt",))],
}
COLUMN_FLAGS = ("prompt", "completion", "response", "chosen", "rejected", "messages", "text")


# ---- reading ---------------------------------------------------------------------------------

def load_rows(path: str, columns: dict[str, str] | None = None, split: str = "train") -> list[dict]:
    """Every row of a local file or directory (or a hub data set, or the judgments in a feedback
    database: sqlite:///FILE or postgresql://...), columns renamed to ours."""
    import datasets

    if ":" in str(path) and not pathlib.Path(path).exists():  # a URL; sqlalchemy only where one is given
        from services.feedback.store import is_db_url
        if is_db_url(path):
            return _feedback_rows(path)
    datasets.disable_progress_bars()
    local = pathlib.Path(path)
    try:
        if local.is_dir():
            data = datasets.load_from_disk(str(local))
            if isinstance(data, datasets.DatasetDict):
                if split not in data:
                    raise InvalidArgument(f"data: {path} holds the splits {sorted(data)}, not {split!r} (data_split)")
                data = data[split]
        elif local.is_file():
            kind = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}.get(local.suffix.lower())
            if kind is None:
                raise InvalidArgument(f"data: {path} is not .jsonl, .json or .parquet, nor a save_to_disk directory")
            data = datasets.load_dataset(kind, data_files=str(local), split="train")
        else:
            data = datasets.load_dataset(path, split=split)  # a hub id
    except InvalidArgument:
        raise
    except FileNotFoundError as e:
        raise InvalidArgument(f"data: {path} does not exist (nor as a data set on the hub: {e})") from None
    except Exception as e:  # noqa: BLE001 - datasets raises many kinds for one mistake: unreadable data
        raise InvalidArgument(f"data: cannot read {path}: {type(e).__name__}: {e}") from None
    renames = {theirs: ours for ours, theirs in (columns or {}).items() if theirs != ours}
    missing = sorted(set(renames) - set(data.column_names))
    if missing:
        raise InvalidArgument(f"data: columns {missing} (mapped with columns/--*-key) are not in {path}, which has "
                              f"{sorted(data.column_names)}")
    if renames:
        data = data.rename_columns(renames)
    rows = data.to_list()
    if not rows:
        raise InvalidArgument(f"data: {path} holds no rows")
    return rows


def _feedback_rows(url: str) -> list[dict]:
    """The decisive judgments of a feedback database as TRL preference rows (with pair_id, labeller,
    versions: services.feedback.store.Store.export_rows)."""
    from services.feedback.store import Store

    db = Store(url)
    try:
        db.check_schema()
        rows = db.export_rows()
    except InvalidArgument:
        raise
    except Exception as e:  # noqa: BLE001 - a database that cannot be read: bad input for this job
        raise InvalidArgument(f"data: cannot read the feedback database {db.engine.url.render_as_string()}: "
                              f"{type(e).__name__}: {e}") from None
    finally:
        db.close()
    if not rows:
        raise InvalidArgument(f"data: the feedback database {db.engine.url.render_as_string()} holds no judgment "
                              f"that prefers one answer")
    return rows


def detect(rows: list[dict], job: str, path: str = "data") -> str:
    """The format of these rows for `job`, from the columns of the first row."""
    found = set(rows[0])
    for name, needed in FORMATS[job]:
        if set(needed) <= found:
            return name
    known = " | ".join(" + ".join(needed) for _, needed in FORMATS[job])
    raise InvalidArgument(f"{path}: no {job} format fits the columns {sorted(found)}; known: {known}. Map other "
                          f"names with --prompt-key, --completion-key, ... (the config's `columns`)")


def _value(row: dict, key: str, where: str) -> str | list[dict]:
    """A string, or a list of {"role", "content"} messages."""
    value = row.get(key)
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                                 and isinstance(m.get("content"), str) for m in value):
        return [{"role": m["role"], "content": m["content"]} for m in value]
    raise InvalidArgument(f"{where}: {key!r} must be a string or a non-empty list of {{role, content}} messages, "
                          f"got {type(value).__name__}")


def prompts(rows: list[dict], path: str = "prompts") -> list[str | list[dict]]:
    """PPO prompts: a string (one user turn) or a conversation that the policy answers next.
    Rows with a "split" other than "train" (held out) are left out."""
    detect(rows, "ppo", path)
    return [_value(r, "prompt", f"{path} row {i}") for i, r in enumerate(rows) if r.get("split", "train") == "train"]


# ---- conversations ---------------------------------------------------------------------------

def _render(tokenizer, messages: list[dict], generation_prompt: bool, where: str) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise InvalidArgument(f"{where}: a conversation needs a chat template, and this tokenizer has none")
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as e:  # noqa: BLE001 - templates raise on what they do not accept (roles, order)
        raise InvalidArgument(f"{where}: the chat template refused this conversation: {e}") from None


def conversation_tokens(tokenizer, messages: list[dict], trained: set[int], where: str) -> tuple[list[int], list[int]]:
    """(ids, labels) of a rendered conversation; labels are the ids on the tokens of the assistant
    turns in `trained` (indices into messages) and IGNORE_INDEX elsewhere.

    A turn's span is where the rendering of messages[:i + 1] goes past that of messages[:i] with
    the generation prompt: the turn's text and whatever the template closes it with (EOS or an
    end-of-turn token), which the model must learn to emit. This needs a template whose rendering
    of a conversation starts with its rendering of every shorter one (true of the usual ones; a
    template that rewrites earlier turns is refused with a clear error)."""
    text = _render(tokenizer, messages, False, where)
    spans = []
    for i in sorted(trained):
        before = _render(tokenizer, messages[:i], True, where) if i else ""
        upto = _render(tokenizer, messages[:i + 1], False, where)
        if not (upto.startswith(before) and text.startswith(upto)):
            raise InvalidArgument(f"{where}: the chat template renders earlier turns differently in longer "
                                  f"conversations, so the assistant turns cannot be found in the tokens")
        spans.append((len(before), len(upto)))
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(encoded["input_ids"])
    labels = [tid if any(start <= s < end for start, end in spans) else IGNORE_INDEX
              for tid, (s, _) in zip(ids, encoded["offset_mapping"])]
    return ids, labels


# ---- SFT -------------------------------------------------------------------------------------

def sft_example(tokenizer, row: dict, fmt: str, max_length: int, where: str) -> tuple[list[int], list[int], bool]:
    """(input_ids, labels, truncated) of one row; too long, the end is cut."""
    eos = tokenizer.eos_token_id
    if fmt == "text":
        ids = list(tokenizer(_value(row, "text", where), add_special_tokens=False)["input_ids"]) + [eos]
        ids, labels = ids, list(ids)
    elif fmt == "messages":
        messages = _value(row, "messages", where)
        if isinstance(messages, str):
            raise InvalidArgument(f"{where}: 'messages' must be a list of messages")
        ids, labels = conversation_tokens(tokenizer, messages, {i for i, m in enumerate(messages)
                                                                if m["role"] == "assistant"}, where)
    else:
        completion_key = "completion" if "completion" in row else "response"
        prompt, completion = _value(row, "prompt", where), _value(row, completion_key, where)
        if isinstance(prompt, str) and isinstance(completion, str):
            prompt_ids, completion_ids = encode_pair(tokenizer, prompt, completion)
            ids, labels = prompt_ids + completion_ids, [IGNORE_INDEX] * len(prompt_ids) + completion_ids
        elif isinstance(prompt, list) and isinstance(completion, list):
            messages = prompt + completion
            ids, labels = conversation_tokens(tokenizer, messages, {len(prompt) + i for i, m in enumerate(completion)
                                                                    if m["role"] == "assistant"}, where)
        else:
            raise InvalidArgument(f"{where}: 'prompt' and '{completion_key}' must both be strings or both "
                                  f"conversations")
    if not any(label != IGNORE_INDEX for label in labels[1:max_length]):
        raise InvalidArgument(f"{where}: nothing to learn within max_length {max_length} (the prompt takes "
                              f"{next((i for i, l in enumerate(labels) if l != IGNORE_INDEX), len(labels))} tokens)")
    return ids[:max_length], labels[:max_length], len(ids) > max_length


def sft_examples(tokenizer, rows: list[dict], max_length: int, path: str) -> tuple[list, int]:
    """Every row as (ids, labels); and how many were cut at max_length."""
    fmt = detect(rows, "sft", path)
    out = [sft_example(tokenizer, row, fmt, max_length, f"{path} row {i}") for i, row in enumerate(rows)]
    log.info("%s: %d rows in the %s format", path, len(rows), fmt)
    return [(ids, labels) for ids, labels, _ in out], sum(t for _, _, t in out)


# ---- preferences -----------------------------------------------------------------------------

def _response_ids(tokenizer, prompt: str | list[dict] | None, response: str | list[dict], max_length: int,
                  where: str) -> list[int]:
    """The tokens the reward model reads for (prompt, response), fitted to max_length by dropping
    the start of the prompt (services.common.text.fit), never the response."""
    from services.common.text import fit

    eos = tokenizer.eos_token_id
    if isinstance(response, list):  # a conversation
        if isinstance(prompt, str):
            raise InvalidArgument(f"{where}: a string prompt with conversational responses; use messages for both")
        if prompt is None:  # the whole conversation: its last turn is the answer (TRL's implicit prompt)
            prompt, response = response[:-1], response[-1:]
        ids = list(tokenizer(_render(tokenizer, prompt + response, False, where), add_special_tokens=False)["input_ids"])
        answer = len(tokenizer(_render(tokenizer, prompt, True, where), add_special_tokens=False)["input_ids"]) \
            if prompt else 0
        return fit(ids[:answer], ids[answer:], max_length, "keep_end_of_prompt")[0]
    if prompt is None:  # the prompt is inside the text
        ids = list(tokenizer(response, add_special_tokens=False)["input_ids"])
        return fit([], ids + ([eos] if not ids or ids[-1] != eos else []), max_length, "keep_end_of_prompt")[0]
    if not isinstance(prompt, str):
        raise InvalidArgument(f"{where}: a conversational prompt with string responses; use messages for both")
    prompt_ids, response_ids = encode_pair(tokenizer, prompt, response)
    return fit(prompt_ids, response_ids, max_length, "keep_end_of_prompt")[0]


def preference_examples(tokenizer, rows: list[dict], max_length: int, path: str) -> tuple[list, list[dict]]:
    """(chosen_ids, rejected_ids) of every row that fits max_length, and those rows."""
    fmt = detect(rows, "rm", path)
    pairs, kept, dropped = [], [], 0
    for i, row in enumerate(rows):
        where = f"{path} row {i}"
        prompt = _value(row, "prompt", where) if fmt == "explicit_preference" else None
        try:
            pair = tuple(_response_ids(tokenizer, prompt, _value(row, key, where), max_length, where)
                         for key in ("chosen", "rejected"))
        except InvalidArgument as e:
            if "max_length" not in str(e):
                raise
            dropped += 1
            continue
        pairs.append(pair)
        kept.append(row)
    if dropped:
        log.warning("%d pairs have a response longer than max_length %d and were dropped", dropped, max_length)
    log.info("%s: %d rows in the %s format", path, len(rows), fmt)
    return pairs, kept


def as_prompt_text(prompt: Any) -> str:
    """A prompt (string or conversation) as one string, for hashing and logs."""
    import json
    return prompt if isinstance(prompt, str) else json.dumps(prompt, ensure_ascii=False, sort_keys=True)


def render_prompt(tokenizer, prompt: str | list[dict], where: str = "prompt") -> str:
    """What the policy reads for a PPO prompt: format_prompt of a string, the rendered conversation
    with the generation prompt otherwise."""
    return format_prompt(tokenizer, prompt) if isinstance(prompt, str) else _render(tokenizer, prompt, True, where)
