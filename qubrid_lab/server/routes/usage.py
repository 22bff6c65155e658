"""``GET /v1/usage`` (extension): a key's usage by day and model; an admin sees every key's."""

from __future__ import annotations

from datetime import date

from fastapi import APIRouter, Query, Request
from starlette.concurrency import run_in_threadpool

from qubrid_lab.errors import InvalidRequestError
from qubrid_lab.server.auth import key_of, require_admin
from qubrid_lab.server.protocol.usage import UsageList, UsageRecord

router = APIRouter(tags=["Usage"])


DAY = r"^[0-9]{4}-[0-9]{2}-[0-9]{2}$"


def _day(value: str | None, field: str) -> date | None:
    if value is None:
        return None
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise InvalidRequestError(f"{field}: {value!r} is not a calendar day (YYYY-MM-DD).", param=field) from None


@router.get("/usage")
async def get_usage(
    request: Request,
    start_date: str | None = Query(None, pattern=DAY, description="First UTC day, YYYY-MM-DD."),
    end_date: str | None = Query(None, pattern=DAY, description="Last UTC day, YYYY-MM-DD."),
    model: str | None = Query(None, max_length=512),
    key_name: str | None = Query(None, max_length=64, description="Admins only: one key's usage."),
) -> UsageList:
    """Tokens and cost by UTC day, model and key: the caller's own, or (admin keys) every key's."""
    start_date, end_date = _day(start_date, "start_date"), _day(end_date, "end_date")
    if start_date and end_date and start_date > end_date:
        raise InvalidRequestError(f"start_date {start_date} is after end_date {end_date}.", param="start_date")
    key = key_of(request)
    key_id = None
    if key_name is not None and (key is None or key_name != key.name):
        require_admin(request, "Reading another key's usage")
    if key is not None and not key.admin:
        key_id = key.id
    rows = await run_in_threadpool(
        request.app.state.meter.ledger.report, key_id=key_id, start_date=start_date, end_date=end_date, model=model
    )
    if key_name is not None:
        rows = [row for row in rows if row.key_name == key_name]
    return UsageList(data=[UsageRecord(**vars(row)) for row in rows])
