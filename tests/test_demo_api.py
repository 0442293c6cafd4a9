"""The demo API's contract, which the example flows in flows/ rely on."""

from __future__ import annotations

import asyncio
import base64
import csv
import io
import json
import signal
import socket
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from runner.demo_api import create_app, main

AUTH = {"Authorization": "Bearer demo-token"}
ROOT = Path(__file__).resolve().parent.parent

Client = TestClient[web.Request, web.Application]


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


@pytest.fixture
async def client() -> AsyncIterator[Client]:
    async with TestClient(TestServer(create_app(), host="127.0.0.1", port=0)) as test_client:
        yield test_client


async def get_json(client: Client, path: str, **params: Any) -> Any:
    resp = await client.get(path, params=params, headers=AUTH)
    assert resp.status == 200, await resp.text()
    assert resp.content_type == "application/json"
    return await resp.json()


# --- health and auth ----------------------------------------------------------------------


async def test_health_needs_no_auth(client: Client) -> None:
    resp = await client.get("/health")
    assert resp.status == 200
    assert await resp.json() == {"status": "ok"}


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic ZGVtbzpkZW1v"}],
)
async def test_v2_requires_a_known_bearer_token(client: Client, headers: dict[str, str]) -> None:
    for path in ("/v2/contacts", "/v2/orders", "/v2/customers/cus_0001", "/v2/catalog.xml"):
        resp = await client.get(path, headers=headers)
        assert resp.status == 401
        assert resp.headers["WWW-Authenticate"].startswith("Bearer")
        assert await resp.json() == {"errors": ["unauthorized"]}


async def test_unknown_paths_and_methods_are_json_errors(client: Client) -> None:
    resp = await client.get("/v2/nothing-here", headers=AUTH)
    assert resp.status == 404
    assert await resp.json() == {"errors": ["Not Found"]}
    resp = await client.post("/v2/orders", headers=AUTH)
    assert resp.status == 405
    assert "GET" in resp.headers["Allow"]


async def test_oauth_client_credentials_with_basic_or_form(client: Client) -> None:
    resp = await client.post(
        "/oauth/token",
        data={"grant_type": "client_credentials", "scope": "read"},
        headers=basic("demo", "demo-secret"),
    )
    assert resp.status == 200
    token = await resp.json()
    assert token["token_type"] == "Bearer"
    assert token["expires_in"] == 3600
    assert token["scope"] == "read"
    me = await client.get("/v2/me", headers={"Authorization": f"Bearer {token['access_token']}"})
    assert await me.json() == {"subject": "demo", "auth": "oauth2"}

    form = {"grant_type": "client_credentials", "client_id": "demo", "client_secret": "demo-secret"}
    resp = await client.post("/oauth/token", data=form)
    assert resp.status == 200
    assert (await resp.json())["access_token"] != token["access_token"]


async def test_oauth_refuses_bad_client_and_grant(client: Client) -> None:
    bad = {"grant_type": "client_credentials", "client_id": "demo", "client_secret": "nope"}
    resp = await client.post("/oauth/token", data=bad)
    assert resp.status == 401
    assert await resp.json() == {"error": "invalid_client"}
    resp = await client.post(
        "/oauth/token", data={"grant_type": "password"}, headers=basic("demo", "demo-secret")
    )
    assert resp.status == 400
    assert await resp.json() == {"error": "unsupported_grant_type"}


async def test_login_issues_a_token_usable_on_v2(client: Client) -> None:
    resp = await client.post("/login", json={"username": "demo", "password": "demo-password"})
    assert resp.status == 200
    token = (await resp.json())["token"]
    me = await client.get("/v2/me", headers={"Authorization": f"Bearer {token}"})
    assert await me.json() == {"subject": "demo", "auth": "login"}
    resp = await client.post("/login", json={"username": "demo", "password": "wrong"})
    assert resp.status == 401
    assert await get_json(client, "/v2/me") == {"subject": "demo", "auth": "static"}


# --- read-only lists ----------------------------------------------------------------------


