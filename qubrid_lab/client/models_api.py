"""``client.models``: the models the server serves (``/v1/models``) and the fine-tuned ones it keeps."""

from __future__ import annotations

from typing import TYPE_CHECKING
from urllib.parse import quote

if TYPE_CHECKING:
    from qubrid_lab.client.api_client import Client

FINE_TUNED = "/v1/fine-tuning/models"


def _path(model_id: str) -> str:
    """A model id (``HuggingFaceTB/SmolLM2-135M-Instruct``, ``ft:…:harbour:ftjob-…``) as a path segment; the
    routes take ids with slashes, so only other reserved characters are escaped."""
    return quote(model_id, safe="/:")


class Models:
    """The served models (base and fine-tuned, with their ``kind`` and ``vision`` extensions) and the fine-tuned
    models completed jobs produced. Models are the server's JSON objects, as dicts."""

    def __init__(self, client: Client):
        self._client = client

    def list(self) -> list[dict]:
        """Every model this key may use: chat and embedding models, fine-tuned ones included."""
        return self._client.request("GET", "/v1/models")["data"]

    def get(self, model_id: str) -> dict:
        return self._client.request("GET", f"/v1/models/{_path(model_id)}")

    def chat_ids(self, *, fine_tuned: bool = True) -> list[str]:
        """Ids of the models that generate text, fine-tuned ones (``ft:…``) unless ``fine_tuned=False``."""
        return [
            model["id"]
            for model in self.list()
            if model["kind"] == "chat" and (fine_tuned or not model["id"].startswith("ft:"))
        ]

    def fine_tuned(self) -> list[dict]:
        """The fine-tuned models (id, base model, job id, status)."""
        return self._client.request("GET", FINE_TUNED)["data"]

    def delete(self, model_id: str) -> None:
        """Stop serving a fine-tuned model and delete its adapter."""
        self._client.request("DELETE", f"{FINE_TUNED}/{_path(model_id)}")
