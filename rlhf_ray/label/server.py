"""The labeling web app: one page and a small JSON API; every request needs an annotator's token.

Routes (each needs the token as `Authorization: Bearer <token>` (scripts), the page's cookie, or `?token=<token>`;
without a valid one: 401, nothing done):
- `GET /`: the page (`page.html`: HTML and inline JS, no build step). Opened as `/?token=<token>` (the address
  the server prints, or a bookmark), it answers with a redirect to `/` that sets the token as an HttpOnly,
  SameSite=Strict cookie (Secure when the request came over https), so the token leaves the address bar,
  the history, screenshots and Referer headers; the page's script then calls the API with the cookie alone.
  The cookie's name carries the port: two label servers on one host do not overwrite each other's;
- `GET /api/state`: mode, rating scale, the item ids in order with this annotator's done flags, where to start;
- `GET /api/items/{id}`: the prompt, the responses in this annotator's shuffled order, their earlier judgement;
- `POST /api/items/{id}/judgement`: a judgement (`judgements` module), on disk before the reply.

Bad input: ids are looked up in memory, so nothing from a request reaches the filesystem; a body over
`server.max_body_bytes` gets 413 before it is parsed; malformed or invalid judgements get 422 saying what a
valid one is. Tokens are compared in constant time. The page shows all model text through `textContent`,
under a Content-Security-Policy that allows only its own inline script (a per-response nonce). FastAPI's
/docs and /openapi.json are off.
"""

from __future__ import annotations

import hmac
import ipaddress
import secrets
from importlib import resources
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import uvicorn
import yaml
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse
from starlette.concurrency import run_in_threadpool

from rlhf_ray.config_loader import ConfigError
from rlhf_ray.label.config import LabelConfig, LabelServerConfig, check_annotator_tokens
from rlhf_ray.label.items import LabelItem, display_order, load_items, prompt_messages
from rlhf_ray.label.judgements import (
    JudgementError,
    check_judgement,
    make_record,
    parse_body,
    shown_judgement,
)
from rlhf_ray.label.store import JudgementStore

SECURITY_HEADERS = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff",
                    "Referrer-Policy": "no-referrer", "X-Frame-Options": "DENY"}
