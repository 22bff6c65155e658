"""The usage ledger: tokens and cost per day, key and model, and each stored key's spend, in SQLite.

One row per (UTC day, key, model), added to in place: a busy server writes one small transaction per
request, and the table grows with days × keys × models, not with requests. The charge to a key's ``spent``
is made in the same transaction as its ledger row, so the two never disagree after a crash.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import date as Date
from datetime import datetime, timezone

from qubrid_lab.storage.db import Database

OPEN_KEY_ID = "open"  # requests to a server with no keys configured
OPEN_KEY_NAME = "(no key)"


@dataclass(frozen=True)
class Price:
    """USD per million input (prompt and training) and output tokens."""

    input_per_mtok: float
    output_per_mtok: float

    def cost(self, input_tokens: int, output_tokens: int) -> float:
        return (input_tokens * self.input_per_mtok + output_tokens * self.output_per_mtok) / 1_000_000


@dataclass(frozen=True)
class UsageRow:
    date: str
    model: str
    key_name: str
    requests: int
    prompt_tokens: int
    completion_tokens: int
    training_tokens: int
    cost: float


def utc_day(at: float | None = None) -> str:
    return datetime.fromtimestamp(time.time() if at is None else at, timezone.utc).date().isoformat()


class UsageLedger:
    def __init__(self, db: Database):
        self.db = db

    def record(
        self,
        *,
        key_id: str,
        key_name: str,
        model: str,
        price: Price,
        prompt_tokens: int = 0,
        completion_tokens: int = 0,
        training_tokens: int = 0,
        requests: int = 1,
        charge: bool = False,
    ) -> float:
        """Add one request's (or job's) tokens; with ``charge`` the cost goes on the stored key's spend too."""
        cost = price.cost(prompt_tokens + training_tokens, completion_tokens)
        with self.db.transaction() as connection:
            connection.execute(
                "INSERT INTO usage (date, key_id, key_name, model, requests, prompt_tokens, completion_tokens,"
                " training_tokens, cost) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (date, key_id, model) DO UPDATE SET requests = requests + excluded.requests,"
                " prompt_tokens = prompt_tokens + excluded.prompt_tokens,"
                " completion_tokens = completion_tokens + excluded.completion_tokens,"
                " training_tokens = training_tokens + excluded.training_tokens, cost = cost + excluded.cost,"
                " key_name = excluded.key_name",
                (utc_day(), key_id, key_name, model, requests, prompt_tokens, completion_tokens, training_tokens, cost),
            )
            if charge and cost:
                connection.execute("UPDATE api_keys SET spent = spent + ? WHERE id = ?", (cost, key_id))
        return cost

    def report(
        self,
        *,
        key_id: str | None = None,
        start_date: Date | None = None,
        end_date: Date | None = None,
        model: str | None = None,
    ) -> list[UsageRow]:
        """Rows by day (oldest first), model and key; ``key_id`` None: every key's."""
        clauses, params = [], []
        for clause, value in (
            ("key_id = ?", key_id),
            ("date >= ?", start_date and start_date.isoformat()),
            ("date <= ?", end_date and end_date.isoformat()),
            ("model = ?", model),
        ):
            if value is not None:
                clauses.append(clause)
                params.append(value)
        where = f" WHERE {' AND '.join(clauses)}" if clauses else ""
        with self.db.connect() as connection:
            rows = connection.execute(
                "SELECT date, model, key_name, requests, prompt_tokens, completion_tokens, training_tokens, cost"
                f" FROM usage{where} ORDER BY date, model, key_name",
                params,
            ).fetchall()
        return [UsageRow(**dict(row)) for row in rows]
