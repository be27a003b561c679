"""The data sets users already have: every TRL format, standard and conversational, in every
storage form (JSONL, JSON, Parquet, save_to_disk), through the real SFT and reward-model jobs;
the loss mask of a multi-turn conversation, token by token; clear errors for what fits no format."""
from __future__ import annotations

import json

import pytest

from services.common.errors import InvalidArgument
from services.trainer import formats
from services.trainer.config import RMConfig, SFTConfig

Q = ["How do I prepare for my calculus exam?", "Any tips for my poetry debate?", "What should I study first?",
     "How long should I revise?"]
A = ["Make a plan and solve past papers.", "Practise out loud with a friend.", "Start with the basics.",
     "An hour a day."]
BAD = ["Just relax.", "Whatever.", "No idea.", "Maybe."]


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


SFT_ROWS = {
    "text": [{"text": f"Q: {q}\nA: {a}"} for q, a in zip(Q, A)],
    "prompt_completion": [{"prompt": q, "completion": a} for q, a in zip(Q, A)],
    "prompt_response": [{"prompt": q, "response": a} for q, a in zip(Q, A)],
    "messages": [{"messages": [{"role": "system", "content": "Be brief."}, user(q), assistant(a), user("Thanks!"),
                               assistant("You are welcome.")]} for q, a in zip(Q, A)],
    "prompt_completion_conversational": [{"prompt": [user(q)], "completion": [assistant(a)]} for q, a in zip(Q, A)],
}
RM_ROWS = {
    "explicit": [{"prompt": q, "chosen": a, "rejected": b} for q, a, b in zip(Q, A, BAD)],
    "implicit": [{"chosen": f"Q: {q}\nA: {a}", "rejected": f"Q: {q}\nA: {b}"} for q, a, b in zip(Q, A, BAD)],
    "explicit_conversational": [{"prompt": [user(q)], "chosen": [assistant(a)], "rejected": [assistant(b)]}
                                for q, a, b in zip(Q, A, BAD)],
    "implicit_conversational": [{"chosen": [user(q), assistant(a)], "rejected": [user(q), assistant(b)]}
                                for q, a, b in zip(Q, A, BAD)],
}
STORAGE = ["jsonl", "json", "parquet", "save_to_disk"]


def store(rows: list[dict], path, storage: str) -> str:
    import datasets
    if storage == "jsonl":
        path = path.with_suffix(".jsonl")
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif storage == "json":
        path = path.with_suffix(".json")
        path.write_text(json.dumps(rows))
    elif storage == "parquet":
        path = path.with_suffix(".parquet")
        datasets.Dataset.from_list(rows).to_parquet(str(path))
    else:
        datasets.Dataset.from_list(rows).save_to_disk(str(path))
    return str(path)


@pytest.fixture(scope="module")
def d():
    from services.trainer import distributed
    return distributed.init("cpu", "float32")


@pytest.mark.parametrize("storage", STORAGE)
@pytest.mark.parametrize("fmt", list(SFT_ROWS))
def test_every_sft_format_in_every_storage_form_trains(tmp_path, tiny_policy_dir, d, fmt, storage):
    from services.trainer.sft import train_sft
    data = store(SFT_ROWS[fmt], tmp_path / "data", storage)
    meta = train_sft(SFTConfig(model=str(tiny_policy_dir), data=data, out=str(tmp_path / "out"), max_steps=1,
                               batch_size=4, eval_fraction=0.0, device="cpu"), d)
    assert meta["train_examples"] == 4 and meta["steps"] == 1 and meta["train_loss"] > 0
    assert (tmp_path / "out" / "model.safetensors").exists()


@pytest.mark.parametrize("storage", STORAGE)
@pytest.mark.parametrize("fmt", list(RM_ROWS))
def test_every_preference_format_in_every_storage_form_trains(tmp_path, tiny_reward_dir, d, fmt, storage):
    from services.trainer.rm import train_reward_model
    data = store(RM_ROWS[fmt], tmp_path / "data", storage)
    meta = train_reward_model(RMConfig(model=str(tiny_reward_dir), data=data, out=str(tmp_path / "out"),
                                       max_steps=1, batch_size=4, eval_fraction=0.0, device="cpu"), d)
    assert meta["train_pairs"] == 4 and meta["steps"] == 1
    assert (tmp_path / "out" / "reward_meta.json").exists()


