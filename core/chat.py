"""A conversation rendered with the model's chat template, one message at a time.

Guarantee: appending messages one by one (and the generation prompt before an assistant turn) yields, in
total, exactly `tokenizer.apply_chat_template(conversation, tokenize=True, add_generation_prompt=...)`.

How: the template is rendered for the first k and the first k + 1 messages; the rendering of k messages
must be a string prefix of the rendering of k + 1 (true for ChatML and for templates such as SmolLM2's
that insert a default system message in front of a conversation that has none). A template that is not
prefix-stable raises ChatTemplateError. The new text is tokenized with a left context that starts at the
last special (added) token of the text before it: tokenizers split text at added tokens before anything
else, so the tokens from that point on are those of the whole rendering. A token straddling the boundary
is refused (ChatTemplateError) rather than emitting ids that differ from the whole-conversation ids.

Cost: a message is rendered after a context of earlier messages. For a template whose rendering of a
message depends only on the conversation's first message and the message before it (ChatML, SmolLM2's
and most others; checked once per template by rendering probe conversations both ways), the context is
just those two messages, so a message costs the same at the millionth token as at the first and the
renderer's memory stays bounded. Any other template keeps and renders the whole conversation.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from sinkstream.core.text import backend_of, first_token_at

ROLES = ("system", "user", "assistant")


class ChatTemplateError(ValueError):
    """The tokenizer has no chat template, or its template cannot be rendered incrementally."""


def has_chat_template(tokenizer) -> bool:
    """Whether the tokenizer carries a chat template."""
    return bool(getattr(tokenizer, "chat_template", None))


def end_of_turn_ids(tokenizer) -> list[int]:
    """Token ids that end an assistant turn: the first special token the template puts after an assistant
    message's content (e.g. <|im_end|>), plus the tokenizer's EOS."""
    sentinel = "\u2063sinkstream\u2063"
    text = _render(tokenizer, [{"role": "user", "content": "a"},
                               {"role": "assistant", "content": sentinel}], False)
    tail = text[text.index(sentinel) + len(sentinel):]
    ids: list[int] = []
    found = [(tail.find(tok), i) for tok, i in _added_tokens(tokenizer).items() if tok in tail]
    if found:
        ids.append(min(found)[1])
    eos = tokenizer.eos_token_id
    for e in (eos if isinstance(eos, list) else [eos]):
        if e is not None and e not in ids:
            ids.append(int(e))
    return ids


def _added_tokens(tokenizer) -> dict[str, int]:
    return {t.content: i for i, t in backend_of(tokenizer).get_added_tokens_decoder().items()}


def _render(tokenizer, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    if not has_chat_template(tokenizer):
        raise ChatTemplateError("the model's tokenizer has no chat template")
    if not messages:
        if add_generation_prompt:
            raise ChatTemplateError("the conversation has no message to reply to")
        return ""
    return tokenizer.apply_chat_template(messages, tokenize=False,
                                         add_generation_prompt=add_generation_prompt)


# Conversations the locality probe renders: with and without a system message, each role after each other.
_PROBES = (
    ("user", "assistant", "user", "assistant", "user", "user", "assistant", "system", "user"),
    ("system", "user", "assistant", "assistant", "user", "system", "assistant", "user"),
    ("assistant", "user", "system", "user", "assistant"),
)


_LOCALITY: dict[tuple[str, str], bool] = {}  # by (template, special tokens): one probe per template


def template_is_local(tokenizer) -> bool:
    """Whether each message renders the same after its whole history as after only (the conversation's
    first message, the message before it), in every probe conversation, generation prompts included."""
    key = (str(tokenizer.chat_template), repr(sorted(tokenizer.special_tokens_map.items())))
    if key not in _LOCALITY:
        _LOCALITY[key] = _probe_locality(lambda messages, prompt: _render(tokenizer, messages, prompt))
    return _LOCALITY[key]


def _probe_locality(render) -> bool:
    for roles in _PROBES:
        messages = [{"role": r, "content": f"probe {i} {r}"} for i, r in enumerate(roles)]
        for k in range(2, len(messages)):
            compact = [messages[0], messages[k - 1]]
            for new, prompt in (([messages[k]], False), ([], True)):
                full_before, full_after = render(messages[:k], False), render(messages[:k] + new, prompt)
                short_before, short_after = render(compact, False), render(compact + new, prompt)
                if not (full_after.startswith(full_before) and short_after.startswith(short_before)):
                    return False
                if full_after[len(full_before):] != short_after[len(short_before):]:
                    return False
    return True


class ChatRenderer:
    """One conversation's rendering state: the messages so far and the text the stream holds.

    append(role, content) -> ids of that message; generation_prompt() -> ids that open an assistant turn;
    finish_reply(generated_ids, stopped_at_end_of_turn) -> ids that close it (after the generated ids).
    """

    def __init__(self, tokenizer, state: dict[str, Any] | None = None) -> None:
        if not has_chat_template(tokenizer):
            raise ChatTemplateError("the model's tokenizer has no chat template")
        self._tokenizer = tokenizer
        self._backend = backend_of(tokenizer)
        self._added = sorted(_added_tokens(tokenizer), key=len, reverse=True)
        # the messages the next one renders after: the whole conversation, or for a local template its
        # first and last message; `text` is their rendering (its tail is the stream's text's tail)
        self.messages: list[dict[str, str]] = []
        self.text = ""
        self.reply_open = False  # a generation prompt was appended and its reply is not finished
        self.prompt_ids: list[int] = []  # the ids of that prompt (decoding context for the reply)
        # a local template needs only the first and the last message to render the next (see _compact)
        self.local = template_is_local(tokenizer)
        if state:
            self.load_state(state)

    def state(self) -> dict[str, Any]:
        """JSON-able state for session snapshots."""
        return {"messages": [dict(m) for m in self.messages], "text": self.text,
                "reply_open": self.reply_open, "prompt_ids": list(self.prompt_ids)}

    def load_state(self, state: dict[str, Any]) -> None:
        """Continue a conversation saved with state()."""
        self.messages = [{"role": str(m["role"]), "content": str(m["content"])} for m in state["messages"]]
        self.text = str(state["text"])
        self.reply_open = bool(state["reply_open"])
        self.prompt_ids = [int(i) for i in state["prompt_ids"]]

    def validate(self, role: str, content: str) -> None:
        """Raise ChatTemplateError/ValueError if (role, content) cannot be appended now (changes nothing)."""
        if role not in ROLES:
            raise ValueError(f"role must be one of {', '.join(ROLES)}, got {role[:64]!r}")
        if self.reply_open:
            raise ChatTemplateError("an assistant reply is in progress")
        self._extend(_render(self._tokenizer, [*self.messages, {"role": role, "content": content}], False),
                     commit=False)

    def append(self, role: str, content: str) -> list[int]:
        """Ids of one more message (the template's rendering of it in this conversation)."""
        self.validate(role, content)
        message = {"role": role, "content": content}
        ids = self._extend(_render(self._tokenizer, [*self.messages, message], False))
        self.messages.append(message)
        self._compact()
        return ids

    def system_ids(self, content: str) -> list[int]:
        """Ids of a conversation's opening system message, without changing this renderer."""
        probe = ChatRenderer(self._tokenizer)
        return probe.append("system", content)

    def generation_prompt(self) -> list[int]:
        """Ids the template adds to open the assistant's turn (e.g. "<|im_start|>assistant\\n")."""
        if self.reply_open:
            raise ChatTemplateError("an assistant reply is in progress")
        ids = self._extend(_render(self._tokenizer, self.messages, True))
        self.reply_open, self.prompt_ids = True, ids
        return ids

    def finish_reply(self, generated_ids: list[int], stopped_at_end_of_turn: bool) -> list[int]:
        """Record the generated reply as the assistant message; return the ids that complete its rendering
        (e.g. "\\n" after a generated <|im_end|>, or "<|im_end|>\\n" after a reply cut at max tokens).
        The stream then holds the template's rendering of the whole conversation, with the reply tokenized
        as generated."""
        if not self.reply_open:
            raise ChatTemplateError("no assistant reply is in progress")
        context = self.prompt_ids
        head = self._tokenizer.decode(context, skip_special_tokens=False)
        generated = self._tokenizer.decode(context + list(generated_ids),
                                           skip_special_tokens=False)[len(head):]
        content = generated
        if stopped_at_end_of_turn and generated_ids:
            last = self._tokenizer.decode([generated_ids[-1]], skip_special_tokens=False)
            if content.endswith(last):
                content = content[:len(content) - len(last)]
        message = {"role": "assistant", "content": content}
        full = _render(self._tokenizer, [*self.messages, message], False)
        base = self.text + generated
        if not full.startswith(base):
            # the reply ended with a token the template does not end an assistant message with (e.g. EOS
            # where the template writes <|im_end|>): close the turn with the template's own text
            base = self.text + content
        ids = self._extend(full, base=base)
        self.reply_open, self.prompt_ids = False, []
        self.messages.append(message)
        self._compact()
        return ids

    def _compact(self) -> None:
        """For a local template, keep only the first and the last message (and their rendering): the next
        message renders the same after them as after the whole conversation. The text from the last
        special token on, the tokenization context of the next message, must not change."""
        if not self.local or len(self.messages) <= 2:
            return
        messages = [self.messages[0], self.messages[-1]]
        text = _render(self._tokenizer, messages, False)
        if self._tail(text) == self._tail(self.text):
            self.messages, self.text = messages, text

    def _tail(self, text: str) -> str:
        start = max((text.rfind(tok) for tok in self._added), default=-1)
        return text[max(start, 0):]

    def _extend(self, rendered: str, commit: bool = True, base: str | None = None) -> list[int]:
        """Ids of rendered[len(base):] (base: the stream's text, self.text by default), checking that
        base is a prefix of the rendering; commit makes `rendered` the stream's text."""
        base = self.text if base is None else base
        if not rendered.startswith(base):
            raise ChatTemplateError(
                "the chat template is not prefix-stable: rendering one more message changes the text of "
                "the earlier ones, so the conversation cannot be streamed")
        delta = rendered[len(base):]
        if not delta:
            if commit:
                self.text = rendered
            return []
        context = self._tail(base)
        enc = self._backend.encode(context + delta, add_special_tokens=False)
        offsets = np.asarray(enc.offsets, dtype=np.int64).reshape(-1, 2)
        first = first_token_at(offsets, len(context)) if len(offsets) else 0
        if first is None:
            raise ChatTemplateError("a token of the chat template straddles a message boundary")
        if commit:
            self.text = rendered
        return list(enc.ids[first:])
