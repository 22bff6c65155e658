"""``client.compare``: several models' answers to the same questions, side by side in a DataFrame."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas

    from qubrid_lab.client.api_client import Client

PARALLEL_REQUESTS = 8  # the server decodes requests that arrive together in one batch


def compare(
    client: Client, models: Iterable[str] | Mapping[str, str], questions: Iterable[str] | str, **sampling
) -> pandas.DataFrame:
    """Ask every model every question (one user message each) and return the answers as a DataFrame.

    One row per question: a ``question`` column, then one column per model with its answer. ``models`` is a list
    of model ids (the columns are named after them) or a mapping of column name to model id. ``sampling`` holds
    any ``/v1/chat/completions`` fields (``max_tokens``, ``seed``, ``stop``, ...); answers are greedy
    (``temperature`` 0) unless it says otherwise. A refused request raises its typed error.
    """
    import pandas

    columns = dict(models) if isinstance(models, Mapping) else {model: model for model in models}
    questions = [questions] if isinstance(questions, str) else list(questions)
    fields = {"temperature": 0, **sampling}

    def answer(model: str, question: str) -> str:
        body = {**fields, "model": model, "messages": [{"role": "user", "content": question}]}
        return client.request("POST", "/v1/chat/completions", json=body)["choices"][0]["message"]["content"]

    with ThreadPoolExecutor(max_workers=PARALLEL_REQUESTS) as pool:  # every request in flight at once
        pending = {
            name: [pool.submit(answer, model, question) for question in questions] for name, model in columns.items()
        }
        answers = {name: [future.result() for future in futures] for name, futures in pending.items()}
    return pandas.DataFrame({"question": questions, **answers})
