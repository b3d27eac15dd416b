"""Safe defaults of the server (SW-SEC-*, SW-LIMIT-1, SW-OPS-1): Host allow-list, API key,
cross-origin refusal, admin endpoints, the adapter root, header names, JSON limits, CLI flags.
Servers bind 127.0.0.1 only."""

from __future__ import annotations

import argparse
import json
import os

import pytest

pytest.importorskip("openai")

import openai
from openai_support import build_world, client, engine_for, http, service_for, start_server

from jaxlora.commands import serve as serve_command
from jaxlora.serve.errors import BadRequestError, ForbiddenError
from jaxlora.serve.hooks import RoutingHooks
from jaxlora.serve.limits import parse_json
from jaxlora.serve.security import Policy, decode_header_name, resolve_under_root

KEY = "test-key-123"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_world(tmp_path_factory.mktemp("security"))


@pytest.fixture(scope="module")
def open_server(world):
    """Default policy: no key, no unauthenticated admin, local Host names only."""
    service = service_for(world, engine_for(world), runtime_loading=True)
    server = start_server(service)
    yield server, service
    server.stop()


@pytest.fixture(scope="module")
def keyed_server(world):
    service = service_for(world, engine_for(world), runtime_loading=True, policy=Policy(KEY))
    server = start_server(service)
    yield server, service
    server.stop()


def _host_header(url):
    return url.removeprefix("http://")


@pytest.mark.clause("SW-SEC-1")
def test_a_foreign_host_header_is_refused(open_server):
    """SW-SEC-1: DNS rebinding: a request whose Host is not a local name is refused (403) on
    every endpoint; local names with any port pass; `allowed_hosts` adds names."""
    server, _ = open_server
    for path in ("/v1/models", "/metrics", "/health"):
        status, _, raw = http(server.url + path, headers={"Host": "evil.example"})
        assert status == 403 and "Host 'evil.example' is not allowed" in raw.decode()
    port = server.port
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", "LOCALHOST", f"[::1]:{port}"):
        assert http(server.url + "/v1/models", headers={"Host": host})[0] == 200, host
    policy = Policy(allowed_hosts=("api.internal",))
    assert policy.host_allowed("api.internal:443") and not policy.host_allowed("localhost")
    assert Policy(allowed_hosts=("*",)).host_allowed("anything.example")


@pytest.mark.clause("SW-SEC-3")
@pytest.mark.parametrize("path", ["/v1/completions", "/v1/load_lora_adapter", "/generate"])
def test_a_cross_origin_simple_request_changes_nothing(open_server, path):
    """SW-SEC-3: CSRF: a cross-site `text/plain` POST (a "simple request" a web page can send
    without preflight) is refused, as is any state-changing request with a foreign Origin or
    Sec-Fetch-Site: cross-site, or a body that is not JSON; the native `/generate` too."""
    server, service = open_server
    body = json.dumps({"lora_name": "x", "lora_path": "alpha", "model": "alpha", "prompt": "hi"})
    for headers, status in (
        ({"Origin": "http://evil.example", "Content-Type": "text/plain"}, 403),
        ({"Origin": "null", "Content-Type": "application/json"}, 403),
        ({"Origin": "http://evil.example", "Content-Type": "application/json"}, 403),
        ({"Sec-Fetch-Site": "cross-site", "Content-Type": "application/json"}, 403),
        ({"Content-Type": "text/plain"}, 415),
        ({"Content-Type": "application/x-www-form-urlencoded"}, 415),
        ({"Content-Type": "multipart/form-data; boundary=x"}, 415),
    ):
        got, _, _ = http(server.url + path, "POST", data=body.encode(), headers=headers)
        assert got == status, (headers, got)
    assert service.registry.get("x") is None
    if path == "/v1/completions":  # a same-origin JSON request passes
        origin = {"Origin": server.url, "Content-Type": "application/json"}
        got, _, _ = http(
            server.url + path, "POST", data=b'{"model": "nope", "prompt": "x"}', headers=origin
        )
        assert got == 404


@pytest.mark.clause("SW-SEC-2")
def test_an_api_key_is_checked_on_every_endpoint(keyed_server):
    """SW-SEC-2: with a key, every endpoint needs `Authorization: Bearer KEY` (401 otherwise;
    the openai client raises AuthenticationError); with it, requests pass."""
    server, _ = keyed_server
    for method, path in (
        ("GET", "/v1/models"),
        ("GET", "/metrics"),
        ("GET", "/health"),
        ("POST", "/v1/completions"),
        ("POST", "/v1/load_lora_adapter"),
        ("POST", "/generate"),
        ("GET", "/nowhere"),
    ):
        body = {} if method == "POST" else None
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
            status, got, _ = http(server.url + path, method, body, headers)
            assert status == 401 and got["www-authenticate"] == "Bearer", (path, headers)
    with pytest.raises(openai.AuthenticationError):
        client(server.url, "wrong").models.list()
    assert next(iter(client(server.url, KEY).models.list().data)).id == "tiny"


