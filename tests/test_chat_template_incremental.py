"""Incremental chat rendering (core/chat.py): messages appended one at a time give exactly the ids of the
chat template applied to the whole conversation; generation prompts and replies close the same way."""

from __future__ import annotations

import copy

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from sinkstream.core.chat import ChatRenderer, ChatTemplateError, end_of_turn_ids

# ChatML framing with the tokens stories260K has: <s> opens a turn, </s> ends it.
CHATML = ("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
          "{% if add_generation_prompt %}<s>assistant\n{% endif %}")
# As SmolLM2's template: a default system message when the conversation does not start with one.
DEFAULT_SYSTEM = ("{% for m in messages %}{% if loop.first and m['role'] != 'system' %}"
                  "<s>system\nYou are a helpful assistant.</s>\n{% endif %}"
                  "<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
                  "{% if add_generation_prompt %}<s>assistant\n{% endif %}")
# Numbers the messages: a message's rendering depends on how many came before, so the whole conversation
# must be kept and rendered.
NUMBERED = ("{% for m in messages %}<s>{{ loop.index }} {{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
            "{% if add_generation_prompt %}<s>assistant\n{% endif %}")
# Marks the last message: rendering one more message changes the text of the one before.
NOT_PREFIX_STABLE = ("{% for m in messages %}<s>{{ m['role'] }}{% if loop.last %}*{% endif %}\n"
                     "{{ m['content'] }}</s>\n{% endfor %}")
# No special token between messages: the boundary is inside plain text.
PLAIN = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"


def chat_tokenizer(model_dir, template: str):
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.chat_template = template
    return tokenizer


@pytest.fixture(scope="module")
def chatml(model_dir):
    return chat_tokenizer(model_dir, CHATML)


@pytest.fixture(scope="module")
def default_system(model_dir):
    return chat_tokenizer(model_dir, DEFAULT_SYSTEM)


def whole(tokenizer, messages, add_generation_prompt=False) -> list[int]:
    return list(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False,
                                              add_generation_prompt=add_generation_prompt))


contents = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=40) | \
    st.sampled_from(["Hello there", " lead space", "trail ", "", "\n\n", "Tim's dog", "日本語のテキスト",
                     "emoji 🙂 ok", "a</s>b<s>c", "  two  spaces"])
messages_strategy = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant"]),
                                                    "content": contents}), min_size=1, max_size=6)


@pytest.fixture(scope="module")
def numbered(model_dir):
    return chat_tokenizer(model_dir, NUMBERED)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(messages=messages_strategy)
@pytest.mark.parametrize("template", ["chatml", "default_system", "numbered"])
def test_appending_one_at_a_time_gives_the_whole_conversation_ids(request, template, messages):
    tokenizer = request.getfixturevalue(template)
    renderer = ChatRenderer(tokenizer)
    ids: list[int] = []
    for k, message in enumerate(messages):
        ids += renderer.append(message["role"], message["content"])
        assert ids == whole(tokenizer, messages[:k + 1])
    ids += renderer.generation_prompt()
    assert ids == whole(tokenizer, messages, add_generation_prompt=True)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(messages=messages_strategy, reply=contents, ended=st.booleans())
def test_a_finished_reply_leaves_the_whole_conversation_ids(chatml, messages, reply, ended):
    """Generated ids that tokenize the reply as the template would: after finish_reply the stream is the
    template applied to the conversation with the reply as its assistant message."""
    renderer = ChatRenderer(chatml)
    ids: list[int] = []
    for message in messages:
        ids += renderer.append(message["role"], message["content"])
    prompt = renderer.generation_prompt()
    ids += prompt
    reference = whole(chatml, [*messages, {"role": "assistant", "content": reply}])
    generated = reference[len(ids):len(reference) - 2]  # the reply's tokens (the tail is "</s>", "\n")
    if ended:
        generated = generated + [chatml.eos_token_id]
    ids += generated
    ids += renderer.finish_reply(generated, stopped_at_end_of_turn=ended)
    assert ids == reference
    assert renderer.messages[-1] == {"role": "assistant", "content": reply}
    ids += renderer.append("user", "next")
    assert ids == whole(chatml, [*messages, {"role": "assistant", "content": reply},
                                 {"role": "user", "content": "next"}])


def test_state_round_trip_continues_the_conversation(chatml):
    renderer = ChatRenderer(chatml)
    ids = renderer.append("system", "Be brief.") + renderer.append("user", "Hi")
    restored = ChatRenderer(chatml, state=copy.deepcopy(renderer.state()))
    ids += restored.append("assistant", "Hello") + restored.generation_prompt()
    assert restored.state()["reply_open"] is True
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "Hello"}]
    assert ids == whole(chatml, conversation, add_generation_prompt=True)


