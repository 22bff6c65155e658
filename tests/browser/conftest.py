"""The widget tests' server (the tiny chat model) and dataset, for the browser test of the monitor on a tiny job."""

from tests.widgets.conftest import chat_model, facts_dataset, server  # noqa: F401
