"""``ChatPlayground``: ask a chat model (base or fine-tuned) and watch the answer stream in, or ask two side by side.

Requests go through the server's OpenAI-compatible ``/v1/chat/completions`` with the ``openai`` client
(``stream=True``); the sampling inputs take their ranges from the server's own request model, and the
``x_metrics`` block of the last chunk (time to first token, tokens per second) is shown under each answer.
"""

from __future__ import annotations

import html
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import ipywidgets as widgets
import openai

from qubrid_lab.server.protocol.common import SamplingFields
from qubrid_lab.widgets._client import connect, error_text
from qubrid_lab.widgets._fields import slider_range, status_html

LABEL_STYLE = {"description_width": "130px"}
SAMPLING_NAMES = ("temperature", "top_p", "max_tokens", "seed", "stop", "presence_penalty", "frequency_penalty")
# What a stream carries, for _build_sdk_types: a chunk with text, then a chunk with the usage.
_CANNED_STREAM = (
    b'data: {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": "m", "choices": [{"index": 0, '
    b'"delta": {"role": "assistant", "content": "a"}, "finish_reason": "stop"}]}\n\n'
    b'data: {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": "m", "choices": [], '
    b'"usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}\n\n'
    b"data: [DONE]\n\n"
)
_sdk_types_lock = threading.Lock()
_sdk_types_built = False


def _build_sdk_types() -> None:
    """Have the ``openai`` SDK parse a canned stream once, in this thread, before streams run in parallel.

    The SDK's response types are pydantic models built on first use, and pydantic's lazy build is not
    thread-safe: two answers streaming side by side in a fresh kernel can both build ``ChatCompletionChunk`` at
    once and one fails with "has no attribute '__pydantic_core_schema__'". Parsing a stream served from memory
    (no request leaves the process) builds every type a real stream's parsing builds.
    """
    global _sdk_types_built
    with _sdk_types_lock:
        if _sdk_types_built:
            return
        transport = httpx.MockTransport(
            lambda request: httpx.Response(200, content=_CANNED_STREAM, headers={"content-type": "text/event-stream"})
        )
        with openai.OpenAI(
            base_url="http://canned.invalid/v1",
            api_key="-",
            max_retries=0,
            http_client=httpx.Client(transport=transport),
        ) as client:
            for _ in client.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "a"}], stream=True
            ):
                pass
        _sdk_types_built = True


class AnswerPane(widgets.VBox):
    """One model's answer: a heading, the text as it streams, and the request's metrics."""

    def __init__(self):
        self.heading = widgets.HTML()
        self.answer = widgets.HTML(layout=widgets.Layout(min_height="3em"))
        self.footer = widgets.HTML()
        self.text = ""
        self.metrics: dict | None = None
        super().__init__(
            [self.heading, self.answer, self.footer],
            layout=widgets.Layout(flex="1 1 0", border="1px solid #ddd", padding="4px 8px"),
        )

    def start(self, model: str) -> None:
        self.heading.value = f"<b>{html.escape(model)}</b>"
        self.text, self.metrics = "", None
        self.footer.value = status_html("waiting for the first token…")
        self._render()

    def add(self, piece: str) -> None:
        self.text += piece
        self._render()

    def finish(self, metrics: dict | None, completion_tokens: int | None) -> None:
        self.metrics = {**(metrics or {}), "completion_tokens": completion_tokens}
        parts = [f"{completion_tokens} tokens" if completion_tokens is not None else None]
        if metrics:
            parts += [
                f"first token after {metrics['ttft_seconds']:.2f} s",
                f"{metrics['tps']:.1f} tokens/s",
                f"{metrics['total_time_seconds']:.2f} s in all",
            ]
        self.footer.value = status_html(" · ".join(part for part in parts if part))

    def fail(self, message: str) -> None:
        self.footer.value = status_html(message, "error")

    def _render(self) -> None:
        self.answer.value = f'<div style="white-space:pre-wrap">{html.escape(self.text)}</div>'


def _slider(name: str, value: float, step: float) -> widgets.FloatSlider:
    low, high = slider_range(SamplingFields, name)
    return widgets.FloatSlider(
        value=value,
        min=low,
        max=high,
        step=step,
        description=name,
        style=LABEL_STYLE,
        tooltip=SamplingFields.model_fields[name].description,
    )


