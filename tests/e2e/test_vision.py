"""Vision end to end: a real server with a tiny LLaVA (built from a config) and the tiny text model, talked to with
the official ``openai`` client; images as data URLs and as http URLs from a real local HTTP server."""

from __future__ import annotations

import base64
import io
import json

import openai
import pytest
from PIL import Image

from tests.e2e.conftest import start_server
from tests.local_http import QuietHandler, serving

pytestmark = pytest.mark.e2e

MAX_IMAGES = 2


def png(color: tuple[int, int, int], size=(40, 30)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, color).save(out, format="PNG")
    return out.getvalue()


RED, BLUE = png((220, 30, 30)), png((20, 40, 230), (60, 45))


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def look(*urls: str, text: str = "What is in this picture?") -> list[dict]:
    return [
        {
            "role": "user",
            "content": [{"type": "text", "text": text}]
            + [{"type": "image_url", "image_url": {"url": url}} for url in urls],
        }
    ]


class _Pictures(QuietHandler):
    def do_GET(self):
        body = {"/red.png": RED, "/blue.png": BLUE}.get(self.path)
        self.send_response(200 if body else 404)
        self.send_header("Content-Length", str(len(body or b"")))
        self.end_headers()
        self.wfile.write(body or b"")


@pytest.fixture(scope="module")
def pictures():
    with serving(_Pictures) as base_url:
        yield base_url


@pytest.fixture(scope="module")
def vision_server(tmp_path_factory, tiny_vision_dirs, tiny_model_dir):
    root = tmp_path_factory.mktemp("vision-e2e")
    catalogue = root / "catalogue.json"
    catalogue.write_text(
        json.dumps(
            [
                {"id": "tiny-llava", "kind": "chat", "source": f"dir:{tiny_vision_dirs['llava']}", "owned_by": "tests"},
                {"id": "tiny", "kind": "chat", "source": f"dir:{tiny_model_dir}", "owned_by": "tests"},
            ]
        )
    )
    env = {"QUBRID_LAB_IMAGE_URL_HOSTS": "127.0.0.1", "QUBRID_LAB_MAX_IMAGES_PER_REQUEST": str(MAX_IMAGES)}
    with start_server(
        root,
        "--catalogue-file",
        str(catalogue),
        "--model",
        "tiny-llava",
        "--model",
        "tiny",
        "--dtype",
        "float32",
        env=env,
    ) as server:
        yield server


def client_of(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def vision_client(vision_server):
    return client_of(vision_server)


@pytest.fixture(scope="module")
def relayed(vision_server, tmp_path_factory):
    """A second server serving the first one's tiny LLaVA through the ``openai`` backend (``vision: true``)."""
    root = tmp_path_factory.mktemp("vision-front")
    catalogue = root / "catalogue.json"
    catalogue.write_text(
        json.dumps(
            [
                {
                    "id": "relayed-llava",
                    "kind": "chat",
                    "backend": "openai",
                    "vision": True,
                    "base_url": f"{vision_server.base_url}/v1",
                    "upstream_model": "tiny-llava",
                }
            ]
        )
    )
    with start_server(
        root,
        "--catalogue-file",
        str(catalogue),
        "--model",
        "relayed-llava",
        env={"QUBRID_LAB_IMAGE_URL_HOSTS": "127.0.0.1"},
    ) as server:
        yield client_of(server)


def first_token_rivals(client, messages, model: str = "tiny-llava") -> list[tuple[str, float]]:
    answer = client.chat.completions.create(
        model=model, messages=messages, max_tokens=1, temperature=0, logprobs=True, top_logprobs=5
    )
    return [(rival.token, rival.logprob) for rival in answer.choices[0].logprobs.content[0].top_logprobs]


def test_the_models_list_says_which_models_take_images(vision_client):
    vision = {model.id: model.model_extra["vision"] for model in vision_client.models.list()}
    assert vision == {"tiny-llava": True, "tiny": False}


def test_a_data_url_image_is_read_and_counted(vision_client):
    answer = vision_client.chat.completions.create(
        model="tiny-llava", messages=look(data_url(RED)), max_tokens=6, temperature=0, n=2
    )
    text_only = vision_client.chat.completions.create(model="tiny-llava", messages=look(), max_tokens=6)
    assert answer.choices[0].message.content == answer.choices[1].message.content  # greedy: the same reply
    assert answer.usage.completion_tokens == 12
    # the image's 16 tokens (32x32 pixels in 8x8 patches) and its placeholder's place in the prompt
    assert answer.usage.prompt_tokens - text_only.usage.prompt_tokens == 16


def test_different_images_change_the_prediction_and_streaming_agrees(vision_client):
    red, blue = (
        first_token_rivals(vision_client, look(data_url(RED))),
        first_token_rivals(vision_client, look(data_url(BLUE))),
    )
    assert red != blue
    whole = vision_client.chat.completions.create(
        model="tiny-llava", messages=look(data_url(BLUE)), max_tokens=8, temperature=0
    )
    streamed = "".join(
        chunk.choices[0].delta.content or ""
        for chunk in vision_client.chat.completions.create(
            model="tiny-llava", messages=look(data_url(BLUE)), max_tokens=8, temperature=0, stream=True
        )
        if chunk.choices
    )
    assert streamed == whole.choices[0].message.content


def test_an_http_image_from_an_allowed_host_is_fetched(vision_client, pictures):
    assert first_token_rivals(vision_client, look(f"{pictures}/red.png")) == first_token_rivals(
        vision_client, look(data_url(RED))
    )


@pytest.mark.parametrize(
    "messages, model, param, says",
    [
        (look(data_url(RED)), "tiny", "messages[0].content", "reads text only"),
        (look(*[data_url(RED)] * (MAX_IMAGES + 1)), "tiny-llava", "messages", f"at most {MAX_IMAGES}"),
        (look("data:image/png;base64,!!"), "tiny-llava", "messages[0].content[1].image_url.url", "base64"),
        (
            look("http://localhost:9/red.png"),
            "tiny-llava",
            "messages[0].content[1].image_url.url",
            "does not fetch images from 'localhost'",
        ),
    ],
)
def test_images_the_server_cannot_take_get_a_400_naming_the_field(vision_client, messages, model, param, says):
    with pytest.raises(openai.BadRequestError) as caught:
        vision_client.chat.completions.create(model=model, messages=messages, max_tokens=2)
    error = caught.value.body
    assert error["param"] == param and says in error["message"]


def test_an_unreachable_image_names_its_part(vision_client, pictures):
    with pytest.raises(openai.BadRequestError) as caught:
        vision_client.chat.completions.create(
            model="tiny-llava", messages=look(data_url(RED), f"{pictures}/gone.png"), max_tokens=2
        )
    assert caught.value.body["param"] == "messages[0].content[2].image_url.url"
    assert "HTTP 404" in caught.value.body["message"]


def test_an_openai_upstream_with_vision_gets_the_image_parts_as_sent(relayed, vision_client, pictures):
    assert relayed.models.retrieve("relayed-llava").model_extra["vision"] is True
    for url in (data_url(BLUE), f"{pictures}/blue.png"):  # the upstream reads the data URL, fetches the http one
        assert first_token_rivals(relayed, look(url), "relayed-llava") == first_token_rivals(vision_client, look(url))
    with pytest.raises(openai.BadRequestError) as caught:  # this server's own URL rules still apply
        relayed.chat.completions.create(model="relayed-llava", messages=look("http://localhost:9/a.png"), max_tokens=2)
    assert caught.value.body["param"] == "messages[0].content[1].image_url.url"