def test_end_of_turn_is_the_token_after_an_assistant_message(chatml):
    assert end_of_turn_ids(chatml) == [chatml.convert_tokens_to_ids("</s>")]


def test_plain_text_boundaries_are_exact_too(model_dir):
    tokenizer = chat_tokenizer(model_dir, PLAIN)
    messages = [{"role": "user", "content": "Once upon a time"},
                {"role": "assistant", "content": "there was"}]
    renderer = ChatRenderer(tokenizer)
    ids = [i for m in messages for i in renderer.append(m["role"], m["content"])]
    assert ids == whole(tokenizer, messages)


def test_a_template_that_is_not_prefix_stable_is_refused_and_changes_nothing(model_dir):
    renderer = ChatRenderer(chat_tokenizer(model_dir, NOT_PREFIX_STABLE))
    renderer.append("user", "Hi")
    state = copy.deepcopy(renderer.state())
    with pytest.raises(ChatTemplateError, match="prefix-stable"):
        renderer.append("assistant", "Hello")
    assert renderer.state() == state


def test_no_template_and_bad_roles_are_clear_errors(model_dir, chatml):
    with pytest.raises(ChatTemplateError, match="no chat template"):
        ChatRenderer(AutoTokenizer.from_pretrained(model_dir))
    renderer = ChatRenderer(chatml)
    with pytest.raises(ValueError, match="role must be one of"):
        renderer.append("tool", "x")
    with pytest.raises(ChatTemplateError, match="no message to reply to"):
        renderer.generation_prompt()
    assert renderer.messages == [] and renderer.text == ""
    renderer.append("user", "Hi")
    renderer.generation_prompt()
    with pytest.raises(ChatTemplateError, match="reply is in progress"):
        renderer.append("user", "x")


# Turns end with <unk> (the end-of-turn token), while the tokenizer's EOS is </s>: a reply can stop on EOS.
END_OF_TURN_NOT_EOS = ("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}<unk>\n{% endfor %}"
                       "{% if add_generation_prompt %}<s>assistant\n{% endif %}")


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(messages=messages_strategy, reply=contents)
def test_a_reply_ending_on_plain_eos_is_closed_with_the_templates_end_of_turn(model_dir, messages, reply):
    """The reply stopped on EOS where the template ends a turn with another token: the EOS stays in the
    stream (it was fed), the message is the reply without it, the template's end of turn follows, and
    the next message continues the template exactly."""
    tokenizer = chat_tokenizer(model_dir, END_OF_TURN_NOT_EOS)
    eos, unk = tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<unk>")
    assert end_of_turn_ids(tokenizer) == [unk, eos]
    renderer = ChatRenderer(tokenizer)
    ids: list[int] = []
    for message in messages:
        ids += renderer.append(message["role"], message["content"])
    ids += renderer.generation_prompt()
    conversation = [*messages, {"role": "assistant", "content": reply}]
    reference = whole(tokenizer, conversation)
    reply_end = len(reference) - 2  # the reference's tail is "<unk>", "\n"
    generated = reference[len(ids):reply_end] + [eos]
    ids += generated
    ids += renderer.finish_reply(generated, stopped_at_end_of_turn=True)
    assert ids == reference[:reply_end] + [eos] + reference[reply_end:]
    assert renderer.messages[-1] == {"role": "assistant", "content": reply}
    after = renderer.append("user", "next")
    assert after == whole(tokenizer, [*conversation, {"role": "user", "content": "next"}])[len(reference):]


@pytest.mark.parametrize(("template", "local"),
                         [("chatml", True), ("default_system", True), ("numbered", False)])
def test_only_local_templates_render_after_two_messages_and_stay_bounded(request, template, local):
    """A local template keeps the first and the last message only, however long the conversation; one that
    numbers its messages keeps them all. Both stay exact (the property above and this check)."""
    tokenizer = request.getfixturevalue(template)
    renderer = ChatRenderer(tokenizer)
    assert renderer.local is local
    conversation, ids = [], []
    for k in range(40):
        message = {"role": ("user", "assistant")[k % 2], "content": f"message {k} " + "word " * (k % 7)}
        conversation.append(message)
        ids += renderer.append(message["role"], message["content"])
    assert ids == whole(tokenizer, conversation)
    assert len(renderer.messages) == (2 if local else 40)
    assert renderer.messages[0] == conversation[0] and renderer.messages[-1] == conversation[-1]
    ids += renderer.generation_prompt()
    assert ids == whole(tokenizer, conversation, add_generation_prompt=True)
