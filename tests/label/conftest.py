"""Fixtures of the labeling tests: candidate files with known right answers, a server in a thread, a headless
Chromium (Debian's, driven by Playwright; nothing is downloaded).

Browser tests skip when no Chromium is installed, unless RLHF_RAY_REQUIRE_BROWSER=1 (set by .ci/run, which
installs it), where a missing browser is a failure.
"""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from pathlib import Path
from typing import Iterator, Optional

import pytest

from rlhf_ray.label.config import LabelConfig
from rlhf_ray.config_loader import load_config

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "tests" / "artifacts"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage"]
TOKENS = {"alice": "alice-token-0123456789", "bob": "bob-token-0123456789ab"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def label_config(output_dir: Path, *overrides: str) -> LabelConfig:
    annotators = "{" + ", ".join(f"{k}: {v}" for k, v in TOKENS.items()) + "}"
    return load_config(LabelConfig, None, [f"output_dir={output_dir}", f"server.annotators={annotators}",
                                           *overrides])


class ThreadServer:
    """`rlhf-ray label`'s app on a free 127.0.0.1 port, served by uvicorn in a thread."""

    def __init__(self, cfg: LabelConfig):
        import uvicorn

        from rlhf_ray.label.items import load_items
        from rlhf_ray.label.server import create_app, load_tokens
        from rlhf_ray.label.store import JudgementStore

        self.cfg = cfg
        self.items = load_items(cfg).items
        self.store = JudgementStore(cfg.output_dir, cfg.mode)
        app = create_app(cfg, self.items, self.store, load_tokens(cfg.server)[0])
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    access_log=False))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "the label server did not start within 30 s"
            time.sleep(0.02)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def page_url(self, annotator: Optional[str] = "alice") -> str:
        return f"{self.base}/?token={TOKENS[annotator]}" if annotator else f"{self.base}/"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture
def serve_labels() -> Iterator:
    """serve_labels(cfg) -> a started ThreadServer; all stopped at the end of the test."""
    servers: list[ThreadServer] = []

    def start(cfg: LabelConfig) -> ThreadServer:
        servers.append(ThreadServer(cfg))
        return servers[-1]

    yield start
    for server in servers:
        server.stop()


def chromium_path() -> Optional[str]:
    return os.environ.get("RLHF_RAY_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="session")
def browser():
    path = chromium_path()
    if path is None:
        if os.environ.get("RLHF_RAY_REQUIRE_BROWSER") == "1":
            pytest.fail("RLHF_RAY_REQUIRE_BROWSER=1 but no chromium found (apt-get install chromium)")
        pytest.skip("no chromium installed (apt-get install chromium); browser tests skipped")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=path, headless=True, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1200, "height": 800})
    page = context.new_page()
    page.set_default_timeout(15000)
    yield page
    context.close()


def screenshot(page, name: str) -> Path:
    """Save a screenshot under tests/artifacts/ (kept by CI); RLHF_RAY_UPDATE_DOCS=1 also copies
    label-pairwise.png to docs/label-page.png, the README's picture."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    size = page.viewport_size
    page.set_viewport_size({"width": 1100, "height": 440})  # the full page grows past this when it is longer
    page.screenshot(path=str(path), full_page=True)
    page.set_viewport_size(size)
    if name == "label-pairwise" and os.environ.get("RLHF_RAY_UPDATE_DOCS") == "1":
        (REPO / "docs").mkdir(exist_ok=True)
        shutil.copyfile(path, REPO / "docs" / "label-page.png")
    return path