@pytest.mark.clause("SW-SEC-4", "SW-SEC-7")
def test_admin_endpoints_need_a_key_or_the_explicit_opt_in(open_server, keyed_server, world):
    """SW-SEC-4, SW-SEC-7: without a key, loading and unloading are refused (403) unless
    `allow_unauthenticated_admin`; with the key they work; source paths are shown only to
    admins."""
    server, service = open_server
    for path, body in (
        ("/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "alpha"}),
        ("/v1/unload_lora_adapter", {"lora_name": "alpha"}),
    ):
        status, _, raw = http(server.url + path, "POST", body)
        assert (
            status == 403 and "--allow-unauthenticated-admin" in json.loads(raw)["error"]["message"]
        )
    assert service.registry.get("alpha") is not None
    assert {m.root for m in client(server.url).models.list().data} == {None}

    keyed, kservice = keyed_server
    auth = {"Authorization": f"Bearer {KEY}"}
    status, headers, raw = http(
        keyed.url + "/v1/load_lora_adapter",
        "POST",
        {"lora_name": "late", "lora_path": "beta"},
        auth,
    )
    assert status == 200 and raw.startswith(b"Success: LoRA adapter 'late' added")
    assert headers["x-adapter-version"] == kservice.registry.get("beta").version
    roots = {m.id: m.root for m in client(keyed.url, KEY).models.list().data}
    assert roots["late"] == str((world.root / "beta").resolve())
    assert roots["tiny"] == str(world.model_dir)
    status, _, raw = http(
        keyed.url + "/v1/load_lora_adapter",
        "POST",
        {"lora_name": "late", "lora_path": "beta"},
        auth,
    )
    assert status == 409 and "load_inplace" in raw.decode()
    status, _, _ = http(keyed.url + "/v1/unload_lora_adapter", "POST", {"lora_name": "late"}, auth)
    assert status == 200 and kservice.registry.get("late") is None
    status, _, _ = http(keyed.url + "/v1/unload_lora_adapter", "POST", {"lora_name": "late"}, auth)
    assert status == 404


@pytest.mark.clause("SW-SEC-5")
def test_runtime_loads_stay_under_the_adapter_root_and_reveal_nothing_outside(
    keyed_server, world, tmp_path
):
    """SW-SEC-5: `..`, absolute paths and symlinks out of the root are refused (403) with the
    same message whether the target exists or not; relative paths resolve against the root,
    not the working directory; a NUL byte is a 400."""
    server, _ = keyed_server
    auth = {"Authorization": f"Bearer {KEY}"}
    (world.root / "out_ok").symlink_to(tmp_path, target_is_directory=True)
    (world.root / "out_missing").symlink_to(tmp_path / "missing", target_is_directory=True)
    (world.root / "inside").symlink_to(world.root / "alpha", target_is_directory=True)

    def load(path):
        status, _, raw = http(
            server.url + "/v1/load_lora_adapter",
            "POST",
            {"lora_name": "esc", "lora_path": path},
            auth,
        )
        message = json.loads(raw)["error"]["message"] if status != 200 else ""
        return status, message.replace(repr(path), "PATH")

    refusals = {
        load(p)
        for p in (
            "../../../../etc",
            "../../../../no-such-dir",
            "/etc",
            "/nope",
            "out_ok",
            "out_missing",
            "alpha/../../x",
            "C:\\Windows",
        )
    }
    assert len(refusals) == 1, refusals
    status, message = refusals.pop()
    assert status == 403 and "inside the server's adapter root" in message
    assert load("inside")[0] == 200  # a link that stays inside the root is fine
    assert load("alpha\x00x")[0] == 400
    status, message = load("no-such-adapter")
    assert status == 400 and "no adapter directory PATH under the adapter root" in message
    cwd = os.getcwd()
    try:  # a directory named like an adapter in the working directory is not used
        os.chdir(tmp_path)
        (tmp_path / "gamma2").mkdir()
        assert load("gamma2")[0] == 400
    finally:
        os.chdir(cwd)
    with pytest.raises(ForbiddenError):
        resolve_under_root(world.root, "../x")
    assert resolve_under_root(world.root, "alpha") == (world.root / "alpha").resolve()


@pytest.mark.clause("SW-SEC-6")
def test_utf8_adapter_names_are_selectable_by_header():
    """SW-SEC-6: a header carrying UTF-8 (as raw bytes, which servers hand over as Latin-1, or
    RFC 8187 `UTF-8''` percent-encoding) selects the adapter of that name; invalid UTF-8 is
    a 400."""
    name = "ünï☃"
    raw = name.encode("utf-8").decode("latin-1")  # what starlette gives for the raw header
    assert decode_header_name(raw) == name
    assert decode_header_name("utf-8''%C3%BCn%C3%AF%E2%98%83") == name
    assert decode_header_name("plain-name") == "plain-name"
    plan = RoutingHooks().plan({}, header=raw, request_id="r")
    assert plan.chain == (name,) and plan.route["source"] == "header"
    with pytest.raises(BadRequestError, match="not valid UTF-8"):
        decode_header_name("\xff\xfe")


@pytest.mark.clause("SW-LIMIT-1")
@pytest.mark.parametrize("path", ["/v1/completions", "/generate"])
def test_json_depth_number_size_and_nul_bytes_are_400s(open_server, path):
    """SW-LIMIT-1: 100,000-deep JSON, a 5000-digit integer, NaN, and a NUL character in a
    string are 400s naming the problem (never 500), on every route; the server keeps
    serving."""
    server, _ = open_server
    cases = {
        b"[" * 100_000 + b"]" * 100_000: "nested 100000 deep, above the limit of 32",
        b'{"model": "alpha", "prompt": "x", "max_tokens": ' + b"9" * 5000 + b"}": "5000 characters",
        b'{"model": "alpha", "prompt": "x", "temperature": NaN}': "NaN is not JSON",
        b'{"model": "alpha", "prompt": "x", "temperature": 1e999}': "overflows a float",
        b'{"model": "alpha", "prompt": "a\\u0000b"}': "`prompt` holds a NUL character",
        b'{"model": "alpha", "prompt": "x", "stop": ["\\u0000"]}': "`stop`[0] holds a NUL",
    }
    for data, message in cases.items():
        status, _, raw = http(
            server.url + path,
            "POST",
            data=data,
            headers={"Content-Type": "application/json"},
        )
        assert status == 400 and message in json.loads(raw)["error"]["message"], raw[:200]
    assert parse_json(b'{"a": [1, {"b": "c"}]}') == {"a": [1, {"b": "c"}]}
    assert http(server.url + "/v1/models")[0] == 200


def _parse(*argv):
    parser = argparse.ArgumentParser(prog="jaxlora serve")
    serve_command.add_arguments(parser)
    return parser, parser.parse_args(["--model", "m", *argv])


@pytest.mark.clause("SW-OPS-1")
@pytest.mark.parametrize(
    "argv",
    [
        ("--port", "99999"),
        ("--port", "-1"),
        ("--max-pending", "0"),
        ("--timeout", "-1"),
        ("--timeout", "inf"),
        ("--rows", "0"),
        ("--chunks", "16,x"),
        ("--max-adapter-delta", "0"),
        ("--chunks", "64,16"),
        ("--prefill-tokens", "0"),
        ("--routing", "fastest"),
        ("--cache-dtype", "int3"),
        ("--min-confidence", "nan"),
    ],
)
def test_cli_flags_are_validated(argv, capsys):
    """SW-OPS-1: out-of-range flags are refused when parsed (exit status 2 naming the flag)."""
    with pytest.raises(SystemExit) as exit_:
        _parse(*argv)
    assert exit_.value.code == 2
    assert argv[0] in capsys.readouterr().err


@pytest.mark.clause("SW-OPS-1")
def test_cli_help_shows_defaults_and_binds_loopback():
    """SW-OPS-1: --help shows every default; the server listens on 127.0.0.1 by default and
    has no API key, no unauthenticated admin and no runtime loading unless asked."""
    parser, args = _parse()
    text = parser.format_help()
    for flag in ("--port PORT", "--host HOST", "--max-pending", "--timeout"):
        assert flag in text
    for default in (
        "(default: 8000)",
        "(default: 127.0.0.1)",
        "(default: 1024)",
        "(default: 600.0)",
        "(default: adapters)",
        "--routing {auto,gather,onehot,ragged}",
        "(default: auto)",
    ):
        assert default in " ".join(text.split()), default
    assert args.host == "127.0.0.1" and args.api_key is None
    assert not args.allow_unauthenticated_admin and not args.enable_runtime_lora
    assert _parse("--port", "0")[1].port == 0 and _parse("--port", "65535")[1].port == 65535


@pytest.mark.clause("SW-OAI-6")
def test_runtime_loading_is_off_unless_enabled(world):
    """SW-OAI-6: without `runtime_loading` the vLLM loading routes answer 404 naming the flag,
    even for an admin; nothing is loaded."""
    service = service_for(world, engine_for(world), policy=Policy(allow_unauthenticated_admin=True))
    server = start_server(service)
    try:
        status, _, raw = http(
            server.url + "/v1/load_lora_adapter", "POST", {"lora_name": "x", "lora_path": "alpha"}
        )
        assert status == 404 and "--enable-runtime-lora" in raw.decode()
    finally:
        server.stop()
    assert service.registry.get("x") is None


@pytest.mark.clause("SW-ADAPT-1")
@pytest.mark.parametrize("name", ["", " pad", "tab\there", "nul\x00", "base", "x" * 129, 7])
def test_adapter_names_are_checked(open_server, name):
    """SW-ADAPT-1: names are 1-128 printable Unicode characters without surrounding spaces,
    not `base`; others are refused (400) before anything is read or loaded."""
    _, service = open_server
    with pytest.raises(BadRequestError, match="is invalid: use 1 to 128 printable Unicode"):
        service.registry.load_dir(name, "alpha")
    assert service.registry.add("ünï☃ v2", {}).name == "ünï☃ v2"  # UTF-8 names are fine
    service.registry.remove("ünï☃ v2")