async def fetch_all_contacts(client: Client, **params: Any) -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = []
    cursors: set[str] = set()
    cursor: str | None = None
    while True:
        query = dict(params, **({"cursor": cursor} if cursor else {}))
        body = await get_json(client, "/v2/contacts", **query)
        records.extend(body["data"])
        cursor = body["meta"]["next"]
        if cursor is None:
            return records
        assert cursor not in cursors
        cursors.add(cursor)


async def test_contacts_cursor_pagination_is_complete_and_disjoint(client: Client) -> None:
    records = await fetch_all_contacts(client, limit=37)
    ids = [record["id"] for record in records]
    assert len(ids) == 250
    assert len(set(ids)) == 250
    times = [record["updated_at"] for record in records]
    assert times == sorted(times)
    assert len(set(times)) == 250
    assert all(time.endswith("Z") for time in times)
    assert {"active", "deleted"} <= {record["status"] for record in records}
    for record in records:
        assert set(record) >= {"id", "emails", "company", "status", "updated_at"}
        assert "@" in record["emails"][0]["value"]
        assert isinstance(record["company"]["id"], int)


async def test_contacts_updated_since_is_strictly_after(client: Client) -> None:
    every = await fetch_all_contacts(client, limit=100)
    since = every[99]["updated_at"]
    later = await fetch_all_contacts(client, limit=30, updated_since=since)
    assert later == every[100:]
    last = every[-1]["updated_at"]
    body = await get_json(client, "/v2/contacts", updated_since=last)
    assert body == {"data": [], "meta": {"next": None}}


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"limit": "0"}, "limit must be an integer from 1 to 100"),
        ({"limit": "many"}, "limit must be an integer from 1 to 100"),
        ({"cursor": "not-a-cursor"}, "cursor is invalid"),
        ({"updated_since": "yesterday"}, "updated_since must be an ISO 8601 date-time"),
    ],
)
async def test_contacts_bad_parameters_are_400(
    client: Client, params: dict[str, str], message: str
) -> None:
    resp = await client.get("/v2/contacts", params=params, headers=AUTH)
    assert resp.status == 400
    assert await resp.json() == {"errors": [message]}


async def test_companies_some_referenced_ids_are_404(client: Client) -> None:
    contacts = await fetch_all_contacts(client, limit=100)
    referenced = {contact["company"]["id"] for contact in contacts}
    statuses: dict[int, int] = {}
    for company_id in sorted(referenced):
        resp = await client.get(f"/v2/companies/{company_id}", headers=AUTH)
        statuses[company_id] = resp.status
        if resp.status == 200:
            company = await resp.json()
            assert company["id"] == company_id
            assert company["name"]
    missing = {company_id for company_id, status in statuses.items() if status == 404}
    assert missing, "the fan-out example needs a 404 to skip"
    assert missing <= {7, 19, 23}
    assert list(statuses.values()).count(200) > 20
    resp = await client.get("/v2/companies/abc", headers=AUTH)
    assert resp.status == 404


async def test_orders_page_number_pagination(client: Client) -> None:
    first = await get_json(client, "/v2/orders", per_page=20)
    assert first["page"] == 1
    assert first["total"] == 57
    assert first["total_pages"] == 3
    seen: list[int] = []
    for page in range(1, first["total_pages"] + 1):
        body = await get_json(client, "/v2/orders", page=page, per_page=20)
        seen.extend(order["id"] for order in body["data"])
        assert all(order["total"] > 0 for order in body["data"])
    assert len(seen) == len(set(seen)) == 57
    beyond = await get_json(client, "/v2/orders", page=4, per_page=20)
    assert beyond["data"] == []


async def test_events_offset_pagination(client: Client) -> None:
    seen: list[str] = []
    offset = 0
    while True:
        body = await get_json(client, "/v2/events", offset=offset, limit=40)
        assert body["total"] == 130
        seen.extend(event["id"] for event in body["data"])
        offset += len(body["data"])
        if not body["data"] or offset >= body["total"]:
            break
    assert len(seen) == len(set(seen)) == 130


