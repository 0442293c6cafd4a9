"""The ported connectors under examples/connectors/, each run end to end by the real CLI
against a small fake of its API (aiohttp), twice where it is incremental."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path
from typing import Any

from aiohttp import web

from tests.conftest import ROOT, Cli, Serve, app_with, read_jsonl, run_cli

EXAMPLES = ROOT / "examples" / "connectors"


def run_example(
    name: str, tmp_path: Path, env: dict[str, str], *args: str, out: str = "out"
) -> Any:
    return run_cli(
        "run",
        str(EXAMPLES / name),
        "--state",
        "state.json",
        "--output-dir",
        out,
        *args,
        cwd=tmp_path,
        env=env,
    )


def state_of(tmp_path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((tmp_path / "state.json").read_text())
    return data


def test_the_examples_validate(cli: Cli) -> None:
    result = cli("validate", str(EXAMPLES))
    assert result.code == 0, result.stderr


# --- Harvest (Airbyte: substreams, AddFields, inclusive updated_since) -------------------------


def harvest_app(
    data: dict[str, list[dict[str, Any]]], seen: list[dict[str, Any]]
) -> web.Application:
    def check(request: web.Request) -> web.Response | None:
        seen.append(
            {
                "path": request.path,
                "query": dict(request.query),
                "account": request.headers.get("Harvest-Account-Id"),
                "auth": request.headers.get("Authorization"),
            }
        )
        if request.headers.get("Authorization") != "Bearer hv-token":
            return web.json_response({"error": "invalid_token"}, status=401)
        return None

    def page(request: web.Request, key: str, rows: list[dict[str, Any]]) -> web.Response:
        since = request.query.get("updated_since")
        if since is not None:
            rows = [r for r in rows if r["updated_at"] >= since]  # inclusive, as Harvest is
        number = int(request.query.get("page", "1"))
        size = int(request.query.get("per_page", "50"))
        size = min(size, 2)  # small pages, so that links.next is followed
        chunk = rows[(number - 1) * size : number * size]
        more = number * size < len(rows)
        base = str(request.url.with_query({}))
        query = {k: v for k, v in request.query.items() if k != "page"}
        next_url = str(
            request.url.with_path(request.path).with_query({**query, "page": str(number + 1)})
        )
        return web.json_response(
            {key: chunk, "links": {"next": next_url if more else None, "first": base}}
        )

    async def listing(request: web.Request) -> web.Response:
        denied = check(request)
        if denied is not None:
            return denied
        key = request.path.rsplit("/", 1)[-1]
        return page(request, key, data[key])

    async def nested(request: web.Request) -> web.Response:
        denied = check(request)
        if denied is not None:
            return denied
        parent = int(request.match_info["id"])
        kind = request.match_info["kind"]
        if kind == "project_assignments" and parent == 3:
            return web.json_response({"message": "Not found"}, status=404)
        key = "invoice_messages" if kind == "messages" else kind
        rows = [r for r in data[key] if r["parent"] == parent]
        return page(request, key, [{k: v for k, v in r.items() if k != "parent"} for r in rows])

    return app_with(
        ("GET", "/v2/clients", listing),
        ("GET", "/v2/users", listing),
        ("GET", "/v2/invoices", listing),
        ("GET", "/v2/users/{id}/{kind}", nested),
        ("GET", "/v2/invoices/{id}/{kind}", nested),
    )


def test_harvest(serve: Serve, tmp_path: Path) -> None:
    t1, t2, t3 = "2024-01-01T00:00:00Z", "2024-02-01T00:00:00Z", "2024-03-01T00:00:00Z"
    data: dict[str, list[dict[str, Any]]] = {
        "clients": [
            {"id": 1, "name": "Acme", "updated_at": t1, "is_active": True},
            {"id": 2, "name": "Globex", "updated_at": t2, "is_active": True},
            {"id": 3, "name": "Initech", "updated_at": t2, "is_active": False},
        ],
        "users": [
            {"id": 1, "first_name": "Ann"},
            {"id": 2, "first_name": "Bob"},
            {"id": 3, "first_name": "Cy"},
        ],
        "project_assignments": [
            {"parent": 1, "id": 11, "project": {"id": 7, "name": "Web"}, "updated_at": t1},
            {"parent": 1, "id": 12, "project": {"id": 8, "name": "App"}, "updated_at": t2},
            {"parent": 2, "id": 21, "project": {"id": 7, "name": "Web"}, "updated_at": t2},
        ],
        "invoices": [
            {"id": 100, "number": "1000", "updated_at": t1, "line_items": [{"amount": 5}]},
            {"id": 101, "number": "1001", "updated_at": t2, "line_items": []},
        ],
        "invoice_messages": [
            {"parent": 100, "id": 900, "subject": "Invoice 1000", "updated_at": t1},
            {"parent": 101, "id": 901, "subject": "Invoice 1001", "updated_at": t2},
            {"parent": 101, "id": 902, "subject": "Reminder", "updated_at": t2},
        ],
    }
    seen: list[dict[str, Any]] = []
    server = serve(harvest_app(data, seen))
    env = {"HARVEST_API_URL": server.url + "/v2", "HARVEST_TOKEN": "hv-token"}
    first = run_example("harvest.yaml", tmp_path, env, "--input", "account_id=4242")
    assert first.code == 0, first.stderr
    out = tmp_path / "out"
    assert [r["id"] for r in read_jsonl(out / "clients.jsonl")] == [1, 2, 3]
    assignments = read_jsonl(out / "project_assignments.jsonl")
    # The whole record, and the parent's id (AddFields); user 3's 404 skipped.
    assert assignments[0] == {
        "id": 11,
        "project": {"id": 7, "name": "Web"},
        "updated_at": t1,
        "parent_id": 1,
    }
    assert [(r["id"], r["parent_id"]) for r in assignments] == [(11, 1), (12, 1), (21, 2)]
    assert read_jsonl(out / "invoices.jsonl") == [
        {"id": 100, "number": "1000", "updated_at": t1},
        {"id": 101, "number": "1001", "updated_at": t2},
    ]
    assert [(r["id"], r["parent_id"]) for r in read_jsonl(out / "invoice_messages.jsonl")] == [
        (900, 100),
        (901, 101),
        (902, 101),
    ]
    assert {r["account"] for r in seen} == {"4242"}
    # The first request starts from cursor.start; the pages were followed through links.next.
    clients = [r["query"] for r in seen if r["path"] == "/v2/clients"]
    assert clients[0] == {"per_page": "50", "updated_since": "2021-01-01T00:00:00Z"}
    assert len(clients) == 2
    assert state_of(tmp_path)["streams"]["clients"] == {"cursor": t2, "seen": [[2], [3]]}

    # Second run: one client changed after the cursor; the two at the cursor come again
    # (inclusive updated_since) and are dropped.
    data["clients"].append({"id": 4, "name": "Umbrella", "updated_at": t3, "is_active": True})
    second = run_example("harvest.yaml", tmp_path, env, "--input", "account_id=4242", out="out2")
    assert second.code == 0, second.stderr
    assert [r["id"] for r in read_jsonl(tmp_path / "out2" / "clients.jsonl")] == [4]
    assert state_of(tmp_path)["streams"]["clients"] == {"cursor": t3, "seen": [[4]]}


# --- The New York Times (Airbyte: monthly date windows, a list partition) ----------------------


def nytimes_app(requests: list[str]) -> web.Application:
    async def archive(request: web.Request) -> web.Response:
        if request.query.get("api-key") != "nyt-key":
            return web.json_response({"fault": "invalid key"}, status=401)
        year, month = int(request.match_info["year"]), int(request.match_info["month"])
        requests.append(f"{year}/{month}")
        docs = [
            {
                "_id": f"nyt://article/{year}-{month}-{n}",
                "web_url": f"https://www.nytimes.com/{year}/{month:02d}/{n}.html",
                "headline": {"main": f"Story {n} of {year}-{month:02d}"},
                "section_name": "World",
                "pub_date": f"{year}-{month:02d}-{10 + n:02d}T05:00:00+0000",
                "word_count": 800 + n,
            }
            for n in range(2)
        ]
        return web.json_response({"status": "OK", "response": {"docs": docs, "meta": {"hits": 2}}})

    async def viewed(request: web.Request) -> web.Response:
        period = request.match_info["period"]
        requests.append(f"viewed/{period}")
        results = [
            {"id": int(period) * 10 + n, "url": "u", "title": f"t{n}", "section": "Arts"}
            for n in range(2)
        ]
        return web.json_response({"status": "OK", "num_results": 2, "results": results})

    return app_with(
        ("GET", "/svc/archive/v1/{year}/{month}.json", archive),
        ("GET", "/svc/mostpopular/v2/viewed/{period}.json", viewed),
    )


def test_nytimes(serve: Serve, tmp_path: Path) -> None:
    requests: list[str] = []
    server = serve(nytimes_app(requests))
    env = {"NYTIMES_API_URL": server.url + "/svc", "NYTIMES_API_KEY": "nyt-key"}
    # The fake has no rate limit: a --services file lifts the flow's 5 requests a minute.
    (tmp_path / "services.yaml").write_text("nyt: {rate_limit: {requests: 100, per_seconds: 1}}\n")
    services = ("--services", "services.yaml")
    args = ("--input", "start_date=2023-11-20", "--input", "end_date=2024-02-10", *services)
    first = run_example("nytimes.yaml", tmp_path, env, *args)
    assert first.code == 0, first.stderr
    # One request per month, from the start date's month to the end date's.
    assert [r for r in requests if "/" in r and not r.startswith("viewed")] == [
        "2023/11",
        "2023/12",
        "2024/1",
        "2024/2",
    ]
    archive = read_jsonl(tmp_path / "out" / "archive.jsonl")
    assert len(archive) == 8
    assert archive[0] == {
        "id": "nyt://article/2023-11-0",
        "web_url": "https://www.nytimes.com/2023/11/0.html",
        "headline": "Story 0 of 2023-11",
        "section_name": "World",
        "pub_date": "2023-11-10T05:00:00Z",
        "word_count": 800,
    }
    viewed = read_jsonl(tmp_path / "out" / "most_popular_viewed.jsonl")
    assert [(r["id"], r["period"]) for r in viewed] == [
        (10, 1),
        (11, 1),
        (70, 7),
        (71, 7),
        (300, 30),
        (301, 30),
    ]
    assert state_of(tmp_path)["streams"]["archive"] == {"cursor": "2024-02-11T05:00:00Z"}

    # The next run starts a month before the stored cursor (lookback P1M), at its month's
    # first day.
    requests.clear()
    second = run_example(
        "nytimes.yaml", tmp_path, env, "--input", "end_date=2024-03-05", *services, out="o2"
    )
    assert second.code == 0, second.stderr
    assert [r for r in requests if not r.startswith("viewed")] == ["2024/1", "2024/2", "2024/3"]


# --- RSS (Airbyte: client-side incremental, RFC 2822 dates) ------------------------------------


def rss_feed(items: list[tuple[str, datetime]]) -> str:
    entries = "".join(
        f"<item><title>{title}</title><link>https://blog.example/{title}</link>"
        f'<guid isPermaLink="false">{title}</guid>'
        f"<pubDate>{format_datetime(at, usegmt=True)}</pubDate>"
        f"<description>About {title}</description></item>"
        for title, at in items
    )
    return (
        '<?xml version="1.0" encoding="UTF-8"?>'
        '<rss version="2.0"><channel><title>Blog</title>'
        f"{entries}</channel></rss>"
    )


def test_rss(serve: Serve, tmp_path: Path) -> None:
    now = datetime.now(UTC).replace(microsecond=0)
    items = [
        ("new", now - timedelta(hours=1)),
        ("recent", now - timedelta(hours=22)),
        ("old", now - timedelta(hours=30)),
    ]

    async def feed(_: web.Request) -> web.Response:
        return web.Response(text=rss_feed(items), content_type="application/rss+xml")

    server = serve(app_with(("GET", "/feed.xml", feed)))
    args = ("--input", f"url={server.url}/feed.xml")
    first = run_example("rss.yaml", tmp_path, {}, *args)
    assert first.code == 0, first.stderr
    rows = read_jsonl(tmp_path / "out" / "items.jsonl")
    # The first run: the last 23 hours only.
    assert [r["guid"] for r in rows] == ["new", "recent"]
    assert rows[0]["published"] == (now - timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    assert rows[0]["link"] == "https://blog.example/new"

    # The feed sends everything again, plus one new item at the same second as the newest:
    # only that one is delivered.
    items.insert(0, ("twin", now - timedelta(hours=1)))
    second = run_example("rss.yaml", tmp_path, {}, *args, out="o2")
    assert second.code == 0, second.stderr
    assert [r["guid"] for r in read_jsonl(tmp_path / "o2" / "items.jsonl")] == ["twin"]
    third = run_example("rss.yaml", tmp_path, {}, *args, out="o3")
    assert third.code == 0, third.stderr
    assert read_jsonl(tmp_path / "o3" / "items.jsonl") == []
    assert state_of(tmp_path)["streams"]["items"]["seen"] == [["new"], ["twin"]]


# --- GitHub (dlt rest_api: incremental since, link header, include_from_parent) -----------------


def github_app(
    issues: list[dict[str, Any]], comments: dict[int, list[dict[str, Any]]]
) -> web.Application:
    async def list_issues(request: web.Request) -> web.Response:
        if request.headers.get("Authorization") != "Bearer gh-token":
            return web.json_response({"message": "Bad credentials"}, status=401)
        since = request.query.get("since")
        rows = sorted(
            (i for i in issues if since is None or i["updated_at"] >= since),
            key=lambda i: i["updated_at"],
        )
        page = int(request.query.get("page", "1"))
        chunk = rows[(page - 1) * 2 : page * 2]
        headers = {}
        if page * 2 < len(rows):
            nxt = request.url.update_query({"page": str(page + 1)})
            headers["Link"] = f'<{nxt}>; rel="next"'
        return web.json_response(chunk, headers=headers)

    async def list_comments(request: web.Request) -> web.Response:
        number = int(request.match_info["number"])
        return web.json_response(comments.get(number, []))

    return app_with(
        ("GET", "/repos/dlt-hub/dlt/issues", list_issues),
        ("GET", "/repos/dlt-hub/dlt/issues/{number}/comments", list_comments),
    )


def issue(id_: int, number: int, updated: str, comments: int, pr: bool = False) -> dict[str, Any]:
    found: dict[str, Any] = {
        "id": id_, "number": number, "title": f"Issue {number}", "state": "open",
        "user": {"login": "octo"}, "comments": comments,
        "created_at": "2024-01-01T00:00:00Z", "updated_at": updated,
    }  # fmt: skip
    if pr:
        found["pull_request"] = {"url": "https://api.github.com/..."}
    return found


def test_github_dlt(serve: Serve, tmp_path: Path) -> None:
    issues = [
        issue(501, 1, "2024-02-01T00:00:00Z", 2),
        issue(502, 2, "2024-02-02T00:00:00Z", 0),
        issue(503, 3, "2024-02-03T00:00:00Z", 0, pr=True),
        issue(504, 4, "2024-02-03T00:00:00Z", 1),
    ]

    def comment(id_: int, body: str) -> dict[str, Any]:
        return {
            "id": id_,
            "body": body,
            "user": {"login": "a"},
            "created_at": "x",
            "updated_at": "x",
        }

    comments = {1: [comment(9001, "first"), comment(9002, "second")], 4: [comment(9004, "hi")]}
    server = serve(github_app(issues, comments))
    env = {"GITHUB_API_URL": server.url, "GITHUB_TOKEN": "gh-token"}
    first = run_example("github_dlt.yaml", tmp_path, env)
    assert first.code == 0, first.stderr
    assert [r["number"] for r in read_jsonl(tmp_path / "out" / "issues.jsonl")] == [1, 2, 4]
    assert [
        (c["id"], c["_issues_id"]) for c in read_jsonl(tmp_path / "out" / "issue_comments.jsonl")
    ] == [
        (9001, 501),
        (9002, 501),
        (9004, 504),
    ]
    assert state_of(tmp_path)["streams"]["issues"] == {
        "cursor": "2024-02-03T00:00:00Z",
        "seen": [[504]],
    }
    # The pull request was fetched (and dropped by the filter), so it is not among the keys:
    # if it became an issue at the same time, it would be delivered.
    issues.append(issue(505, 5, "2024-02-04T00:00:00Z", 0))
    second = run_example("github_dlt.yaml", tmp_path, env, out="o2")
    assert second.code == 0, second.stderr
    assert [r["number"] for r in read_jsonl(tmp_path / "o2" / "issues.jsonl")] == [5]
