"""A small in-memory HTTP API that the example flows in `flows/` run against.

Run it with `python -m runner.demo_api --host 127.0.0.1 --port 8787` (port 0 picks a free
port); the first line on stdout is the bound URL, e.g. `http://127.0.0.1:8787`. SIGTERM or
SIGINT stops it cleanly (exit 0). Data is generated from a fixed seed and lives in one app
instance: every start gives the same contacts, orders and so on, and a fresh set of customers.

Auth: everything under `/v2` needs `Authorization: Bearer <token>`, where the token is
`demo-token`, or one issued by `POST /oauth/token` or `POST /login`. A missing or unknown
token gives 401 `{"errors": ["unauthorized"]}` with `WWW-Authenticate: Bearer`.
Errors are JSON `{"errors": ["..."]}` (400 bad parameter, 404 unknown id or path, ...).

    GET    /health                    200 {"status": "ok"}, no auth
    POST   /oauth/token               client_credentials: form grant_type=client_credentials,
                                      client_id=demo, client_secret=demo-secret (in the form
                                      or as HTTP Basic) -> {"access_token", "token_type":
                                      "Bearer", "expires_in": 3600}; 401 invalid_client,
                                      400 unsupported_grant_type
    POST   /login                     JSON {"username": "demo", "password": "demo-password"}
                                      -> {"token": "..."}; 401 on bad credentials
    GET    /v2/me                     who the token belongs to: {"subject", "auth"}, where auth
                                      is "static", "oauth2" or "login"
    GET    /v2/contacts               ?updated_since=ISO&limit=1..100 (50)&cursor=: 250
                                      contacts {id, name, emails: [{value}], company: {id},
                                      status (active | lead | deleted), updated_at}, oldest
                                      first, updated_at strictly after updated_since;
                                      {"data": [...], "meta": {"next": "<opaque>" | null}}
    GET    /v2/companies/{id}         {id, name, domain, industry, employees, country}; ids
                                      1..30, but 7, 19 and 23 are 404 (deleted companies)
    GET    /v2/orders                 ?page=1..&per_page=1..100 (20): 57 orders {id, number,
                                      customer_id, status, currency, total, created_at, lines};
                                      {"data", "page", "per_page", "total_pages", "total"}
    GET    /v2/events                 ?offset=0..&limit=1..100 (50): 130 events;
                                      {"data", "offset", "limit", "total"}
    GET    /v2/tickets                ?page=1..&per_page=1..100 (25): 60 tickets, the body
                                      a bare JSON list; `Link` header with absolute URLs for
                                      rel="next" (absent on the last page), "prev", "first",
                                      "last"
    POST   /v2/customers              JSON {email, name?, plan? (free | pro | enterprise),
                                      ref?} -> 201 + Location + the customer; 409
                                      {"errors", "existing_id"} when the email (any case)
                                      exists; 422 {"errors": ["email is required"]} etc.
    GET    /v2/customers/{id}         the customer {id, email, name, plan, ref, created_at,
                                      updated_at}; three exist at start (ada@example.com is
                                      cus_0001)
    PUT    /v2/customers/{id}         replaces the fields (email required); 404, 409, 422
    PATCH  /v2/customers/{id}         changes only the given fields; 404, 409, 422
    DELETE /v2/customers/{id}         204; 404
    POST   /v2/exports                JSON {resource: contacts | orders, format: ndjson | csv,
                                      fail: false} -> 202 {id, status: "pending", ...} +
                                      Location; 422 on a bad resource or format
    GET    /v2/exports/{id}           "pending" for the first two polls, then "done" with
                                      result_url "/v2/exports/{id}/result" (or "failed" with
                                      an error when created with fail: true)
    GET    /v2/exports/{id}/result    the rows as NDJSON (application/x-ndjson) or CSV
                                      (text/csv); 409 before the export is done
    GET    /v2/catalog.xml            application/xml: a namespaced catalogue of products with
                                      attributes and repeated <tag> elements; one product has
                                      a single <tag> (what `force_list` is for)
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import csv
import hmac
import io
import json
import os
import random
import signal
import sys
from bisect import bisect_right
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from aiohttp import web

STATIC_TOKEN = "demo-token"
CLIENT_ID = "demo"
CLIENT_SECRET = "demo-secret"
LOGIN_USERNAME = "demo"
LOGIN_PASSWORD = "demo-password"
TOKEN_LIFETIME_S = 3600

SEED = 20240101
CONTACT_COUNT = 250
COMPANY_COUNT = 30
MISSING_COMPANIES = frozenset({7, 19, 23})
ORDER_COUNT = 57
EVENT_COUNT = 130
TICKET_COUNT = 60
EXPORT_PENDING_POLLS = 2
PLANS = ("free", "pro", "enterprise")

_EPOCH = datetime(2024, 1, 1, tzinfo=UTC)
_FIRST_NAMES = ("Ada", "Alan", "Grace", "Edsger", "Barbara", "Donald", "Frances", "Ken", "Radia")
_LAST_NAMES = ("Lovelace", "Turing", "Hopper", "Dijkstra", "Liskov", "Knuth", "Allen", "Perlman")
_INDUSTRIES = ("software", "retail", "logistics", "health", "finance", "energy")
_COUNTRIES = ("DE", "FR", "NL", "US", "GB", "ES")
_CATALOG_NS = "urn:example:catalog"
_PRICING_NS = "urn:example:pricing"

Json = dict[str, Any]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True, slots=True)
class DemoConfig:
    """How the demo behaves beyond its data."""

    latency_ms: float = 0.0

    def __post_init__(self) -> None:
        if self.latency_ms < 0:
            raise ValueError("latency_ms must be >= 0")


@dataclass(slots=True)
class _Export:
    """An export job of the demo API, done after a few polls."""

    id: str
    resource: str
    format: str
    fail: bool
    created_at: str
    polls: int = 0

    @property
    def status(self) -> str:
        if self.polls <= EXPORT_PENDING_POLLS:
            return "pending"
        return "failed" if self.fail else "done"

    def as_json(self) -> Json:
        status = self.status
        return {
            "id": self.id,
            "status": status,
            "resource": self.resource,
            "format": self.format,
            "created_at": self.created_at,
            "result_url": f"/v2/exports/{self.id}/result" if status == "done" else None,
            "error": "the export ran out of disk space" if status == "failed" else None,
        }


@dataclass(slots=True)
class _DemoState:
    """One app's data: the read-only lists are generated once, customers and jobs change."""

    config: DemoConfig
    contacts: list[Json]
    contact_times: list[datetime]  # parallel to contacts, ascending, for bisect
    companies: dict[int, Json]
    orders: list[Json]
    events: list[Json]
    tickets: list[Json]
    catalog_xml: str
    customers: dict[str, Json] = field(default_factory=dict)
    exports: dict[str, _Export] = field(default_factory=dict)
    tokens: dict[str, tuple[str, str]] = field(default_factory=dict)  # token -> (subject, kind)
    next_customer: int = 1
    next_export: int = 1


