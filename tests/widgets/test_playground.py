"""ChatPlayground: chat models from the server, streamed answers with their metrics, and side-by-side answers."""

from __future__ import annotations

import html
import subprocess
import sys

import openai
import pytest

from qubrid_lab.settings import DEFAULT_EMBEDDING_MODEL
from qubrid_lab.widgets import ChatPlayground


def test_ask_streams_the_answer_token_by_token_and_shows_its_metrics(server, chat_model):
    playground = ChatPlayground(server)
    options = playground.model.options  # fine-tuned models of other tests may be there too
    assert chat_model in options and all(model == chat_model or model.startswith("ft:") for model in options)
    assert DEFAULT_EMBEDDING_MODEL in [model.id for model in server.client.models.list()]  # served, left out

    updates = []
    playground.panes[0].answer.observe(lambda change: updates.append(change["new"]), "value")
    playground.system.value = "You answer briefly."
    answers = playground.ask("Hello, how are you?", temperature=0, max_tokens=8, seed=3)

    whole = server.client.chat.completions.create(
        model=chat_model,
        temperature=0,
        max_tokens=8,
        seed=3,
        messages=[
            {"role": "system", "content": "You answer briefly."},
            {"role": "user", "content": "Hello, how are you?"},
        ],
    )
    assert answers == [whole.choices[0].message.content] and answers[0]
    assert len(updates) > 3  # the pane grew piece by piece, not once at the end
    assert html.unescape(updates[-1]).endswith(f"{answers[0]}</div>")

    pane = playground.panes[0]
    assert (
        pane.metrics["completion_tokens"] == 8
        and 0 < pane.metrics["ttft_seconds"] <= pane.metrics["total_time_seconds"]
    )
    assert "8 tokens" in pane.footer.value and "tokens/s" in pane.footer.value
    assert (playground.temperature.value, playground.seed.value) == (0, "3")  # the inputs show what was sent
    assert playground.sampling == {
        "temperature": 0,
        "top_p": 1.0,
        "max_tokens": 8,
        "presence_penalty": 0.0,
        "frequency_penalty": 0.0,
        "seed": 3,
    }


def test_side_by_side_sends_the_same_prompt_to_both_models(server, chat_model):
    playground = ChatPlayground(server, models=[chat_model, chat_model])
    assert len(playground.answers.children) == 1 and playground.second_model.disabled

    playground.side_by_side.value = True
    assert len(playground.answers.children) == 2 and not playground.second_model.disabled
    playground.set_sampling(temperature=0, max_tokens=6, stop=["zzz"])
    playground.prompt.value = "Tell me about the fox."
    playground.send_button.click()

    left, right = playground.panes
    assert left.text and left.text == right.text  # one model, greedy: the same answer on both sides
    assert left.metrics["completion_tokens"] == right.metrics["completion_tokens"] == 6
    assert chat_model in left.heading.value and chat_model in right.heading.value


def test_a_refused_request_is_shown_in_its_pane(server, chat_model):
    playground = ChatPlayground(server, models=["no-such/model", chat_model])
    with pytest.raises(openai.NotFoundError):
        playground.ask("Hi", max_tokens=4)
    assert "does not exist or is not loaded" in playground.panes[0].footer.value

    playground.model.value = chat_model
    playground.stop.value = "a\nb\nc\nd\ne"
    playground.send_button.click()  # the button shows the server's 400 instead of raising
    assert "at most 4 stop sequences" in playground.panes[0].footer.value and playground.panes[0].text == ""
    with pytest.raises(TypeError, match="no sampling field"):
        playground.ask("Hi", temprature=0)


def test_side_by_side_first_in_a_fresh_kernel_builds_the_sdk_types_before_streaming(server, chat_model):
    # Two panes parsing their first chunks at once used to race on pydantic's lazy build of the SDK's types
    # ("type object 'ChatCompletionChunk' has no attribute '__pydantic_core_schema__'"), seen in a notebook.
    script = (
        "from openai.types.chat.chat_completion_chunk import ChatCompletionChunk, Choice, ChoiceDelta\n"
        "from qubrid_lab.widgets import ChatPlayground\n"
        "types = (ChatCompletionChunk, Choice, ChoiceDelta)  # built lazily: their first parse builds them\n"
        "built_when_streams_start = []\n"
        "stream = ChatPlayground._stream\n"
        "def recording(self, *args):\n"
        "    built_when_streams_start.append(all(t.__pydantic_complete__ for t in types))\n"
        "    return stream(self, *args)\n"
        "ChatPlayground._stream = recording\n"
        f"playground = ChatPlayground(base_url={server.url!r}, api_key={server.api_key!r}, "
        f"models=[{chat_model!r}] * 2)\n"
        "playground.side_by_side.value = True\n"
        "answers = playground.ask('Hello', temperature=0, max_tokens=4)\n"
        "print(built_when_streams_start, len(answers), answers[0] == answers[1] != '')\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=False)
    assert result.stdout.split() == ["[True,", "True]", "2", "True"], result.stderr