@pytest.fixture(scope="module")
def tokenizer():
    from services.demo.tiny_model import build_tokenizer
    return build_tokenizer(0)


def test_a_multi_turn_conversation_learns_its_assistant_turns_only(tokenizer):
    """Checked token by token: every labelled token is one of the two assistant turns (their text
    and the EOS the template ends them with); the system prompt, the user turns and the tokens
    that open the assistant turns carry no loss."""
    messages = SFT_ROWS["messages"][0]["messages"]
    ids, labels = formats.conversation_tokens(tokenizer, messages, {2, 4}, "row 0")
    assert ids == tokenizer(tokenizer.apply_chat_template(messages, tokenize=False), add_special_tokens=False).input_ids
    learned = [i for i, label in enumerate(labels) if label != formats.IGNORE_INDEX]
    assert all(labels[i] == ids[i] for i in learned)
    runs, run = [], [learned[0]]
    for i in learned[1:]:
        if i == run[-1] + 1:
            run.append(i)
        else:
            runs.append(run)
            run = [i]
    runs.append(run)
    eos = tokenizer.eos_token
    assert [tokenizer.decode([ids[i] for i in r]) for r in runs] == [A[0] + eos, "You are welcome." + eos]
    # What carries no loss: everything before and between them.
    unlearned = tokenizer.decode([t for t, label in zip(ids, labels) if label == formats.IGNORE_INDEX])
    assert unlearned == "Be brief.\n<|user|>" + Q[0] + "<|assistant|><|user|>Thanks!<|assistant|>"


def test_string_prompts_are_templated_like_the_services_and_completions_end_with_eos(tokenizer):
    from services.common.text import encode_pair
    row = SFT_ROWS["prompt_completion"][0]
    ids, labels, truncated = formats.sft_example(tokenizer, row, "prompt_completion", 256, "row 0")
    prompt_ids, completion_ids = encode_pair(tokenizer, row["prompt"], row["completion"])
    assert ids == prompt_ids + completion_ids and not truncated
    assert labels == [formats.IGNORE_INDEX] * len(prompt_ids) + completion_ids
    assert completion_ids[-1] == tokenizer.eos_token_id


def test_columns_of_other_names_are_mapped(tmp_path):
    rows = [{"question": q, "answer": a} for q, a in zip(Q, A)]
    data = store(rows, tmp_path / "d", "jsonl")
    loaded = formats.load_rows(data, {"prompt": "question", "completion": "answer"})
    assert formats.detect(loaded, "sft") == "prompt_completion" and loaded[0]["prompt"] == Q[0]
    with pytest.raises(InvalidArgument, match=r"no sft format fits the columns \['answer', 'question'\]"):
        formats.detect(formats.load_rows(data), "sft", data)
    with pytest.raises(InvalidArgument, match=r"columns \['query'\] .* are not in"):
        formats.load_rows(data, {"prompt": "query"})


def test_rows_that_fit_no_format_name_the_row(tokenizer):
    rows = [{"prompt": "fine", "completion": "fine"}, {"prompt": 7, "completion": "x"}]
    with pytest.raises(InvalidArgument, match=r"data row 1: 'prompt' must be a string or a non-empty list"):
        formats.sft_examples(tokenizer, rows, 128, "data")
    rows = [{"prompt": "q", "completion": [assistant("a")]}]
    with pytest.raises(InvalidArgument, match="must both be strings or both conversations"):
        formats.sft_examples(tokenizer, rows, 128, "data")


def test_a_conversation_needs_a_chat_template(tokenizer):
    import copy
    plain = copy.deepcopy(tokenizer)
    plain.chat_template = None
    with pytest.raises(InvalidArgument, match="needs a chat template"):
        formats.sft_examples(plain, SFT_ROWS["messages"], 128, "data")


def test_ppo_prompts_are_strings_or_conversations(tmp_path, tokenizer):
    rows = [{"prompt": Q[0], "split": "train"}, {"prompt": [user(Q[1])], "split": "train"},
            {"prompt": Q[2], "split": "eval"}]
    prompts = formats.prompts(formats.load_rows(store(rows, tmp_path / "p", "jsonl")))
    assert prompts == [Q[0], [user(Q[1])]]  # the held-out row is left out
    assert formats.render_prompt(tokenizer, Q[0]) == formats.render_prompt(tokenizer, [user(Q[0])])
