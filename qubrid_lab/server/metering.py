"""Per-key limits and metering: requests and tokens per minute (429), credits (402), a bounded wait (503), and
the usage ledger every request and job ends in.

Rate limits use the ``limits`` library's sliding-window counter in this process's memory (one server owns a
home, so one process sees all of a key's requests). Tokens per minute are reserved when a request starts (its
estimated prompt tokens plus every token it may generate) and settled to the real count when it ends, so
concurrent requests cannot all slip under the limit at once. Credits are checked before any work starts and
charged when a request ends: requests already in flight when a key's credit runs out may finish, so a key
can overspend by at most what those requests cost.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import dataclass, field

from limits import RateLimitItemPerMinute
from limits.storage import MemoryStorage
from limits.strategies import SlidingWindowCounterRateLimiter

from qubrid_lab.errors import InsufficientFundsError, QubridError, RateLimitError, ServerOverloadedError
from qubrid_lab.models.catalogue import ModelEntry
from qubrid_lab.settings import Settings
from qubrid_lab.storage.jobs import JobRecord
from qubrid_lab.storage.keys import ApiKey, KeyStore
from qubrid_lab.storage.usage import OPEN_KEY_ID, OPEN_KEY_NAME, Price, UsageLedger

log = logging.getLogger("qubrid_lab")
CHARS_PER_TOKEN = 4  # a request's prompt tokens are estimated from its characters until the backend counts them
UNBOUNDED_COMPLETION_ESTIMATE = 1024  # reserved for a request with no max_tokens (settled when it ends)


def estimate_tokens(characters: int) -> int:
    return max(1, math.ceil(characters / CHARS_PER_TOKEN))


def input_characters(inputs: list[str | list[int]]) -> int:
    """The characters of prompts or inputs for the admission estimate; one sent as token ids counts as the
    characters its tokens are estimated at."""
    return sum(len(item) if isinstance(item, str) else CHARS_PER_TOKEN * len(item) for item in inputs)


@dataclass
class Charge:
    """One admitted request: settle it once with the tokens it used (a second settle does nothing)."""

    meter: Meter
    key: ApiKey | None
    model: str
    reserved: int
    settled: bool = field(default=False)

    def settle(
        self, prompt_tokens: int, completion_tokens: int, ttft_seconds: float | None = None
    ) -> asyncio.Future | None:
        """Settle the reservation now; the ledger row is written on a worker thread, whose future is returned
        (await it to have the row readable before answering)."""
        if self.settled:
            return None
        self.settled = True
        if self.meter.metrics is not None:
            self.meter.metrics.observe_generation(self.model, prompt_tokens, completion_tokens, ttft_seconds)
        return self.meter.settle(self, prompt_tokens, completion_tokens)


class Meter:
    """The server's limits, prices and ledger."""

    def __init__(self, settings: Settings, ledger: UsageLedger, keys: KeyStore, entries: dict[str, ModelEntry]):
        self.settings = settings
        self.ledger = ledger
        self.keys = keys
        self.entries = entries
        self._storage = MemoryStorage()
        self._limiter = SlidingWindowCounterRateLimiter(self._storage)
        self.metrics = None  # the app's Prometheus metrics, told every settled request and job

    # --- prices -------------------------------------------------------------------------------------

    def price(self, model_id: str) -> Price:
        """The model's catalogue price; a fine-tuned model costs what its base does; else the default."""
        entry = self.entries.get(model_id)
        if entry is None and model_id.startswith("ft:"):
            entry = self.entries.get(model_id.split(":")[1])

        def priced(side: str) -> float:
            own = getattr(entry, f"price_{side}_per_mtok", None)
            return getattr(self.settings, f"default_price_{side}_per_mtok") if own is None else own

        return Price(priced("input"), priced("output"))

    # --- admission ----------------------------------------------------------------------------------

    def count_request(self, key: ApiKey | None) -> None:
        """One request against the key's requests per minute; 429 with Retry-After past it."""
        if key is None or not key.rpm:
            return
        item = RateLimitItemPerMinute(key.rpm)
        if not self._limiter.hit(item, key.id, "requests"):
            raise self._too_fast(item, key, "requests", f"{key.rpm} requests per minute")

    def require_credit(self, key: ApiKey | None) -> None:
        if key is not None and key.metered and key.spent >= key.credits:
            raise InsufficientFundsError(
                f"The credit of API key '{key.name}' is spent ({key.spent:.6f} of {key.credits:.6f} USD); ask an "
                "admin for more credit or for another key."
            )

    def admit(
        self,
        key: ApiKey | None,
        model: str,
        prompt_characters: int,
        max_completion_tokens: int | None,
        choices: int = 1,
        backend=None,
    ) -> Charge:
        """Check credit, tokens per minute and the model's waiting room before any work; reserve the tokens."""
        self.require_credit(key)
        if backend is not None:
            self._check_room(model, backend, choices)
        if max_completion_tokens is None:
            max_completion_tokens = self.settings.max_tokens_cap or UNBOUNDED_COMPLETION_ESTIMATE
        reserved = estimate_tokens(prompt_characters) + choices * max_completion_tokens
        if key is not None and key.tpm:
            item = RateLimitItemPerMinute(key.tpm)
            if reserved > key.tpm:
                raise RateLimitError(
                    f"This request may use about {reserved} tokens (its prompt and {choices} × max_tokens), more "
                    f"than the {key.tpm} tokens per minute API key '{key.name}' is allowed; lower max_tokens or "
                    "split the request.",
                    param="max_tokens" if max_completion_tokens else None,
                    headers={"Retry-After": "60"},
                )
            if not self._limiter.hit(item, key.id, "tokens", cost=reserved):
                raise self._too_fast(item, key, "tokens", f"{key.tpm} tokens per minute")
        return Charge(self, key, model, reserved if key is not None and key.tpm else 0)

    def _check_room(self, model: str, backend, choices: int) -> None:
        engine = getattr(backend, "base", backend)  # a fine-tuned model shares its base's batch
        room = self.settings.max_batch_size + self.settings.max_waiting_requests
        active = engine.active_sequences
        if active and active + choices > room:  # an idle model takes any request (its n is capped elsewhere)
            raise ServerOverloadedError(
                f"Model '{model}' has {active} sequences decoding or waiting; with this request's {choices} it would "
                f"pass its limit (max_batch_size {self.settings.max_batch_size} + max_waiting_requests "
                f"{self.settings.max_waiting_requests}); retry shortly.",
                headers={"Retry-After": "1"},
            )

    def _too_fast(self, item, key: ApiKey, counter: str, limit: str) -> RateLimitError:
        reset_at = self._limiter.get_window_stats(item, key.id, counter).reset_time
        wait = max(1, math.ceil(reset_at - time.time()))
        return RateLimitError(
            f"API key '{key.name}' is over its limit of {limit}; retry in {wait} s.", headers={"Retry-After": str(wait)}
        )

    # --- settling -----------------------------------------------------------------------------------

    def settle(self, charge: Charge, prompt_tokens: int, completion_tokens: int) -> asyncio.Future | None:
        """Settle the key's tokens-per-minute reservation, then record the request in the ledger and charge a
        metered key. The write runs on the event loop's worker threads (a busy or locked database must not stall
        every other request); without a running loop it runs here."""
        key = charge.key
        if charge.reserved and key is not None:
            item = RateLimitItemPerMinute(key.tpm)
            window = MemoryStorage.sliding_window_keys(item.key_for(key.id, "tokens"), item.get_expiry(), time.time())[
                1
            ]
            difference = prompt_tokens + completion_tokens - charge.reserved
            if difference < 0:
                self._storage.decr(window, -difference)
            elif difference > 0:
                self._storage.incr(window, 2 * item.get_expiry(), difference)

        def record() -> None:
            try:
                self.ledger.record(
                    key_id=key.id if key else OPEN_KEY_ID,
                    key_name=key.name if key else OPEN_KEY_NAME,
                    model=charge.model,
                    price=self.price(charge.model),
                    prompt_tokens=prompt_tokens,
                    completion_tokens=completion_tokens,
                    charge=bool(key and key.metered and key.stored),
                )
            except Exception:  # an answer already sent is not failed for its bookkeeping; the log says what was lost
                log.exception(
                    "usage of %s on %s (%d + %d tokens) could not be recorded",
                    key.name if key else OPEN_KEY_NAME,
                    charge.model,
                    prompt_tokens,
                    completion_tokens,
                )

        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            record()
            return None
        return loop.run_in_executor(None, record)

    def record_training(self, job: JobRecord, tokens: int) -> None:
        """A finished job's training tokens, on its owner's usage and (metered keys) spend, as prompt tokens."""
        key = None
        if job.owner and job.owner.startswith("key-"):
            try:
                key = self.keys.get(job.owner)
            except QubridError:
                key = None
        self.ledger.record(
            key_id=job.owner or OPEN_KEY_ID,
            key_name=key.name if key else (job.owner or OPEN_KEY_NAME),
            model=job.base_model,
            price=self.price(job.base_model),
            training_tokens=tokens,
            charge=bool(key and key.metered),
            requests=0,
        )
        if self.metrics is not None:
            self.metrics.observe_generation(job.base_model, 0, 0, training_tokens=tokens)