CSP = ("default-src 'none'; script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}'; connect-src 'self'; "
       "img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


class BodyTooLarge(Exception):
    pass


def find_annotator(tokens: Mapping[str, str], presented: Optional[str]) -> Optional[str]:
    """The annotator whose token is `presented`; every token is compared, each in constant time."""
    if not presented:
        return None
    found = None
    for name, token in tokens.items():
        if hmac.compare_digest(token.encode("utf-8"), presented.encode("utf-8")):
            found = name
    return found


def cookie_name(request: Request) -> str:
    """The token cookie of this server: cookies are per host, not per port, hence the port in the name."""
    port = request.url.port or (443 if request.url.scheme == "https" else 80)
    return f"rlhf_label_token_{port}"


def presented_token(request: Request) -> Optional[str]:
    """The token a request carries: a Bearer header first, then `?token=` (a new link beats an old cookie),
    then the cookie."""
    header = request.headers.get("authorization", "")
    if header.lower().startswith("bearer "):
        return header[7:].strip()
    if "token" in request.query_params:
        return request.query_params["token"]
    return request.cookies.get(cookie_name(request))


def token_to_cookie(request: Request, token: str) -> RedirectResponse:
    """The answer to `GET /?token=...`: a redirect to `/` that sets the token as this server's cookie."""
    response = RedirectResponse("/", status_code=303)
    response.set_cookie(cookie_name(request), token, httponly=True, samesite="strict", path="/",
                        secure=request.url.scheme == "https")
    return response


async def read_limited(request: Request, limit: int) -> bytes:
    """The request body, refusing (BodyTooLarge) as soon as it is longer than `limit` bytes."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise BodyTooLarge
    return bytes(body)


def create_app(cfg: LabelConfig, items: Sequence[LabelItem], store: JudgementStore,
               tokens: Mapping[str, str]) -> FastAPI:
    """The app serving `items` to the annotators of `tokens` (name -> token), logging to `store`."""
    app = FastAPI(title="rlhf-ray label", docs_url=None, redoc_url=None, openapi_url=None)
    app.middleware("http")(_authenticator(tokens))
    _add_page_route(app)
    _add_api_routes(app, cfg, items, store)
    return app


def _authenticator(tokens: Mapping[str, str]):
    """The HTTP middleware: 401 without an annotator's token; otherwise the annotator's name goes to
    `request.state.annotator` and the security headers onto the response."""
    async def authenticate(request: Request, call_next):
        annotator = find_annotator(tokens, presented_token(request))
        if annotator is None:
            return JSONResponse({"detail": "missing or wrong token: open the page as /?token=YOUR_TOKEN, or "
                                           "send 'Authorization: Bearer YOUR_TOKEN'"}, status_code=401,
                                headers={**SECURITY_HEADERS, "WWW-Authenticate": "Bearer"})
        request.state.annotator = annotator
        if request.method == "GET" and request.url.path == "/" and "token" in request.query_params:
            response = token_to_cookie(request, presented_token(request))
        else:
            response = await call_next(request)
        for name, value in SECURITY_HEADERS.items():
            response.headers.setdefault(name, value)
        return response

    return authenticate


def _add_page_route(app: FastAPI) -> None:
    """`GET /`: the page, its inline script and style allowed by a nonce new in every response."""
    page = resources.files("rlhf_ray.label").joinpath("page.html").read_text(encoding="utf-8")

    @app.get("/", response_class=HTMLResponse)
    def index() -> HTMLResponse:
        nonce = secrets.token_urlsafe(16)
        return HTMLResponse(page.replace("__NONCE__", nonce),
                            headers={"Content-Security-Policy": CSP.format(nonce=nonce)})


def _add_api_routes(app: FastAPI, cfg: LabelConfig, items: Sequence[LabelItem], store: JudgementStore) -> None:
    """`GET /api/state`, `GET /api/items/{id}`, `POST /api/items/{id}/judgement` (see the module docstring)."""
    by_id = {item.item_id: item for item in items}
    scale = list(cfg.scale_values)
    limit = cfg.server.max_body_bytes

    def find_item(item_id: str) -> LabelItem:
        if item_id not in by_id:
            raise HTTPException(404, f"unknown item id {item_id[:40]!r}")
        return by_id[item_id]

    @app.get("/api/state")
    def state(request: Request) -> dict[str, Any]:
        annotator = request.state.annotator
        store.refresh()
        done = store.labeled_by(annotator)
        flags = [{"id": item.item_id, "done": item.item_id in done} for item in items]
        first = next((i for i, flag in enumerate(flags) if not flag["done"]), None)
        return {"annotator": annotator, "mode": cfg.mode, "scale": scale, "total": len(items),
                "done": sum(f["done"] for f in flags), "items": flags, "next": first}

    @app.get("/api/items/{item_id}")
    def get_item(item_id: str, request: Request) -> dict[str, Any]:
        item = find_item(item_id)
        order = display_order(item.item_id, request.state.annotator, cfg.seed, len(item.responses))
        earlier = store.judgement(request.state.annotator, item.item_id)
        return {"id": item.item_id, "prompt": prompt_messages(item.prompt),
                "responses": [item.responses[c] for c in order], "judgement": shown_judgement(earlier, order)}

    @app.post("/api/items/{item_id}/judgement")
    async def post_judgement(item_id: str, request: Request) -> dict[str, Any]:
        item = find_item(item_id)
        annotator = request.state.annotator
        try:
            body = parse_body(await read_limited(request, limit))
            judgement = check_judgement(body, cfg.mode, len(item.responses), scale)
        except BodyTooLarge:
            raise HTTPException(413, f"request body larger than server.max_body_bytes={limit} bytes") from None
        except JudgementError as err:
            raise HTTPException(422, str(err)) from None
        order = display_order(item.item_id, annotator, cfg.seed, len(item.responses))
        await run_in_threadpool(store.append, make_record(item, annotator, cfg.mode, judgement, order))
        return {"ok": True, "done": len(store.labeled_by(annotator) & by_id.keys()), "total": len(items)}


def load_tokens(server: LabelServerConfig) -> tuple[dict[str, str], bool]:
    """(annotator name -> token, whether a token was made up): `server.annotators` merged with
    `server.tokens_file`; with neither, one annotator `local` with a random token."""
    tokens = dict(server.annotators)
    if server.tokens_file:
        path = Path(server.tokens_file)
        if not path.is_file():
            raise ConfigError(f"server.tokens_file: {path} does not exist")
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as err:
            raise ConfigError(f"server.tokens_file: {path} is not valid YAML/JSON: {err}") from err
        if not isinstance(loaded, dict) or not loaded:
            raise ConfigError(f"server.tokens_file: {path} must map annotator names to tokens")
        check_annotator_tokens(loaded, f"server.tokens_file {path}")
        for name, token in loaded.items():
            if tokens.get(name, token) != token:
                raise ConfigError(f"server.tokens_file: {path} gives annotator {name!r} another token than "
                                  "server.annotators")
        tokens.update(loaded)
        check_annotator_tokens(tokens, f"server.annotators + server.tokens_file {path}")
    if tokens:
        return tokens, False
    return {"local": secrets.token_urlsafe(24)}, True


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def startup_lines(cfg: LabelConfig, items: Sequence[LabelItem], skipped: Mapping[str, int],
                  store: JudgementStore, tokens: Mapping[str, str], generated: bool) -> list[str]:
    """What `serve` prints: items, files, and each annotator's progress and address."""
    base = f"http://{cfg.server.host}:{cfg.server.port}/"
    lines = [f"[label] {len(items)} {cfg.mode} items; judgements are appended to {store.log_path}; "
             f"train on {store.feedback_path}"]
    lines += [f"[label] not shown: {reason}: {n}" for reason, n in skipped.items()]
    ids = {item.item_id for item in items}
    for name, token in tokens.items():
        shown = token if generated else f"<{name}'s token>"
        lines.append(f"[label] {name}: {len(store.labeled_by(name) & ids)} / {len(items)} done; "
                     f"open {base}?token={shown}")
    if not _is_loopback(cfg.server.host):
        lines.append(f"[label] warning: listening on {cfg.server.host}, reachable from other machines over "
                     "plain HTTP; tokens and labels travel unencrypted unless TLS is put in front")
    return lines


def serve(cfg: LabelConfig) -> None:
    """Build the items (generating responses if the config names a model) and serve the page until Ctrl-C."""
    tokens, generated = load_tokens(cfg.server)
    found = load_items(cfg)
    store = JudgementStore(cfg.output_dir, cfg.mode)
    app = create_app(cfg, found.items, store, tokens)
    print("\n".join(startup_lines(cfg, found.items, found.skipped, store, tokens, generated)), flush=True)
    # No access log: the first address an annotator opens carries their token (`/?token=...`).
    uvicorn.run(app, host=cfg.server.host, port=cfg.server.port, access_log=False, log_level="warning")