_STATE = web.AppKey("demo_state", _DemoState)


class _ClientError(Exception):
    """A request the demo refuses: becomes a JSON error response in the middleware."""

    def __init__(self, status: int, message: str | list[str], **extra: Any) -> None:
        messages = [message] if isinstance(message, str) else message
        super().__init__(messages[0])
        self.status = status
        self.body: Json = {"errors": messages, **extra}


# --- data ---------------------------------------------------------------------------------


def _iso(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def _now() -> str:
    return _iso(datetime.now(UTC))


def _person(rng: random.Random) -> tuple[str, str]:
    return rng.choice(_FIRST_NAMES), rng.choice(_LAST_NAMES)


def _make_contacts(rng: random.Random) -> tuple[list[Json], list[datetime]]:
    contacts: list[Json] = []
    times: list[datetime] = []
    moment = _EPOCH
    for number in range(1, CONTACT_COUNT + 1):
        # Strictly increasing times keep "updated_since" and the cursor unambiguous.
        moment += timedelta(seconds=rng.randint(600, 40_000))
        first, last = _person(rng)
        local = f"{first}.{last}{number}".lower()
        emails = [{"value": f"{local}@example.com"}]
        if rng.random() < 0.25:
            emails.append({"value": f"{local}@mail.example.org"})
        roll = rng.random()
        status = "deleted" if roll < 0.08 else "lead" if roll < 0.3 else "active"
        contacts.append(
            {
                "id": number,
                "name": f"{first} {last}",
                "emails": emails,
                "company": {"id": rng.randint(1, COMPANY_COUNT)},
                "status": status,
                "updated_at": _iso(moment),
            }
        )
        times.append(moment)
    return contacts, times


def _make_companies(rng: random.Random) -> dict[int, Json]:
    companies: dict[int, Json] = {}
    for number in range(1, COMPANY_COUNT + 1):
        name = f"{rng.choice(_LAST_NAMES)} {rng.choice(('Labs', 'GmbH', 'Systems', 'Group'))}"
        company = {
            "id": number,
            "name": name,
            "domain": f"{name.split()[0].lower()}{number}.example.com",
            "industry": rng.choice(_INDUSTRIES),
            "employees": rng.randint(5, 5000),
            "country": rng.choice(_COUNTRIES),
        }
        if number not in MISSING_COMPANIES:
            companies[number] = company
    return companies


def _make_orders(rng: random.Random) -> list[Json]:
    orders: list[Json] = []
    for number in range(1, ORDER_COUNT + 1):
        lines: list[Json] = [
            {
                "sku": f"SKU-{rng.randint(100, 999)}",
                "quantity": rng.randint(1, 5),
                "unit_price": round(rng.uniform(2, 250), 2),
            }
            for _ in range(rng.randint(1, 4))
        ]
        total = round(sum(line["quantity"] * line["unit_price"] for line in lines), 2)
        orders.append(
            {
                "id": 1000 + number,
                "number": f"SO-{1000 + number}",
                "customer_id": rng.randint(1, CONTACT_COUNT),
                "status": rng.choice(("paid", "paid", "shipped", "refunded")),
                "currency": rng.choice(("EUR", "USD")),
                "total": total,
                "created_at": _iso(_EPOCH + timedelta(hours=number * 7)),
                "lines": lines,
            }
        )
    return orders


def _make_events(rng: random.Random) -> list[Json]:
    kinds = ("contact.created", "contact.updated", "order.paid", "order.refunded")
    return [
        {
            "id": f"evt_{number:04d}",
            "type": rng.choice(kinds),
            "subject_id": rng.randint(1, CONTACT_COUNT),
            "occurred_at": _iso(_EPOCH + timedelta(minutes=number * 37)),
        }
        for number in range(1, EVENT_COUNT + 1)
    ]


def _make_tickets(rng: random.Random) -> list[Json]:
    topics = ("Login fails", "Invoice missing", "Export is slow", "Wrong VAT", "API 500s")
    return [
        {
            "id": number,
            "subject": f"{rng.choice(topics)} (#{number})",
            "priority": rng.choice(("low", "normal", "high")),
            "status": rng.choice(("open", "pending", "closed")),
            "created_at": _iso(_EPOCH + timedelta(hours=number * 5)),
        }
        for number in range(1, TICKET_COUNT + 1)
    ]


def _make_catalog_xml() -> str:
    # (sku, available, name, price, currency, tags): "LAMP-1" has one tag, so without
    # force_list its `tag` would be a string where the others have a list.
    products = (
        ("TENT-2", "true", "Two-person tent", "189.00", "EUR", ("outdoor", "camping")),
        ("LAMP-1", "true", "Head lamp & strap", "24.50", "EUR", ("outdoor",)),
        ("STOVE-3", "false", "Gas stove <compact>", "59.90", "USD", ("camping", "cooking")),
        ("MAT-4", "true", "Sleeping mat", "39.00", "EUR", ("camping", "sleep", "light")),
    )
    lines = [
        '<?xml version="1.0" encoding="UTF-8"?>',
        f'<cat:catalog xmlns:cat="{_CATALOG_NS}" xmlns:p="{_PRICING_NS}" '
        'generated="2024-06-01T00:00:00Z">',
    ]
    for sku, available, name, price, currency, tags in products:
        escaped = name.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
        lines.append(f'  <cat:product sku="{sku}" available="{available}">')
        lines.append(f"    <cat:name>{escaped}</cat:name>")
        lines.append(f'    <p:price currency="{currency}">{price}</p:price>')
        lines.extend(f"    <cat:tag>{tag}</cat:tag>" for tag in tags)
        lines.append("  </cat:product>")
    lines.append("</cat:catalog>")
    return "\n".join(lines) + "\n"


def _new_state(config: DemoConfig) -> _DemoState:
    rng = random.Random(SEED)
    contacts, times = _make_contacts(rng)
    state = _DemoState(
        config=config,
        contacts=contacts,
        contact_times=times,
        companies=_make_companies(rng),
        orders=_make_orders(rng),
        events=_make_events(rng),
        tickets=_make_tickets(rng),
        catalog_xml=_make_catalog_xml(),
        tokens={STATIC_TOKEN: ("demo", "static")},
    )
    for email, name, plan in (
        ("ada@example.com", "Ada Lovelace", "pro"),
        ("linus@example.com", "Linus Torvalds", "free"),
        ("margaret@example.com", "Margaret Hamilton", "enterprise"),
    ):
        _insert_customer(state, {"email": email, "name": name, "plan": plan, "ref": None})
    return state


# --- helpers ------------------------------------------------------------------------------


def _state(request: web.Request) -> _DemoState:
    return request.app[_STATE]


def _int_param(request: web.Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        value = low - 1
    if not low <= value <= high:
        raise _ClientError(400, f"{name} must be an integer from {low} to {high}")
    return value


async def _json_object(request: web.Request) -> Json:
    try:
        body = await request.json()
    except ValueError as exc:
        raise _ClientError(400, "the body must be JSON") from exc
    if not isinstance(body, dict):
        raise _ClientError(400, "the body must be a JSON object")
    return body


def _issue_token(state: _DemoState, subject: str, kind: str) -> str:
    token = base64.urlsafe_b64encode(os.urandom(24)).decode()
    state.tokens[token] = (subject, kind)
    return token


# --- middleware ---------------------------------------------------------------------------


@web.middleware
async def _middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    state = _state(request)
    if state.config.latency_ms:
        await asyncio.sleep(state.config.latency_ms / 1000)
    try:
        if request.path.startswith("/v2/"):
            scheme, _, token = request.headers.get("Authorization", "").partition(" ")
            if scheme.lower() != "bearer" or token.strip() not in state.tokens:
                return web.json_response(
                    {"errors": ["unauthorized"]},
                    status=401,
                    headers={"WWW-Authenticate": 'Bearer realm="demo"'},
                )
        return await handler(request)
    except _ClientError as exc:
        return web.json_response(exc.body, status=exc.status)
    except web.HTTPException as exc:
        # The router's own 404 and 405 come as text; every error of the demo is JSON.
        if exc.status < 400:
            raise
        kept = {name: exc.headers[name] for name in ("Allow",) if name in exc.headers}
        return web.json_response({"errors": [exc.reason]}, status=exc.status, headers=kept)


# --- auth ---------------------------------------------------------------------------------


async def _health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def _oauth_token(request: web.Request) -> web.Response:
    form = await request.post()
    client_id = str(form.get("client_id", ""))
    client_secret = str(form.get("client_secret", ""))
    scheme, _, credentials = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() == "basic":
        try:
            decoded = base64.b64decode(credentials.strip(), validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            decoded = ""
        client_id, _, client_secret = decoded.partition(":")
    if form.get("grant_type") != "client_credentials":
        return web.json_response({"error": "unsupported_grant_type"}, status=400)
    if client_id != CLIENT_ID or not hmac.compare_digest(
        client_secret.encode(), CLIENT_SECRET.encode()
    ):
        return web.json_response({"error": "invalid_client"}, status=401)
    token = _issue_token(_state(request), client_id, "oauth2")
    body: Json = {"access_token": token, "token_type": "Bearer", "expires_in": TOKEN_LIFETIME_S}
    if form.get("scope"):
        body["scope"] = str(form["scope"])
    return web.json_response(body, headers={"Cache-Control": "no-store"})


async def _login(request: web.Request) -> web.Response:
    body = await _json_object(request)
    username, password = body.get("username"), body.get("password")
    if (
        username != LOGIN_USERNAME
        or not isinstance(password, str)
        or not hmac.compare_digest(password.encode(), LOGIN_PASSWORD.encode())
    ):
        raise _ClientError(401, "invalid username or password")
    return web.json_response({"token": _issue_token(_state(request), username, "login")})


async def _me(request: web.Request) -> web.Response:
    token = request.headers["Authorization"].partition(" ")[2].strip()
    subject, kind = _state(request).tokens[token]
    return web.json_response({"subject": subject, "auth": kind})


# --- read-only lists ----------------------------------------------------------------------


def _encode_cursor(index: int) -> str:
    return base64.urlsafe_b64encode(f"contacts:{index}".encode()).decode().rstrip("=")


def _decode_cursor(cursor: str) -> int:
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        prefix, _, index = text.partition(":")
        if prefix == "contacts" and index.isdigit():
            return int(index)
    except (binascii.Error, UnicodeDecodeError):
        pass
    raise _ClientError(400, "cursor is invalid")


async def _contacts(request: web.Request) -> web.Response:
    state = _state(request)
    limit = _int_param(request, "limit", 50, 1, 100)
    start = 0
    since = request.query.get("updated_since")
    if since:
        try:
            moment = datetime.fromisoformat(since)
        except ValueError as exc:
            raise _ClientError(400, "updated_since must be an ISO 8601 date-time") from exc
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        start = bisect_right(state.contact_times, moment)
    cursor = request.query.get("cursor")
    if cursor:
        start = max(start, _decode_cursor(cursor))
    end = start + limit
    page = state.contacts[start:end]
    next_cursor = _encode_cursor(end) if end < len(state.contacts) else None
    return web.json_response({"data": page, "meta": {"next": next_cursor}})


async def _company(request: web.Request) -> web.Response:
    raw = request.match_info["id"]
    company = _state(request).companies.get(int(raw)) if raw.isdigit() else None
    if company is None:
        raise _ClientError(404, f"company {raw} not found")
    return web.json_response(company)


async def _orders(request: web.Request) -> web.Response:
    orders = _state(request).orders
    page = _int_param(request, "page", 1, 1, 1_000_000)
    per_page = _int_param(request, "per_page", 20, 1, 100)
    total_pages = -(-len(orders) // per_page)
    data = orders[(page - 1) * per_page : page * per_page]
    return web.json_response(
        {
            "data": data,
            "page": page,
            "per_page": per_page,
            "total_pages": total_pages,
            "total": len(orders),
        }
    )


async def _events(request: web.Request) -> web.Response:
    events = _state(request).events
    offset = _int_param(request, "offset", 0, 0, 1_000_000)
    limit = _int_param(request, "limit", 50, 1, 100)
    return web.json_response(
        {
            "data": events[offset : offset + limit],
            "offset": offset,
            "limit": limit,
            "total": len(events),
        }
    )


async def _tickets(request: web.Request) -> web.Response:
    tickets = _state(request).tickets
    page = _int_param(request, "page", 1, 1, 1_000_000)
    per_page = _int_param(request, "per_page", 25, 1, 100)
    last = max(1, -(-len(tickets) // per_page))

    def link(number: int, rel: str) -> str:
        url = request.url.with_query(page=number, per_page=per_page)
        return f'<{url}>; rel="{rel}"'

    links = [link(1, "first"), link(last, "last")]
    if page < last:
        links.insert(0, link(page + 1, "next"))
    if 1 < page <= last + 1:
        links.insert(0, link(page - 1, "prev"))
    data = tickets[(page - 1) * per_page : page * per_page]
    return web.json_response(data, headers={"Link": ", ".join(links)})


async def _catalog(request: web.Request) -> web.Response:
    return web.Response(text=_state(request).catalog_xml, content_type="application/xml")


# --- customers ----------------------------------------------------------------------------


def _find_email(state: _DemoState, email: str, ignore_id: str | None = None) -> str | None:
    wanted = email.casefold()
    for customer_id, customer in state.customers.items():
        if customer_id != ignore_id and customer["email"].casefold() == wanted:
            return customer_id
    return None


def _checked_fields(body: Json, *, partial: bool) -> Json:
    """The customer fields of a request body; raises 422 with every problem found."""
    errors: list[str] = []
    fields: Json = {}
    if "email" in body or not partial:
        email = body.get("email")
        if email is None or email == "":
            errors.append("email is required")
        elif not isinstance(email, str) or "@" not in email.strip("@"):
            errors.append("email is invalid")
        else:
            fields["email"] = email
    for name in ("name", "ref"):
        if name in body:
            if body[name] is not None and not isinstance(body[name], str):
                errors.append(f"{name} must be a string")
            fields[name] = body[name]
    if "plan" in body:
        if body["plan"] not in PLANS:
            errors.append(f"plan must be one of {', '.join(PLANS)}")
        fields["plan"] = body["plan"]
    if errors:
        raise _ClientError(422, errors)
    return fields


def _insert_customer(state: _DemoState, fields: Json) -> Json:
    customer_id = f"cus_{state.next_customer:04d}"
    state.next_customer += 1
    now = _now()
    customer = {
        "id": customer_id,
        "email": fields["email"],
        "name": fields.get("name"),
        "plan": fields.get("plan") or "free",
        "ref": fields.get("ref"),
        "created_at": now,
        "updated_at": now,
    }
    state.customers[customer_id] = customer
    return customer


def _customer(request: web.Request) -> Json:
    customer_id = request.match_info["id"]
    customer = _state(request).customers.get(customer_id)
    if customer is None:
        raise _ClientError(404, f"customer {customer_id} not found")
    return customer


def _check_conflict(state: _DemoState, fields: Json, ignore_id: str | None = None) -> None:
    if "email" in fields:
        existing = _find_email(state, fields["email"], ignore_id)
        if existing is not None:
            raise _ClientError(
                409, f"a customer with email {fields['email']} exists", existing_id=existing
            )


async def _create_customer(request: web.Request) -> web.Response:
    state = _state(request)
    fields = _checked_fields(await _json_object(request), partial=False)
    _check_conflict(state, fields)
    customer = _insert_customer(state, fields)
    return web.json_response(
        customer, status=201, headers={"Location": f"/v2/customers/{customer['id']}"}
    )


async def _get_customer(request: web.Request) -> web.Response:
    return web.json_response(_customer(request))


async def _update_customer(request: web.Request) -> web.Response:
    state = _state(request)
    customer = _customer(request)
    partial = request.method == "PATCH"
    fields = _checked_fields(await _json_object(request), partial=partial)
    _check_conflict(state, fields, ignore_id=customer["id"])
    if not partial:
        # PUT replaces: a field left out goes back to its default.
        fields = {"name": None, "plan": "free", "ref": None, **fields}
    customer.update(fields)
    customer["updated_at"] = _now()
    return web.json_response(customer)


async def _delete_customer(request: web.Request) -> web.Response:
    customer = _customer(request)
    del _state(request).customers[customer["id"]]
    return web.Response(status=204)


# --- async exports ------------------------------------------------------------------------


async def _create_export(request: web.Request) -> web.Response:
    state = _state(request)
    body = await _json_object(request) if request.can_read_body else {}
    resource = body.get("resource", "contacts")
    fmt = body.get("format", "ndjson")
    if resource not in ("contacts", "orders"):
        raise _ClientError(422, "resource must be contacts or orders")
    if fmt not in ("ndjson", "csv"):
        raise _ClientError(422, "format must be ndjson or csv")
    export = _Export(
        id=f"exp_{state.next_export:04d}",
        resource=resource,
        format=fmt,
        fail=body.get("fail") is True,
        created_at=_now(),
    )
    state.next_export += 1
    state.exports[export.id] = export
    return web.json_response(
        export.as_json(), status=202, headers={"Location": f"/v2/exports/{export.id}"}
    )


def _export(request: web.Request) -> _Export:
    export_id = request.match_info["id"]
    export = _state(request).exports.get(export_id)
    if export is None:
        raise _ClientError(404, f"export {export_id} not found")
    return export


async def _get_export(request: web.Request) -> web.Response:
    export = _export(request)
    export.polls += 1
    return web.json_response(export.as_json())


def _export_rows(state: _DemoState, resource: str) -> list[Json]:
    if resource == "orders":
        keys = ("id", "customer_id", "status", "currency", "total", "created_at")
        return [{key: order[key] for key in keys} for order in state.orders]
    return [
        {
            "id": contact["id"],
            "email": contact["emails"][0]["value"],
            "status": contact["status"],
            "updated_at": contact["updated_at"],
        }
        for contact in state.contacts
    ]


async def _export_result(request: web.Request) -> web.Response:
    export = _export(request)
    if export.status != "done":
        raise _ClientError(409, f"export {export.id} is {export.status}, not done")
    rows = _export_rows(_state(request), export.resource)
    if export.format == "csv":
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        return web.Response(text=out.getvalue(), content_type="text/csv")
    text = "".join(json.dumps(row, separators=(",", ":")) + "\n" for row in rows)
    return web.Response(text=text, content_type="application/x-ndjson")


# --- app and command line -----------------------------------------------------------------


def create_app(*, latency_ms: float = 0.0) -> web.Application:
    """A fresh demo app: its own generated data, customers and jobs."""
    app = web.Application(middlewares=[_middleware])
    app[_STATE] = _new_state(DemoConfig(latency_ms=latency_ms))
    app.router.add_get("/health", _health)
    app.router.add_post("/oauth/token", _oauth_token)
    app.router.add_post("/login", _login)
    app.router.add_get("/v2/me", _me)
    app.router.add_get("/v2/contacts", _contacts)
    app.router.add_get("/v2/companies/{id}", _company)
    app.router.add_get("/v2/orders", _orders)
    app.router.add_get("/v2/events", _events)
    app.router.add_get("/v2/tickets", _tickets)
    app.router.add_get("/v2/catalog.xml", _catalog)
    app.router.add_post("/v2/customers", _create_customer)
    app.router.add_get("/v2/customers/{id}", _get_customer)
    app.router.add_put("/v2/customers/{id}", _update_customer)
    app.router.add_patch("/v2/customers/{id}", _update_customer)
    app.router.add_delete("/v2/customers/{id}", _delete_customer)
    app.router.add_post("/v2/exports", _create_export)
    app.router.add_get("/v2/exports/{id}", _get_export)
    app.router.add_get("/v2/exports/{id}/result", _export_result)
    return app


async def _serve(host: str, port: int, latency_ms: float) -> None:
    app_runner = web.AppRunner(
        create_app(latency_ms=latency_ms), access_log=None, shutdown_timeout=2.0
    )
    await app_runner.setup()
    try:
        await web.TCPSite(app_runner, host, port).start()
        bound_port = app_runner.addresses[0][1]
        shown = f"[{host}]" if ":" in host else host
        print(f"http://{shown}:{bound_port}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        await stop.wait()
    finally:
        await app_runner.cleanup()


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m runner.demo_api`: serve the demo until SIGTERM or SIGINT; returns 0."""
    parser = argparse.ArgumentParser(prog="python -m runner.demo_api", description=__doc__)
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8787, help="0 picks a free port")
    parser.add_argument("--latency-ms", type=float, default=0.0, help="delay every response")
    args = parser.parse_args(argv)
    if args.latency_ms < 0:
        parser.error("--latency-ms must be >= 0")
    try:
        asyncio.run(_serve(args.host, args.port, args.latency_ms))
    except OSError as exc:
        print(f"demo_api: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
