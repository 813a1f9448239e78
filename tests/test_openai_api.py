"""The clients researchers use against serve.py, as they use them: the official `openai` Python
client (completions with logprobs and echo, streaming, chat, models.retrieve), LangChain's
`OpenAI` (which always sends the penalties) and `ChatOpenAI`; and the server's generation past
the context (`--slide_window`), which equals sample.py's. One server: a tiny character GPT with
a chat template (`--chat_template`) and the sliding window."""

from __future__ import annotations

import json
import os

import httpx
import pytest

from serving import chat as chat_lib

openai = pytest.importorskip("openai")

TEMPLATE = "{% for message in messages %}{{ message['content'] }}.\n{% endfor %}"
BLOCK = 32


@pytest.fixture(scope="module")
def server(trained_lm_run, tmp_path_factory):
    """serve.py on the tiny GPT with a chat template and the sliding window."""
    from test_serve import Server

    directory = tmp_path_factory.mktemp("openai_api")
    template = directory / "chat.jinja"
    template.write_text(TEMPLATE)
    server = Server(trained_lm_run, str(directory / "server.log"), "--max_batch_size=4",
                    f"--chat_template={template}", "--slide_window")  # fmt: skip
    server.model_id = os.path.basename(trained_lm_run)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0) as client:
        yield client


def test_openai_client_completions_with_logprobs_and_echo(server, client) -> None:
    """client.completions.create with logprobs and echo parses into the client's own types,
    with the server's JSON values; streaming gives the same text; a refused value is the
    client's BadRequestError."""
    kwargs = dict(model=server.model_id, prompt="The king", max_tokens=5, temperature=0,
                  logprobs=2, echo=True, presence_penalty=0, frequency_penalty=0)  # fmt: skip
    reply = client.completions.create(**kwargs)
    raw = server.complete(**kwargs)
    (choice,) = reply.choices
    assert choice.text == raw["choices"][0]["text"] and choice.text.startswith("The king")
    logprobs = choice.logprobs
    assert logprobs.tokens == list(choice.text)
    assert logprobs.token_logprobs == raw["choices"][0]["logprobs"]["token_logprobs"]
    assert logprobs.token_logprobs[0] is None and logprobs.text_offset[:3] == [0, 1, 2]
    assert all(len(top) in (2, 3) for top in logprobs.top_logprobs[1:])
    assert reply.usage.prompt_tokens == 8 and reply.usage.completion_tokens == 5
    streamed = client.completions.create(model=server.model_id, prompt="The king", max_tokens=5,
                                         temperature=0, stream=True)  # fmt: skip
    assert "The king" + "".join(c.choices[0].text for c in streamed) == choice.text
    with pytest.raises(openai.BadRequestError, match="best_of"):
        client.completions.create(model=server.model_id, prompt="The", best_of=2)


def test_openai_client_models(server, client) -> None:
    """models.retrieve and models.list name the served run; another id is NotFoundError."""
    assert client.models.retrieve(server.model_id).id == server.model_id
    assert [m.id for m in client.models.list()] == [server.model_id]
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")


def test_openai_client_chat(server, client) -> None:
    """Chat through the run's template: the answer is the completion of the rendered
    conversation (greedy), as a message or streamed as deltas."""
    messages = [{"role": "user", "content": "The king and thou"},
                {"role": "assistant", "content": "My lord"}]  # fmt: skip
    reply = client.chat.completions.create(model=server.model_id, messages=messages,
                                           max_tokens=6, temperature=0)  # fmt: skip
    prompt = chat_lib.render(TEMPLATE, messages, None)
    expected = server.complete(prompt=prompt, max_tokens=6, temperature=0)["choices"][0]["text"]
    (choice,) = reply.choices
    assert choice.message.role == "assistant" and choice.message.content == expected
    assert reply.object == "chat.completion" and reply.usage.completion_tokens == 6
    stream = client.chat.completions.create(model=server.model_id, messages=messages,
                                            max_tokens=6, temperature=0, stream=True)  # fmt: skip
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
    # No max_tokens: what the context leaves.
    reply = client.chat.completions.create(model=server.model_id, messages=messages[:1],
                                           temperature=0)  # fmt: skip
    assert reply.choices[0].finish_reason in ("length", "stop")
    with pytest.raises(openai.BadRequestError, match="logprobs"):
        client.chat.completions.create(model=server.model_id, messages=messages, logprobs=True)


def test_langchain_completes_a_prompt(server) -> None:
    """LangChain's OpenAI (which always sends presence_penalty and frequency_penalty) and
    ChatOpenAI get the server's greedy text."""
    langchain_openai = pytest.importorskip("langchain_openai")

    llm = langchain_openai.OpenAI(base_url=server.url + "/v1", api_key="unused",
                                  model=server.model_id, max_tokens=8, temperature=0)  # fmt: skip
    expected = server.complete(prompt="The king", max_tokens=8, temperature=0)
    assert llm.invoke("The king") == expected["choices"][0]["text"]
    chat = langchain_openai.ChatOpenAI(
        base_url=server.url + "/v1",
        api_key="unused",
        model=server.model_id,
        max_tokens=4,
        temperature=0,
    )
    assert isinstance(chat.invoke("The king").content, str)


def test_generation_past_the_context_equals_sample_py(trained_lm_run, server) -> None:
    """With --slide_window a request may ask for more tokens than the context leaves: each one
    past it is conditioned on the last block_size tokens, as sample.py generates (the same
    greedy text); the logprobs of those tokens are scored on the same windows (each greedy
    token is its window's most likely one)."""
    from test_serve import _sample_py

    prompt, max_tokens = "The king and thou", 40  # 17 + 40 tokens: 25 past a 32-token context
    expected = _sample_py(trained_lm_run, prompt, max_tokens)
    reply = server.complete(prompt=prompt, max_tokens=max_tokens, temperature=0, logprobs=1)
    (choice,) = reply["choices"]
    assert prompt + choice["text"] == expected
    logprobs = choice["logprobs"]
    assert len(logprobs["tokens"]) == max_tokens
    for token, logprob, top in zip(logprobs["tokens"], logprobs["token_logprobs"],
                                   logprobs["top_logprobs"], strict=True):  # fmt: skip
        assert top[token] == logprob == max(top.values())
    health = httpx.get(server.url + "/healthz").json()
    assert health["compilations_since_ready"] == 0


def test_chat_template_is_found_in_the_workdir(tmp_path) -> None:
    """A run's chat template: chat_template.jinja, else tokenizer_config.json's (a string, or
    the 'default' of named ones); none without either."""
    assert chat_lib.find_template(str(tmp_path)) is None
    config = {"chat_template": [{"name": "tool_use", "template": "x"},
                                {"name": "default", "template": TEMPLATE}]}  # fmt: skip
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    assert chat_lib.find_template(str(tmp_path)) == TEMPLATE
    (tmp_path / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
    template = chat_lib.find_template(str(tmp_path))
    assert chat_lib.render(template, [{"role": "user", "content": "hi"}], None) == "hi"
    with pytest.raises(chat_lib.TemplateError, match="roles"):
        chat_lib.render("{{ raise_exception('roles must alternate') }}", [], None)