class ChatPlayground(widgets.VBox):
    """Chat with the server's models: pick one (or two, side by side), set sampling, send a prompt.

    ``ask(prompt, **sampling)`` does what the Send button does, without a click, and returns the answers
    (one per model shown); ``panes`` hold each answer's ``text`` and ``metrics``.
    """

    def __init__(
        self,
        server: Any = None,
        models: list[str] | None = None,
        *,
        base_url: str | None = None,
        api_key: str | None = None,
    ):
        self.api = connect(server, base_url, api_key)
        options = list(models) if models is not None else self.api.chat_models()
        self.model = widgets.Dropdown(
            options=options, description="model", style=LABEL_STYLE, layout=widgets.Layout(width="460px")
        )
        self.side_by_side = widgets.Checkbox(
            value=False, description="compare with", indent=False, layout=widgets.Layout(width="110px")
        )
        self.second_model = widgets.Dropdown(
            options=options, value=options[-1] if options else None, layout=widgets.Layout(width="340px"), disabled=True
        )
        self.temperature = _slider("temperature", 0.7, 0.05)
        self.top_p = _slider("top_p", 1.0, 0.05)
        self.presence_penalty = _slider("presence_penalty", 0.0, 0.1)
        self.frequency_penalty = _slider("frequency_penalty", 0.0, 0.1)
        self.max_tokens = widgets.BoundedIntText(
            value=256, min=1, max=1_000_000, description="max_tokens", style=LABEL_STYLE
        )
        self.seed = widgets.Text(
            description="seed",
            placeholder="random",
            style=LABEL_STYLE,
            tooltip="A whole number makes sampling repeatable.",
        )
        self.stop = widgets.Textarea(
            description="stop", placeholder="one stop string per line (at most 4)", style=LABEL_STYLE, rows=2
        )
        self.system = widgets.Textarea(
            description="system prompt",
            placeholder="optional",
            style=LABEL_STYLE,
            layout=widgets.Layout(width="100%"),
            rows=2,
        )
        self.prompt = widgets.Textarea(
            description="prompt",
            placeholder="Ask something…",
            style=LABEL_STYLE,
            layout=widgets.Layout(width="100%"),
            rows=3,
        )
        self.send_button = widgets.Button(description="Send", button_style="primary", icon="paper-plane")
        self.panes = [AnswerPane(), AnswerPane()]
        self.answers = widgets.HBox([self.panes[0]], layout=widgets.Layout(width="100%"))

        self.side_by_side.observe(self._on_side_by_side, "value")
        self.send_button.on_click(lambda _: self._on_send())
        sampling = widgets.VBox(
            [
                widgets.HBox([self.temperature, self.top_p]),
                widgets.HBox([self.presence_penalty, self.frequency_penalty]),
                widgets.HBox([self.max_tokens, self.seed]),
                self.stop,
            ]
        )
        super().__init__(
            [
                widgets.HBox([self.model, self.side_by_side, self.second_model]),
                widgets.Accordion([sampling], titles=("Sampling",)),
                self.system,
                self.prompt,
                self.send_button,
                self.answers,
            ]
        )

    @property
    def models(self) -> list[str]:
        """The models the next question goes to."""
        return [self.model.value, self.second_model.value] if self.side_by_side.value else [self.model.value]

    @property
    def sampling(self) -> dict[str, Any]:
        """The sampling fields of the next request, as sent (unset optional ones left out)."""
        values = {
            "temperature": self.temperature.value,
            "top_p": self.top_p.value,
            "max_tokens": self.max_tokens.value,
            "presence_penalty": self.presence_penalty.value,
            "frequency_penalty": self.frequency_penalty.value,
        }
        seed = self.seed.value.strip()
        if seed:
            values["seed"] = int(seed) if seed.lstrip("-").isdigit() else seed  # the server names a bad one
        stops = [line for line in self.stop.value.splitlines() if line]
        if stops:
            values["stop"] = stops
        return values

    def set_sampling(self, **values: Any) -> None:
        """Set sampling inputs by request field name (``temperature=0``, ``stop=["\\n"]``, ``seed=None``)."""
        unknown = sorted(set(values) - set(SAMPLING_NAMES))
        if unknown:
            raise TypeError(f"no sampling field {', '.join(unknown)}; fields: {', '.join(SAMPLING_NAMES)}")
        for name, value in values.items():
            if name == "seed":
                self.seed.value = "" if value is None else str(value)
            elif name == "stop":
                self.stop.value = "\n".join([value] if isinstance(value, str) else value or [])
            else:
                getattr(self, name).value = value

    def ask(self, prompt: str | None = None, **sampling: Any) -> list[str]:
        """Send ``prompt`` (default: the prompt box) to the chosen model(s), streaming into the panes.

        ``sampling`` sets the sampling inputs first (they stay set). Returns one answer per model; raises the
        first failure (an ``openai`` error) after every pane has shown its own.
        """
        if prompt is not None:
            self.prompt.value = prompt
        self.set_sampling(**sampling)
        outcomes = self._send()
        for outcome in outcomes:
            if isinstance(outcome, Exception):
                raise outcome
        return outcomes

    def _send(self) -> list[str | Exception]:
        """Stream the prompt box's question to every chosen model at once; each answer, or its failure."""
        messages = ([{"role": "system", "content": self.system.value}] if self.system.value.strip() else []) + [
            {"role": "user", "content": self.prompt.value}
        ]
        models, params = self.models, self.sampling
        if len(models) > 1:
            _build_sdk_types()
        with ThreadPoolExecutor(max_workers=len(models)) as pool:
            return list(pool.map(lambda pane, model: self._stream(pane, model, messages, params), self.panes, models))

    def _stream(self, pane: AnswerPane, model: str, messages: list[dict], params: dict) -> str | Exception:
        """Stream one answer into ``pane``; a failure is shown there and returned."""
        pane.start(model)
        metrics, completion_tokens = None, None
        try:
            chunks = self.api.openai.chat.completions.create(
                model=model, messages=messages, stream=True, stream_options={"include_usage": True}, **params
            )
            for chunk in chunks:
                if chunk.choices and chunk.choices[0].delta.content:
                    pane.add(chunk.choices[0].delta.content)
                metrics = (chunk.model_extra or {}).get("x_metrics") or metrics
                if chunk.usage is not None:
                    completion_tokens = chunk.usage.completion_tokens
        except (openai.OpenAIError, httpx.HTTPError) as exc:  # shown in its pane; ask() raises it later
            pane.fail(error_text(exc))
            return exc
        pane.finish(metrics, completion_tokens)
        return pane.text

    def _on_side_by_side(self, change: dict) -> None:
        self.second_model.disabled = not change["new"]
        self.answers.children = self.panes if change["new"] else self.panes[:1]

    def _on_send(self) -> None:
        self._send()  # each pane shows its own answer or failure
