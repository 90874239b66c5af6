"""The label server's HTTP API under bad input: tokens, unknown ids, invalid judgements, oversized bodies, and
nothing from a request reaching the filesystem. Runs the real app over real HTTP (uvicorn in a thread)."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from rlhf_ray.label.judgements import rm_rows
from rlhf_ray.label.store import FEEDBACK_FILE, LOG_FILE, latest_by_key, read_log

from .conftest import TOKENS, label_config

ALICE = {"Authorization": f"Bearer {TOKENS['alice']}"}


def write_candidates(path: Path, k: int, n: int = 3) -> str:
    rows = [{"prompt": f"prompt {i}", "responses": [f"response {i}.{j}" for j in range(k)]} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture
def server(tmp_path, serve_labels, request):
    mode, k = getattr(request, "param", ("pairwise", 2))
    source = write_candidates(tmp_path / "candidates.jsonl", k)
    return serve_labels(label_config(tmp_path / "out", f"mode={mode}", f"candidates={source}",
                                     "server.max_body_bytes=1024"))


def log_bytes(server) -> bytes:
    path = Path(server.cfg.output_dir) / LOG_FILE
    return path.read_bytes() if path.exists() else b""


def by_key(row: dict) -> tuple[str, str]:
    return row["annotator"], row["item_id"]


def first_item(server) -> str:
    return server.items[0].item_id


@pytest.mark.parametrize("headers, params", [
    ({}, {}),
    ({"Authorization": "Bearer wrong-token-0123456789"}, {}),
    ({"Authorization": f"Bearer {TOKENS['alice']}x"}, {}),
    ({"Authorization": f"Basic {TOKENS['alice']}"}, {}),
    ({}, {"token": "wrong"}),
    ({}, {"token": ""}),
])
def test_every_route_needs_a_valid_token_and_a_refused_request_writes_nothing(server, headers, params):
    item = first_item(server)
    before = log_bytes(server)
    with httpx.Client(base_url=server.base, headers=headers, params=params) as client:
        for method, path in [("GET", "/"), ("GET", "/api/state"), ("GET", f"/api/items/{item}"),
                             ("POST", f"/api/items/{item}/judgement"), ("GET", "/docs"), ("GET", "/nope")]:
            response = client.request(method, path, json={"choice": 0} if method == "POST" else None)
            assert response.status_code == 401, (method, path)
            assert response.headers["www-authenticate"] == "Bearer"
            assert "missing or wrong token" in response.json()["detail"]
    assert log_bytes(server) == before == b""


def test_a_valid_judgement_is_on_disk_when_the_reply_comes(server):
    with httpx.Client(base_url=server.base, headers=ALICE) as client:
        state = client.get("/api/state").json()
        assert (state["total"], state["done"], state["next"], state["annotator"]) == (3, 0, 0, "alice")
        item = client.get(f"/api/items/{state['items'][0]['id']}").json()
        reply = client.post(f"/api/items/{item['id']}/judgement", json={"choice": 1})
        assert reply.status_code == 200 and reply.json() == {"ok": True, "done": 1, "total": 3}
    record = json.loads(log_bytes(server))
    assert record["chosen"] == item["responses"][1] and record["annotator"] == "alice"
    assert json.loads((Path(server.cfg.output_dir) / FEEDBACK_FILE).read_text())["chosen"] == item["responses"][1]


@pytest.mark.parametrize("path", [
    "/api/items/..%2F..%2F..%2Fetc%2Fpasswd", "/api/items/%2Fetc%2Fpasswd", "/api/items/candidates.jsonl",
    "/api/items/0000000000000000", "/api/items/" + "f" * 500])
def test_unknown_item_ids_are_404_and_touch_no_file(server, path):
    with httpx.Client(base_url=server.base, headers=ALICE) as client:
        assert client.get(path).status_code == 404
        response = client.post(path + "/judgement", json={"choice": 0})
        assert response.status_code == 404
        if "%2F" not in path:  # an encoded slash matches no route at all; the rest reach the id lookup
            assert "unknown item id" in response.json()["detail"]
    assert log_bytes(server) == b""


@pytest.mark.parametrize("server, body, message", [
    (("pairwise", 2), {"choice": 2}, "must be 0 or 1"),
    (("pairwise", 2), {"choice": "0"}, "malformed judgement"),
    (("pairwise", 2), {"scores": [1, 2]}, "a pairwise judgement is"),
    (("rating", 3), {"scores": [1, 2, 9]}, "9 is not on the rating scale"),
    (("rating", 3), {"scores": [1, 2]}, "one score per response"),
    (("ranking", 3), {"ranking": [0, 0, 2]}, "exactly once"),
    (("ranking", 3), {"ranking": [0, 1]}, "exactly once"),
    (("ranking", 3), {"ranking": "012"}, "malformed judgement"),
], indirect=["server"])
def test_invalid_judgements_are_refused_with_a_clear_message(server, body, message):
    with httpx.Client(base_url=server.base, headers=ALICE) as client:
        response = client.post(f"/api/items/{first_item(server)}/judgement", json=body)
    assert response.status_code == 422 and message in response.json()["detail"]
    assert log_bytes(server) == b""


def test_bodies_that_are_not_json_or_too_large_are_refused(server):
    url = f"/api/items/{first_item(server)}/judgement"
    with httpx.Client(base_url=server.base, headers=ALICE) as client:
        response = client.post(url, content=b"{not json")
        assert response.status_code == 422 and "Invalid JSON" in response.json()["detail"]
        padded = b'{"choice": 0' + b" " * 2000 + b"}"
        response = client.post(url, content=padded)
        assert response.status_code == 413 and "max_body_bytes=1024" in response.json()["detail"]
        # Without a Content-Length (chunked), the limit holds as the body streams in.
        response = client.post(url, content=iter([b'{"choice": 0', b" " * 800, b" " * 800, b"}"]))
        assert response.status_code == 413
    assert log_bytes(server) == b""


def test_the_page_is_locked_down(server):
    with httpx.Client(base_url=server.base, headers=ALICE) as client:
        page = client.get("/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        csp = page.headers["content-security-policy"]
        nonce = csp.split("'nonce-")[1].split("'")[0]
        assert f'<script nonce="{nonce}">' in page.text and "default-src 'none'" in csp
        assert page.headers["cache-control"] == "no-store" and page.headers["referrer-policy"] == "no-referrer"
        assert nonce not in client.get("/").headers["content-security-policy"]  # a new nonce per response
        assert "innerHTML" not in page.text and "insertAdjacentHTML" not in page.text
        for path in ("/docs", "/redoc", "/openapi.json"):
            assert client.get(path).status_code == 404


def test_annotators_each_have_their_own_progress_and_order(server):
    bob = {"Authorization": f"Bearer {TOKENS['bob']}"}
    with httpx.Client(base_url=server.base) as client:
        item = first_item(server)
        client.post(f"/api/items/{item}/judgement", json={"choice": 0}, headers=ALICE)
        assert client.get("/api/state", headers=bob).json()["done"] == 0
        assert client.get("/api/state", headers=ALICE).json()["done"] == 1
        assert client.get(f"/api/items/{item}", headers=bob).json()["judgement"] is None
        assert client.get(f"/api/items/{item}", headers=ALICE).json()["judgement"] == {"choice": 0}


def test_concurrent_annotators_never_mix_lines(server):
    bob = {"Authorization": f"Bearer {TOKENS['bob']}"}
    jobs = [(headers, item.item_id, choice) for _ in range(3) for headers in (ALICE, bob) for item in server.items
            for choice in (0, 1, "tie")]

    def post(job) -> int:
        headers, item, choice = job
        return httpx.post(f"{server.base}/api/items/{item}/judgement", json={"choice": choice},
                          headers=headers).status_code

    with ThreadPoolExecutor(max_workers=8) as pool:
        assert set(pool.map(post, jobs)) == {200}
    records, bad = read_log(Path(server.cfg.output_dir) / LOG_FILE)
    assert bad == 0 and len(records) == len(jobs) == 54
    # The reward-model file is exactly the latest judgement of each (annotator, item), in whatever order the
    # requests landed (the file's order is that of the latest judgements).
    latest = latest_by_key(records).values()
    assert len(latest) == 6
    expected = sorted((row for record in latest for row in rm_rows(record)), key=by_key)
    feedback = [json.loads(line) for line in (Path(server.cfg.output_dir) / FEEDBACK_FILE).read_text().splitlines()]
    assert sorted(feedback, key=by_key) == expected


def test_the_token_link_sets_a_cookie_and_redirects_to_a_clean_address(server):
    name = f"rlhf_label_token_{server.port}"
    with httpx.Client(base_url=server.base) as client:
        response = client.get("/", params={"token": TOKENS["alice"]})
        assert response.status_code == 303 and response.headers["location"] == "/"
        cookie = response.headers["set-cookie"]
        assert cookie.startswith(f"{name}={TOKENS['alice']};")
        attributes = {part.strip().split("=")[0].lower() for part in cookie.split(";")[1:]}
        assert {"httponly", "samesite", "path"} <= attributes and "secure" not in attributes  # plain http
        assert "samesite=strict" in cookie.lower() and response.headers["cache-control"] == "no-store"
        # Behind a TLS proxy (uvicorn trusts X-Forwarded-Proto from 127.0.0.1), the cookie is Secure.
        proxied = client.get("/", params={"token": TOKENS["alice"]}, headers={"X-Forwarded-Proto": "https"})
        assert proxied.status_code == 303 and "; secure" in proxied.headers["set-cookie"].lower()
        # A link with a wrong token is refused, not redirected, and sets nothing.
        wrong = client.get("/", params={"token": "wrong-token-0123456789"})
        assert wrong.status_code == 401 and "set-cookie" not in wrong.headers


def test_the_cookie_alone_authenticates_and_a_wrong_one_is_refused(server):
    name = f"rlhf_label_token_{server.port}"
    item = first_item(server)
    with httpx.Client(base_url=server.base) as client:
        alice = {"Cookie": f"{name}={TOKENS['alice']}"}
        page = client.get("/", headers=alice)
        assert page.status_code == 200 and "set-cookie" not in page.headers
        assert client.get("/api/state", headers=alice).json()["annotator"] == "alice"
        assert client.post(f"/api/items/{item}/judgement", json={"choice": 0}, headers=alice).status_code == 200
        for cookie in (f"{name}=wrong-token-0123456789", f"{name}=", f"rlhf_label_token_1={TOKENS['alice']}",
                       f"token={TOKENS['alice']}"):
            for method, path in (("GET", "/"), ("GET", "/api/state"), ("POST", f"/api/items/{item}/judgement")):
                response = client.request(method, path, headers={"Cookie": cookie},
                                          json={"choice": 1} if method == "POST" else None)
                assert response.status_code == 401, (cookie, path)
        # Scripts keep the header, and a bookmarked ?token= still works on the API.
        assert client.get("/api/state", headers=ALICE).status_code == 200
        assert client.get("/api/state", params={"token": TOKENS["bob"]}).json()["annotator"] == "bob"
    assert [r["verdict"] for r in read_log(Path(server.cfg.output_dir) / LOG_FILE)[0]] == ["preferred"]  # one
