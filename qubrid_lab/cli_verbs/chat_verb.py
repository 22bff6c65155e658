"""``qubrid-lab chat MODEL``: a conversation with a served model, streamed over the ``openai`` client.

Lines come from stdin (typed, or piped by a script); each gets the model's answer with the conversation so far.
``/reset`` forgets the conversation (the system message stays), ``/exit`` or end of input ends it, and Ctrl-C
stops an answer midway (it is not kept) or, at the prompt, ends the chat.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from qubrid_lab.cli_verbs.connection import connect
from qubrid_lab.client.api_errors import ServerUnavailableError, error_from_response

if TYPE_CHECKING:
    from openai import OpenAI

PROMPT = ">>> "
EXIT, RESET = "/exit", "/reset"


def _read_line(interactive: bool) -> str | None:
    """The next line the user wrote, without its newline; None at the end of input."""
    if interactive:
        try:
            return input(PROMPT)
        except EOFError:
            print(file=sys.stderr)
            return None
    line = sys.stdin.readline()
    return line.rstrip("\n") if line else None


def _stream_answer(openai_client: OpenAI, messages: list[dict], args: argparse.Namespace) -> str:
    """Print the model's answer to ``messages`` as it arrives and return it whole; the API's refusal as a
    ``QubridLabError``."""
    import openai

    sampling = {
        name: value
        for name, value in (("temperature", args.temperature), ("max_tokens", args.max_tokens))
        if value is not None
    }
    pieces: list[str] = []
    try:
        stream = openai_client.chat.completions.create(model=args.model, messages=messages, stream=True, **sampling)
        with stream:
            for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    pieces.append(chunk.choices[0].delta.content)
                    sys.stdout.write(pieces[-1])
                    sys.stdout.flush()
    except openai.APIStatusError as exc:
        raise error_from_response(exc.response) from None
    except openai.APIConnectionError as exc:
        raise ServerUnavailableError(f"No answer from the server: {exc}") from None
    finally:
        if pieces:
            print()
    return "".join(pieces)


def cmd_chat(args: argparse.Namespace) -> int:
    interactive = sys.stdin.isatty()
    with connect(args) as client:
        client.models.get(args.model)  # a model the server does not serve is refused before the first line
        system = [{"role": "system", "content": args.system}] if args.system else []
        messages = list(system)
        if interactive:
            print(
                f"chatting with {args.model}; {RESET} forgets the conversation, {EXIT} or Ctrl-D ends it",
                file=sys.stderr,
            )
        while (line := _read_line(interactive)) is not None and line.strip() != EXIT:
            if line.strip() == RESET:
                messages = list(system)
                print("(conversation reset)", file=sys.stderr)
                continue
            if not line.strip():
                continue
            try:
                answer = _stream_answer(client.openai, [*messages, {"role": "user", "content": line}], args)
            except KeyboardInterrupt:
                print("\n(answer stopped; not kept)", file=sys.stderr)
                continue
            messages += [{"role": "user", "content": line}, {"role": "assistant", "content": answer}]
    return 0


def add_chat_verb(commands, parents: list[argparse.ArgumentParser]) -> None:
    chat = commands.add_parser(
        "chat",
        parents=parents,
        help="chat with a served model (lines from stdin; the answers stream)",
        description="A conversation with MODEL: each line read from stdin is sent with the conversation so far and "
        f"the answer streams back. {RESET} forgets the conversation; {EXIT} or the end of input ends it.",
    )
    chat.add_argument("model", help="a model id the server serves (base or fine-tuned, ft:…)")
    chat.add_argument("--system", help="a system message that starts the conversation")
    chat.add_argument("--temperature", type=float, help="sampling temperature (default: the server's)")
    chat.add_argument("--max-tokens", type=int, help="the longest answer, in tokens (default: the server's)")
    chat.set_defaults(run=cmd_chat)
