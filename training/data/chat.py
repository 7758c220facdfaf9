"""Chat data for supervised fine-tuning: JSON Lines records -> rendered turns -> masked tokens.

Records (one JSON object per line; blank lines are skipped)::

    {"messages": [{"role": "system", "content": "..."}, {"role": "user", "content": "..."},
                  {"role": "assistant", "content": "..."}, ...]}
    {"prompt": "...", "response": "...", "system": "..."}        # system optional

A prompt / response pair is the conversation ``[system?, user: prompt, assistant: response]``.
Roles are ``system``, ``user`` and ``assistant``; every content is a string; a conversation holds
at least one assistant turn and no assistant turn is empty. Anything else raises one
``DataError`` naming ``file:line``.

Template (``ChatTemplate``): the tokenizer's own Jinja ``chat_template`` (from a
``tokenizer_config.json``) or ``DEFAULT_TEMPLATE``, rendered the way Hugging Face transformers
renders chat templates: a sandboxed, immutable Jinja environment with ``trim_blocks`` and
``lstrip_blocks``, the variables ``messages``, ``add_generation_prompt``, ``bos_token``,
``eos_token`` (plus the config's other special-token strings), the ``tojson`` filter, the
``raise_exception`` and ``strftime_now`` functions, the ``loopcontrols`` extension, and
``{% generation %}`` blocks (rendered as their body: the mask comes from ``render_turns``).

Masking (``render_turns``): the assistant turn ``i`` is the text that rendering
``messages[:i+1]`` adds to rendering ``messages[:i]`` with ``add_generation_prompt=True``
(what a model is asked to produce after the generation prompt, end-of-turn tokens included).
A template for which that is not a prefix cannot be masked this way and is refused.
``encode_turns`` tokenises each piece on its own (no special tokens added), so every token is
either wholly prompt or wholly assistant.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from training.errors import DataError

ROLES = ("system", "user", "assistant")

# The documented default (docs/finetuning.md): role headers on their own line, the assistant's
# reply ended by the end-of-sequence token.
DEFAULT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{{ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


def _conversation(obj, where: str) -> list[dict]:
    """One parsed JSON value -> validated messages (``DataError`` naming ``where``)."""
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if "messages" in obj:
        msgs = obj["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise DataError(f"{where}: 'messages' must be a non-empty list")
    elif "prompt" in obj or "response" in obj:
        for key in ("prompt", "response"):
            if not isinstance(obj.get(key), str):
                raise DataError(f"{where}: '{key}' must be a string (a prompt / response record "
                                "has both)")
        msgs = [{"role": "user", "content": obj["prompt"]},
                {"role": "assistant", "content": obj["response"]}]
        if obj.get("system") is not None:
            msgs.insert(0, {"role": "system", "content": obj["system"]})
    else:
        raise DataError(f"{where}: a record needs 'messages' or 'prompt' and 'response'")
    out = []
    for k, m in enumerate(msgs):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise DataError(f"{where}: message {k} must be an object with 'role' and 'content'")
        if m["role"] not in ROLES:
            raise DataError(f"{where}: message {k} has role {m['role']!r}; expected one of "
                            f"{', '.join(ROLES)}")
        if not isinstance(m["content"], str):
            raise DataError(f"{where}: message {k} content must be a string")
        if m["role"] == "assistant" and not m["content"].strip():
            raise DataError(f"{where}: message {k} is an empty assistant turn")
        out.append({"role": m["role"], "content": m["content"]})
    if not any(m["role"] == "assistant" for m in out):
        raise DataError(f"{where}: the conversation has no assistant turn (nothing to learn)")
    return out


def read_conversations(path: str | Path) -> list[list[dict]]:
    """All conversations of a JSON Lines file, validated (``DataError`` naming ``file:line``)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"sft.data: '{path}' is not a file")
    out = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{where}: not JSON ({exc.msg} at column {exc.colno})") from None
            out.append(_conversation(obj, where))
    if not out:
        raise DataError(f"sft.data: '{path}' holds no records")
    return out


def _generation_extension():
    """``{% generation %} ... {% endgeneration %}`` renders its body (transformers marks the
    assistant span with it; ``render_turns`` finds that span on its own)."""
    from jinja2 import nodes
    from jinja2.ext import Extension

    class Generation(Extension):
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.Scope(body).set_lineno(lineno)

    return Generation