async def test_tickets_link_header_pagination(client: Client) -> None:
    base = str(client.make_url("/"))
    url: str | None = str(client.make_url("/v2/tickets"))
    seen: list[int] = []
    while url is not None:
        assert url.startswith(base), "next links are absolute URLs on the same origin"
        async with client.session.get(url, headers=AUTH) as resp:
            assert resp.status == 200
            page = await resp.json()
            assert isinstance(page, list)
            seen.extend(ticket["id"] for ticket in page)
            assert {"first", "last"} <= set(resp.links)
            next_link = resp.links.get("next")
            url = str(next_link["url"]) if next_link else None
    assert len(seen) == len(set(seen)) == 60


async def test_catalog_is_namespaced_xml(client: Client) -> None:
    resp = await client.get("/v2/catalog.xml", headers=AUTH)
    assert resp.status == 200
    assert resp.content_type == "application/xml"
    root = ET.fromstring(await resp.text())
    ns = {"cat": "urn:example:catalog", "p": "urn:example:pricing"}
    assert root.tag == "{urn:example:catalog}catalog"
    products = root.findall("cat:product", ns)
    assert len(products) == 4
    tag_counts = {p.attrib["sku"]: len(p.findall("cat:tag", ns)) for p in products}
    assert tag_counts["LAMP-1"] == 1
    assert max(tag_counts.values()) > 1
    price = products[0].find("p:price", ns)
    assert price is not None
    assert price.attrib["currency"] == "EUR"
    assert float(price.text or "") > 0


# --- customers ----------------------------------------------------------------------------


async def test_customer_round_trip(client: Client) -> None:
    resp = await client.post(
        "/v2/customers", json={"email": "new@example.com", "name": "New"}, headers=AUTH
    )
    assert resp.status == 201
    created = await resp.json()
    assert created["email"] == "new@example.com"
    assert created["plan"] == "free"
    location = resp.headers["Location"]
    assert location == f"/v2/customers/{created['id']}"
    assert await get_json(client, location) == created

    resp = await client.put(
        location, json={"email": "new@example.com", "plan": "pro"}, headers=AUTH
    )
    assert resp.status == 200
    replaced = await resp.json()
    assert (replaced["plan"], replaced["name"]) == ("pro", None)

    resp = await client.patch(location, json={"name": "Patched"}, headers=AUTH)
    patched = await resp.json()
    assert (patched["plan"], patched["name"], patched["email"]) == (
        "pro",
        "Patched",
        "new@example.com",
    )

    resp = await client.delete(location, headers=AUTH)
    assert resp.status == 204
    assert await resp.read() == b""
    for method in ("GET", "PUT", "PATCH", "DELETE"):
        resp = await client.request(method, location, json={"plan": "pro"}, headers=AUTH)
        assert resp.status == 404, method


async def test_customer_duplicate_email_is_409_with_existing_id(client: Client) -> None:
    resp = await client.post("/v2/customers", json={"email": "ADA@example.com"}, headers=AUTH)
    assert resp.status == 409
    body = await resp.json()
    assert body["existing_id"] == "cus_0001"
    assert (await get_json(client, "/v2/customers/cus_0001"))["email"] == "ada@example.com"
    # Taking another customer's email by PUT or PATCH is a conflict too.
    resp = await client.patch(
        "/v2/customers/cus_0002", json={"email": "ada@example.com"}, headers=AUTH
    )
    assert resp.status == 409
    assert (await resp.json())["existing_id"] == "cus_0001"


@pytest.mark.parametrize(
    ("body", "errors"),
    [
        ({"name": "No Email"}, ["email is required"]),
        ({"email": ""}, ["email is required"]),
        ({"email": "not-an-email"}, ["email is invalid"]),
        ({"email": "x@example.com", "plan": "gold"}, ["plan must be one of free, pro, enterprise"]),
        ({"plan": "gold"}, ["email is required", "plan must be one of free, pro, enterprise"]),
    ],
)
async def test_customer_invalid_is_422(
    client: Client, body: dict[str, Any], errors: list[str]
) -> None:
    resp = await client.post("/v2/customers", json=body, headers=AUTH)
    assert resp.status == 422
    assert await resp.json() == {"errors": errors}


async def test_customer_body_must_be_a_json_object(client: Client) -> None:
    resp = await client.post("/v2/customers", data=b"[1]", headers=AUTH)
    assert resp.status == 400
    resp = await client.post("/v2/customers", data=b"{", headers=AUTH)
    assert resp.status == 400


