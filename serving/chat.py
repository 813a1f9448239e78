"""Chat templates: how /v1/chat/completions turns a conversation into one prompt.

A run serves chat only if it has a template, in Hugging Face's format (a Jinja2 template over
`messages`, each {'role', 'content'}, with `add_generation_prompt`, `bos_token` and
`eos_token`; Hugging Face's "Chat templates" guide), found in this order: the file serve.py's
`--chat_template` names, `<workdir>/chat_template.jinja` (where transformers saves one), the
`chat_template` of `<workdir>/tokenizer_config.json` (a string, or a list of named templates
of which 'default' is taken). A base model trained here has none: chat requests to it get a
400 that says so and points to /v1/completions.
"""

from __future__ import annotations

import json
import os
from typing import Any

CHAT_TEMPLATE_FILE = "chat_template.jinja"
TOKENIZER_CONFIG = "tokenizer_config.json"


class TemplateError(ValueError):
    """A chat template that cannot be read, or that refuses a conversation (its own
    `raise_exception`, e.g. roles out of order)."""


def find_template(workdir: str, path: str | None = None) -> str | None:
    """The chat template's text (see the module docstring), or None if the run has none.
    Raises TemplateError for a `path` that cannot be read or a tokenizer_config.json whose
    chat_template is not a template."""
    if path:
        try:
            with open(path, encoding="utf-8") as f:
                return f.read()
        except OSError as e:
            raise TemplateError(f"--chat_template={path}: cannot read it ({e.strerror}).") from None
    jinja = os.path.join(workdir, CHAT_TEMPLATE_FILE)
    if os.path.isfile(jinja):
        with open(jinja, encoding="utf-8") as f:
            return f.read()
    config = os.path.join(workdir, TOKENIZER_CONFIG)
    if os.path.isfile(config):
        with open(config, encoding="utf-8") as f:
            template = json.load(f).get("chat_template")
        if isinstance(template, list):
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        if template is not None and not isinstance(template, str):
            raise TemplateError(f"{config}: chat_template is not a template string.")
        return template
    return None


def render(template: str, messages: list[dict[str, str]], eos_token: str | None) -> str:
    """The prompt of a conversation: `template` rendered (Jinja2, sandboxed, as transformers
    renders chat templates) with add_generation_prompt=True, so that the model's answer
    follows. Raises TemplateError if the template does not compile or refuses the
    conversation."""
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> Any:
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    try:
        compiled = env.from_string(template)
        return compiled.render(
            messages=messages, add_generation_prompt=True, bos_token="", eos_token=eos_token or ""
        )
    except jinja2.TemplateError as e:
        raise TemplateError(f"the chat template failed: {e}") from None
