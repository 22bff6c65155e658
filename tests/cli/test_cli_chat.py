"""``qubrid-lab chat MODEL`` fed from a pipe: streamed answers that keep the conversation, ``/reset``, ``/exit``."""

from __future__ import annotations

from tests.cli.conftest import assert_refused

SYSTEM = "Answer in one word."


def streamed_answer(client, model: str, messages: list[dict]) -> str:
    """The model's greedy answer, streamed the way the chat verb streams it."""
    stream = client.openai.chat.completions.create(
        model=model, messages=messages, temperature=0, max_tokens=6, stream=True
    )
    return "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)


def test_chat_answers_each_line_with_the_conversation_so_far_until_reset_and_exit(cli, client, chat_model):
    system, hello = {"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hello"}
    first = streamed_answer(client, chat_model, [system, hello])
    second = streamed_answer(client, chat_model, [system, hello, {"role": "assistant", "content": first}, hello])
    assert first and second != first  # otherwise this test could not tell a kept conversation from a lost one

    done = cli(
        "chat",
        chat_model,
        "--system",
        SYSTEM,
        "--temperature",
        0,
        "--max-tokens",
        6,
        stdin="Hello\nHello\n/reset\nHello\n/exit\nHello\n",
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"{first}\n{second}\n{first}\n"
    assert "(conversation reset)" in done.stderr


def test_chat_ends_at_the_end_of_input_and_refuses_a_model_the_server_lacks(cli, chat_model):
    done = cli("chat", chat_model, "--max-tokens", 3, stdin="Hello\n")
    assert done.returncode == 0 and done.stdout.endswith("\n") and done.stdout.strip(), done.stderr
    assert_refused(cli("chat", "no-such-model", stdin="Hello\n"), "The model 'no-such-model' does not exist")
    assert_refused(cli("chat", chat_model, "--max-tokens", 0, stdin="Hello\n"), "max_tokens")
