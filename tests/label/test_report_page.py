"""The run report (`rlhf-ray report`) in headless Chromium: the page of a fake pipeline (SFT + RLHF, metrics
written by MetricsLogger, rollouts by the RLHF loop's writer) opens from disk with no console error, every plot
loads, and the hostile text in a sample answer shows as text. Uses the label tests' browser fixtures (Debian's
chromium driven by Playwright; skipped without one unless RLHF_RAY_REQUIRE_BROWSER=1)."""

from __future__ import annotations

from rlhf_ray.report.build import write_report
from tests.unit.test_report import HOSTILE, fake_rlhf, fake_sft

from .conftest import ARTIFACTS


def test_the_report_opens_with_no_console_error_and_every_plot_loaded(page, tmp_path):
    report = write_report([fake_sft(tmp_path / "demo-sft"), fake_rlhf(tmp_path / "demo-rlhf", hacked=True)])
    problems: list[str] = []
    page.on("console", lambda msg: problems.append(f"console {msg.type}: {msg.text}")
            if msg.type in ("error", "warning") else None)
    page.on("pageerror", lambda err: problems.append(f"page error: {err}"))
    page.on("requestfailed", lambda req: problems.append(f"request failed: {req.url}"))
    page.goto(report.as_uri())
    page.wait_for_load_state("load")
    images = page.locator("img")
    assert images.count() >= 12  # SFT: loss, accuracy, phase times, eval; RLHF: all nine panels
    page.wait_for_function("Array.from(document.images).every(i => i.complete && i.naturalWidth > 0)")
    assert page.locator("h2", has_text="Before / after").count() == 1
    assert page.locator(".warn", has_text="length_drift").count() == 1
    assert page.locator("td.text", has_text=HOSTILE).count() >= 1  # shown as text, not run
    assert page.locator("script").count() == 0
    assert problems == []
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "report-page.png"), full_page=False)