async def test_each_app_has_its_own_customers_and_the_same_data() -> None:
    async with TestClient(TestServer(create_app())) as first:
        resp = await first.post("/v2/customers", json={"email": "only@first.io"}, headers=AUTH)
        assert resp.status == 201
        async with TestClient(TestServer(create_app())) as second:
            resp = await second.post("/v2/customers", json={"email": "only@first.io"}, headers=AUTH)
            assert resp.status == 201
            assert await get_json(first, "/v2/contacts", limit=100) == await get_json(
                second, "/v2/contacts", limit=100
            )


# --- async exports ------------------------------------------------------------------------


async def start_export(client: Client, **body: Any) -> dict[str, Any]:
    resp = await client.post("/v2/exports", json=body, headers=AUTH)
    assert resp.status == 202
    job: dict[str, Any] = await resp.json()
    assert job["status"] == "pending"
    assert resp.headers["Location"] == f"/v2/exports/{job['id']}"
    return job


async def test_export_job_pending_twice_then_done_with_ndjson(client: Client) -> None:
    job = await start_export(client, resource="contacts", format="ndjson")
    path = f"/v2/exports/{job['id']}"
    resp = await client.get(f"{path}/result", headers=AUTH)
    assert resp.status == 409
    statuses = [(await get_json(client, path))["status"] for _ in range(4)]
    assert statuses == ["pending", "pending", "done", "done"]
    done = await get_json(client, path)
    assert done["result_url"] == f"{path}/result"
    assert done["error"] is None
    resp = await client.get(done["result_url"], headers=AUTH)
    assert resp.status == 200
    assert resp.content_type == "application/x-ndjson"
    rows = [json.loads(line) for line in (await resp.text()).splitlines()]
    assert len(rows) == 250
    assert set(rows[0]) == {"id", "email", "status", "updated_at"}


async def test_export_job_csv_of_orders(client: Client) -> None:
    job = await start_export(client, resource="orders", format="csv")
    for _ in range(3):
        body = await get_json(client, f"/v2/exports/{job['id']}")
    assert body["status"] == "done"
    resp = await client.get(body["result_url"], headers=AUTH)
    assert resp.content_type == "text/csv"
    rows = list(csv.DictReader(io.StringIO(await resp.text())))
    assert len(rows) == 57
    assert float(rows[0]["total"]) > 0


async def test_export_job_can_fail_and_bad_requests_are_422(client: Client) -> None:
    job = await start_export(client, fail=True)
    statuses = [(await get_json(client, f"/v2/exports/{job['id']}"))["status"] for _ in range(3)]
    assert statuses == ["pending", "pending", "failed"]
    failed = await get_json(client, f"/v2/exports/{job['id']}")
    assert failed["error"]
    assert failed["result_url"] is None
    for bad in ({"resource": "planets"}, {"format": "xlsx"}):
        resp = await client.post("/v2/exports", json=bad, headers=AUTH)
        assert resp.status == 422
    resp = await client.get("/v2/exports/exp_9999", headers=AUTH)
    assert resp.status == 404


async def test_latency_option_delays_responses() -> None:
    async with TestClient(TestServer(create_app(latency_ms=60))) as slow:
        started = time.monotonic()
        resp = await slow.get("/health")
        assert resp.status == 200
        assert time.monotonic() - started >= 0.05


# --- the command line ---------------------------------------------------------------------


async def test_module_prints_url_serves_and_stops_on_sigterm() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "runner.demo_api",
        "--port",
        "0",
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), timeout=10)
        url = line.decode().strip()
        assert url.startswith("http://127.0.0.1:")
        assert int(url.rsplit(":", 1)[1]) > 0
        async with aiohttp.ClientSession() as session, session.get(f"{url}/health") as resp:
            assert resp.status == 200
            assert await resp.json() == {"status": "ok"}
        proc.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.wait_for(proc.communicate(), timeout=10)
        assert proc.returncode == 0, stderr.decode()
        assert stderr == b""
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def test_module_reports_a_port_in_use(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["--port", str(port)]) == 1
    assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err