def _raise(message):
    from jinja2.exceptions import TemplateError

    raise TemplateError(message)


@dataclass
class ChatTemplate:
    """A Jinja chat template and the special-token strings it may use."""

    source: str
    special: dict  # bos_token, eos_token, ... (strings)
    origin: str = "default"  # where the template came from (for logs and errors)

    def __post_init__(self):
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        from datetime import datetime

        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True,
            extensions=["jinja2.ext.loopcontrols", _generation_extension()])
        env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False,
                                                                  indent=indent)
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            self._template = env.from_string(self.source)
        except Exception as exc:  # noqa: BLE001 - any jinja2 syntax error
            raise DataError(f"chat template of {self.origin}: {exc}") from None

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        try:
            return self._template.render(messages=messages,
                                         add_generation_prompt=add_generation_prompt,
                                         **self.special)
        except Exception as exc:  # noqa: BLE001 - raise_exception and template bugs
            raise DataError(f"chat template of {self.origin}: {exc}") from None


def _token_str(value) -> str:
    """A special token of tokenizer_config.json: a string or an AddedToken-like dict."""
    if isinstance(value, dict):
        return str(value.get("content", ""))
    return "" if value is None else str(value)


def load_template(directory: str | Path | None, eos_default: str) -> ChatTemplate:
    """The chat template of ``directory``: ``chat_template.jinja`` if present, else the
    ``chat_template`` of ``tokenizer_config.json`` (a string, or the one named ``default`` of a
    list), else ``DEFAULT_TEMPLATE``; special tokens from ``tokenizer_config.json`` (default:
    no bos, ``eos_token = eos_default``)."""
    special, source, origin = {}, None, "default"
    cfg_path = Path(directory) / "tokenizer_config.json" if directory else None
    if cfg_path is not None and cfg_path.is_file():
        try:
            conf = json.loads(cfg_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise DataError(f"'{cfg_path}' cannot be read: {exc}") from None
        special = {k: _token_str(v) for k, v in conf.items() if k.endswith("_token")}
        source = conf.get("chat_template")
        if isinstance(source, list):  # named templates: [{"name": "default", "template": ...}]
            named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
            source = named.get("default")
        origin = str(cfg_path)
    jinja_path = Path(directory) / "chat_template.jinja" if directory else None
    if jinja_path is not None and jinja_path.is_file():
        source, origin = jinja_path.read_text(encoding="utf-8"), str(jinja_path)
    special.setdefault("bos_token", "")
    special.setdefault("eos_token", eos_default)
    if not isinstance(source, str):
        return ChatTemplate(DEFAULT_TEMPLATE, special)
    return ChatTemplate(source, special, origin=origin)


def render_turns(template: ChatTemplate, messages: list[dict]) -> list[tuple[str, bool]]:
    """The rendered conversation as ``(text, is_assistant)`` pieces in order (see the module
    docstring); their concatenation is ``template.render(messages)``."""
    pieces, done = [], ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = template.render(messages[:i], add_generation_prompt=True)
        full = template.render(messages[:i + 1])
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise DataError(f"chat template of {template.origin}: rendering is not incremental "
                            "(the conversation up to an assistant turn is not a prefix of the "
                            "conversation with it), so the assistant tokens cannot be masked")
        pieces += [(prompt[len(done):], False), (full[len(prompt):], True)]
        done = full
    whole = template.render(messages)
    if not whole.startswith(done):
        raise DataError(f"chat template of {template.origin}: rendering is not incremental")
    pieces.append((whole[len(done):], False))
    return [(text, a) for text, a in pieces if text]


def encode_turns(tokenizer, pieces: list[tuple[str, bool]]) -> tuple[list[int], list[int]]:
    """``(token ids, assistant mask)``: each piece tokenised on its own, mask 1 on the
    assistant pieces' tokens."""
    raw = getattr(tokenizer, "tokenizer", tokenizer)  # a TextTokenizer's tokenizers.Tokenizer
    ids, mask = [], []
    for text, is_assistant in pieces:
        part = raw.encode(text, add_special_tokens=False).ids
        ids += part
        mask += [int(is_assistant)] * len(part)
    return ids, mask
