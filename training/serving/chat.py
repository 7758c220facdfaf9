"""Chat messages -> prompt text.

``ChatFormatter.from_dir(model_dir)`` reads ``tokenizer_config.json`` there (when present):
its ``chat_template`` (a Jinja template, rendered in a sandbox with ``messages``,
``add_generation_prompt=True``, ``bos_token``, ``eos_token``) formats the conversation the way
the model was trained. Without one, ``DEFAULT_TEMPLATE`` is used: each message as
``<|role|>\\n{content}\\n`` and then ``<|assistant|>\\n`` for the answer, e.g.

    <|system|>
    You are terse.
    <|user|>
    Hi
    <|assistant|>
"""
from __future__ import annotations

import json
from pathlib import Path

DEFAULT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n"
                    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def _token_text(value) -> str:
    """A special token as written in tokenizer_config.json (a string or ``{"content": ...}``)."""
    if isinstance(value, dict):
        return str(value.get("content", ""))
    return "" if value is None else str(value)


class ChatFormatter:
    """``format(messages) -> str``; see the module docstring. ``source`` says where the
    template came from (a file path or ``"default"``)."""

    def __init__(self, template: str, source: str, bos: str = "", eos: str = ""):
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        self.template, self.source = env.from_string(template), source
        self.bos, self.eos = bos, eos

    @classmethod
    def from_dir(cls, model_dir: str | Path | None) -> "ChatFormatter":
        path = None if model_dir is None else Path(model_dir) / "tokenizer_config.json"
        if path is not None and path.is_file():
            cfg = json.loads(path.read_text(encoding="utf-8"))
            template = cfg.get("chat_template")
            if isinstance(template, list):  # named templates: take "default"
                template = next((t["template"] for t in template if t.get("name") == "default"),
                                None)
            if isinstance(template, str) and template:
                return cls(template, str(path), _token_text(cfg.get("bos_token")),
                           _token_text(cfg.get("eos_token")))
        return cls(DEFAULT_TEMPLATE, "default")

    def format(self, messages: list[dict]) -> str:
        return self.template.render(messages=messages, add_generation_prompt=True,
                                    bos_token=self.bos, eos_token=self.eos)
