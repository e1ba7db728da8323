"""Which pages may open the websocket (`moshi_mlx.web.origin`), on requests made by hand and on a
real server's parsing of them."""

import asyncio
import socket

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from multidict import CIMultiDict

from moshi_mlx.web import origin
from moshi_mlx.web.origin import OriginPolicy

NAMES = {"studio", "studio.lan"}  # this machine's names, as the tests pretend


def request(host: str, *origins: str, scheme: str = "http"):
    headers = CIMultiDict([("Host", host)] + [("Origin", o) for o in origins])
    return make_mocked_request("GET", "/api/chat", headers=headers).clone(scheme=scheme)


@pytest.mark.parametrize("bound, host, origins", [
    ("localhost", "localhost:8998", ["http://localhost:8998", "http://localhost:8998"]),
    ("localhost", "localhost:8998", ["http://localhost:8998", "https://evil.example"]),
    ("0.0.0.0", "studio:8998", ["http://studio:8998", "http://evil.example"]),
])
def test_more_than_one_origin_header_is_refused(bound, host, origins):
    policy = OriginPolicy(bound, names=NAMES)
    assert policy.allows(request(host, origins[0]))  # the first header alone passes
    assert not policy.allows(request(host, *origins))


@pytest.mark.parametrize("bound, host, allowed", [
    ("0.0.0.0", "evil.example:8998", False),  # DNS rebinding against a LAN-bound server
    ("192.168.1.5", "evil.example:8998", False),
    ("::", "evil.example:8998", False),
    ("0.0.0.0", "studio:8998", True),  # the machine's host name
    ("0.0.0.0", "STUDIO.lan.:8998", True),  # its fully qualified name, as a browser may write it
    ("moshi.example", "moshi.example:8998", True),  # the name the server was started with
    ("moshi.example", "other.example:8998", False),
    ("0.0.0.0", "192.168.1.5:8998", True),  # an address cannot be rebound
    ("0.0.0.0", "[fe80::1]:8998", True),
    ("0.0.0.0", "localhost:8998", True),
    ("localhost", "studio:8998", False),  # a loopback server: loopback names only
    ("127.0.0.1", "192.168.1.5:8998", False),
])
def test_off_loopback_only_the_servers_own_names_pass(bound, host, allowed):
    own = f"http://{host}"
    assert OriginPolicy(bound, names=NAMES).allows(request(host, own)) is allowed


def test_an_allowed_origin_passes_whatever_the_host(monkeypatch):
    policy = OriginPolicy("0.0.0.0", ["https://app.example/"], names=NAMES)
    assert policy.allows(request("evil.example:8998", "https://app.example"))
    assert not policy.allows(request("evil.example:8998", "https://app.example",
                                     "https://app.example"))


def test_the_machines_names_come_from_the_socket_module(monkeypatch):
    monkeypatch.setattr(socket, "gethostname", lambda: "box")
    monkeypatch.setattr(socket, "getfqdn", lambda: "box.home.arpa")
    assert origin.machine_names() == {"box", "box.home.arpa"}
    policy = OriginPolicy("0.0.0.0")
    assert policy.allows(request("box.home.arpa:8998", "http://box.home.arpa:8998"))
    assert not policy.allows(request("evil.example:8998", "http://evil.example:8998"))


def test_a_real_server_sees_every_origin_header():
    """Headers as aiohttp's server parses them off the wire: both Origin headers are seen."""
    policy = OriginPolicy("0.0.0.0", names=NAMES)

    async def handler(request):
        return web.Response(status=200 if policy.allows(request) else 403)

    async def main():
        app = web.Application()
        app.router.add_get("/api/chat", handler)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        statuses = []
        try:
            async with aiohttp.ClientSession() as http:
                for origins in (["http://studio:8998"],
                                ["http://studio:8998", "http://evil.example"]):
                    headers = CIMultiDict([("Host", "studio:8998")]
                                          + [("Origin", o) for o in origins])
                    async with http.get(f"http://127.0.0.1:{port}/api/chat",
                                        headers=headers) as response:
                        statuses.append(response.status)
        finally:
            await runner.cleanup()
        return statuses

    assert asyncio.run(main()) == [200, 403]


@pytest.mark.parametrize("bound, host, origin, allowed", [
    ("localhost", "localhost:8998", None, True),  # Kyutai's command-line clients send none
    ("localhost", "localhost:8998", "http://localhost:8998", True),
    ("localhost", "127.0.0.1:8998", "http://127.0.0.1:8998/", True),
    ("localhost", "[::1]:8998", "http://[::1]:8998", True),
    ("localhost", "localhost:8998", "http://localhost:5173", False),  # another local server
    ("localhost", "localhost:8998", "https://evil.example", False),
    ("localhost", "localhost:8998", "null", False),  # a file:// page
    ("localhost", "evil.example:8998", "http://evil.example:8998", False),  # DNS rebinding
    ("0.0.0.0", "192.168.1.5:8998", "http://192.168.1.5:8998", True),
    ("0.0.0.0", "192.168.1.5:8998", "https://192.168.1.5:8998", False),  # scheme differs
    ("0.0.0.0", "192.168.1.5:8998", "http://evil.example", False),
])
def test_origin_policy(bound, host, origin, allowed):
    assert OriginPolicy(bound).allows(request(host, *([origin] if origin else []))) is allowed


def test_origins_allowed_explicitly():
    policy = OriginPolicy("localhost", ["http://localhost:5173/"])
    assert policy.allows(request("localhost:8998", "http://localhost:5173"))
    assert policy.allows(request("localhost:8998", "https://localhost:8998", scheme="https"))
    assert not policy.allows(request("localhost:8998", "http://localhost:5174"))
