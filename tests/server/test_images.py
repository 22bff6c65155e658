"""Reading a chat request's images: data URLs, and http(s) URLs fetched from a real local HTTP server under the
server's image policy (hosts, private addresses, redirects, size, time)."""

from __future__ import annotations

import asyncio
import base64
import io
import time

import pytest
from PIL import Image

from qubrid_lab.errors import InvalidRequestError
from qubrid_lab.server.images import ImagePolicy, check_fetchable, load_images
from qubrid_lab.settings import Settings
from tests.local_http import QuietHandler, serving


def png(size=(20, 10), color=(0, 128, 255)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, color).save(out, format="PNG")
    return out.getvalue()


def data_url(data: bytes, kind: str = "png") -> str:
    return f"data:image/{kind};base64,{base64.b64encode(data).decode()}"


def messages(*urls: str) -> list[dict]:
    return [
        {"role": "system", "content": "Be brief."},
        {
            "role": "user",
            "content": [{"type": "text", "text": "Look:"}]
            + [{"type": "image_url", "image_url": {"url": url}} for url in urls],
        },
    ]


def load(policy: ImagePolicy, *urls: str):
    return asyncio.run(load_images(messages(*urls), policy))


def refused(policy: ImagePolicy, *urls: str) -> InvalidRequestError:
    with pytest.raises(InvalidRequestError) as caught:
        load(policy, *urls)
    return caught.value


class _Images(QuietHandler):
    """/ok.png an image; /big a body larger than the limit, sent without a length; /slow answers after 5 s;
    /missing a 404; /to/<url> redirects to <url>."""

    def do_GET(self):
        if self.path == "/ok.png":
            body = png((30, 20), (200, 10, 10))
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        elif self.path == "/big":
            self.send_response(200)
            self.end_headers()
            for _ in range(64):
                self.wfile.write(b"\0" * 4096)
        elif self.path == "/slow":
            time.sleep(5)
            self.send_response(200)
            self.end_headers()
        elif self.path.startswith("/to/"):
            self.send_response(302)
            self.send_header("Location", self.path[len("/to/") :])
            self.end_headers()
        else:
            self.send_response(404)
            self.end_headers()


@pytest.fixture(scope="module")
def image_server():
    with serving(_Images) as base_url:
        yield int(base_url.rsplit(":", 1)[1])


def test_data_urls_become_rgb_images_in_order():
    images = load(ImagePolicy(), data_url(png((20, 10))), data_url(png((7, 9), (1, 2, 3)), "png"))
    assert [image.size for image in images] == [(20, 10), (7, 9)]
    assert images[1].mode == "RGB" and images[1].getpixel((0, 0)) == (1, 2, 3)


@pytest.mark.parametrize(
    "url, says",
    [
        ("data:image/png;base64,@@@@", "not valid base64"),
        ("data:text/plain;base64,aGVsbG8=", "without an image"),
        (data_url(b"this is not a picture"), "not an image this server can read"),
        ("ftp://example.com/a.png", "http(s) URL or a data URL"),
        ("file:///etc/passwd", "http(s) URL or a data URL"),
    ],
)
def test_bad_images_get_a_400_naming_the_part(url, says):
    error = refused(ImagePolicy(hosts=frozenset({"*"})), url)
    assert error.param == "messages[1].content[1].image_url.url" and says in error.message


def test_limits_on_count_bytes_and_pixels():
    assert refused(ImagePolicy(max_images=1), data_url(png()), data_url(png())).param == "messages"
    assert (
        "larger than this server's limit of 2,048 bytes"
        in refused(ImagePolicy(max_bytes=2048), data_url(png((400, 400)) + b"\0" * 4096)).message
    )
    assert "20x10 pixels" in refused(ImagePolicy(max_pixels=100), data_url(png((20, 10)))).message


def test_which_hosts_a_server_fetches_from_by_default():
    assert ImagePolicy.from_settings(Settings(host="127.0.0.1")).hosts == {"*"}
    assert ImagePolicy.from_settings(Settings(host="0.0.0.0")).hosts == frozenset()  # a shared server: none
    listed = ImagePolicy.from_settings(Settings(host="0.0.0.0", image_url_hosts="images.example.com, CDN.example.org"))
    assert listed.hosts == {"images.example.com", "cdn.example.org"}
    error = refused(ImagePolicy.from_settings(Settings(host="0.0.0.0")), "https://images.example.com/cat.png")
    assert "does not fetch images from 'images.example.com'" in error.message and "data URL" in error.message


def test_a_listed_host_is_fetched(image_server):
    (image,) = load(ImagePolicy(hosts=frozenset({"127.0.0.1"})), f"http://127.0.0.1:{image_server}/ok.png")
    assert image.size == (30, 20) and image.getpixel((0, 0)) == (200, 10, 10)
    # a name: resolved, checked, and connected to at the checked address
    (image,) = load(ImagePolicy(hosts=frozenset({"localhost"})), f"http://LocalHost:{image_server}/ok.png")
    assert image.size == (30, 20)


def test_private_addresses_need_listing_even_with_any_public_host(image_server):
    error = refused(ImagePolicy(hosts=frozenset({"*"})), f"http://localhost:{image_server}/ok.png")
    assert "private, loopback or link-local" in error.message
    error = refused(ImagePolicy(hosts=frozenset({"*"})), f"http://[::1]:{image_server}/ok.png")
    assert "private, loopback or link-local" in error.message


def test_each_redirect_is_checked_again(image_server):
    policy = ImagePolicy(hosts=frozenset({"127.0.0.1"}))
    ok = f"http://127.0.0.1:{image_server}/ok.png"
    assert load(policy, f"http://127.0.0.1:{image_server}/to/{ok}")[0].size == (30, 20)
    error = refused(policy, f"http://127.0.0.1:{image_server}/to/http://localhost:{image_server}/ok.png")
    assert "does not fetch images from 'localhost'" in error.message
    error = refused(policy, f"http://127.0.0.1:{image_server}" + "/to" * 5 + "/ok.png")
    assert "redirects more than 3 times" in error.message


def test_fetches_are_bounded_in_size_and_time(image_server):
    policy = ImagePolicy(hosts=frozenset({"127.0.0.1"}), max_bytes=64 * 1024, fetch_timeout=0.5)
    assert "larger than this server's limit" in refused(policy, f"http://127.0.0.1:{image_server}/big").message
    started = time.monotonic()
    assert "longer than 0.5 s" in refused(policy, f"http://127.0.0.1:{image_server}/slow").message
    assert time.monotonic() - started < 4  # the 5-second answer was not waited for
    assert "HTTP 404" in refused(policy, f"http://127.0.0.1:{image_server}/missing").message


def test_backends_that_fetch_themselves_get_the_same_url_rules():
    policy = ImagePolicy(max_images=2)
    check_fetchable(messages(data_url(png()), data_url(png())), policy)  # data URLs pass through
    with pytest.raises(InvalidRequestError, match="does not fetch images"):
        check_fetchable(messages("https://example.com/a.png"), policy)
    with pytest.raises(InvalidRequestError, match="at most 2"):
        check_fetchable(messages(*[data_url(png())] * 3), policy)
