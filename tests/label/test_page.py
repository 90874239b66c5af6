"""The labeling page in headless Chromium: each mode labeled with clicks and keys, an answer changed, the files
checked line by line against the reward-model formats; a crash and restart mid-way; wrong tokens; escaping.

The annotator here is the test: the candidates come from the synthetic `sort` task, so it knows which answer
is right and decides as a person would, reading the page, never the hidden order.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml
from playwright.sync_api import Page, expect

from rlhf_ray.cli import main
from rlhf_ray.data.loading import Record
from rlhf_ray.data.preference import ROW_FORMATS, _guess_format
from rlhf_ray.data.synthetic import make_rows, score_answer, write_label_candidates
from rlhf_ray.label.store import FEEDBACK_FILE, LOG_FILE

from .conftest import REPO, TOKENS, free_port, label_config, screenshot


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def at(page: Page, done: int, total: int, position: int) -> None:
    """Wait until the page shows `done / total` and has item `position` (1-based) loaded."""
    expect(page.locator("#progress")).to_have_text(f"{done} / {total}")
    expect(page.locator("#position")).to_have_text(f"item {position} of {total}")


def shown(page: Page) -> list[str]:
    return page.locator("#candidates article .text").all_text_contents()


def task_input(page: Page) -> str:
    return page.locator("#prompt .text").first.text_content().split("\n")[1]


def right_answer(page: Page) -> str:
    return "".join(sorted(task_input(page)))


def score(page: Page, text: str) -> int:
    """A rater's 1-5 score: how much of the answer is right."""
    return 1 + round(4 * score_answer("sort", task_input(page), text))


def best_first(page: Page) -> list[int]:
    """Shown positions, best answer first (ties by text, so the order is fixed)."""
    texts = shown(page)
    return sorted(range(len(texts)), key=lambda j: (-score_answer("sort", task_input(page), texts[j]), texts[j]))


def check_rm_rows(rows: list[dict], fmt: str) -> None:
    """Every row is exactly a reward-model row of `fmt`, as `rlhf-ray rm` parses it."""
    for i, row in enumerate(rows):
        assert _guess_format(row) == fmt
        ROW_FORMATS[fmt](Record(FEEDBACK_FILE, i + 1, "line", row), (1.0, 5.0))
        assert row["annotator"] == "alice" and row["timestamp"] and row["item_id"]


@pytest.fixture
def candidates(tmp_path) -> dict[str, Path]:
    return write_label_candidates(tmp_path / "data", n=4, seed=3)


def test_pairwise_with_clicks_and_keys_and_a_changed_answer(page, serve_labels, candidates, tmp_path):
    out = tmp_path / "out"
    server = serve_labels(label_config(out, f"candidates={candidates['label_pairs']}"))
    page.goto(server.page_url())
    at(page, 0, 4, 1)
    expect(page.locator("#annotator")).to_have_text("annotator: alice")
    right = {}
    right[1] = right_answer(page)
    page.click(f"#choose-{shown(page).index(right[1])}")                     # item 1: a click
    at(page, 1, 4, 2)
    right[2], texts2 = right_answer(page), shown(page)
    page.keyboard.press(str(texts2.index(right[2]) + 1))                     # item 2: its key
    at(page, 2, 4, 3)
    page.keyboard.press("t")                                                 # item 3: tie
    at(page, 3, 4, 4)
    page.keyboard.press("ArrowLeft")                                         # back to item 3
    at(page, 3, 4, 3)
    expect(page.locator("#tie")).to_have_attribute("aria-pressed", "true")
    page.click("#prev")                                                      # back to item 2
    at(page, 3, 4, 2)
    expect(page.locator(f"#choose-{texts2.index(right[2])}")).to_have_attribute("aria-pressed", "true")
    expect(page.locator("#status")).to_have_text("✓ Labeled. Answer again to change it.")
    screenshot(page, "label-pairwise")
    wrong2 = next(t for t in texts2 if t != right[2])
    page.click(f"#choose-{texts2.index(wrong2)}")                            # change item 2's answer
    at(page, 3, 4, 4)                                                        # on to the one left
    page.keyboard.press("b")                                                 # item 4: both bad
    at(page, 4, 4, 4)
    expect(page.locator("#finished")).to_be_visible()

    log = read_jsonl(out / LOG_FILE)
    assert [r["verdict"] for r in log] == ["preferred", "preferred", "tie", "preferred", "both_bad"]
    assert len({r["item_id"] for r in log}) == 4 and log[1]["item_id"] == log[3]["item_id"]
    feedback = read_jsonl(out / FEEDBACK_FILE)  # latest per item; tie and both-bad are no pairs
    assert [(r["chosen"], r["item_id"]) for r in feedback] == [(right[1], log[0]["item_id"]),
                                                               (wrong2, log[1]["item_id"])]
    assert feedback[1]["rejected"] == right[2]
    assert all(set(r) == {"prompt", "chosen", "rejected", "annotator", "timestamp", "item_id", "task", "input"}
               for r in feedback)
    check_rm_rows(feedback, "pairwise")


def test_rating_with_clicks_and_keys_and_a_changed_score(page, serve_labels, candidates, tmp_path):
    out = tmp_path / "out"
    server = serve_labels(label_config(out, "mode=rating", f"candidates={candidates['label_candidates']}",
                                       "max_items=3"))
    page.goto(server.page_url())
    at(page, 0, 3, 1)
    expected = {}
    for j, text in enumerate(shown(page)):                                   # item 1: clicks
        expected[text] = score(page, text)
        page.locator(f'#candidates article[data-position="{j}"] button.score').nth(expected[text] - 1).click()
    page.click("#submit")
    at(page, 1, 3, 2)
    first2 = shown(page)[0]
    for text in shown(page):                                                 # item 2: keys (focus moves on)
        expected[text] = score(page, text)
        page.keyboard.press(str(expected[text]))
    page.keyboard.press("Enter")
    at(page, 2, 3, 3)
    page.keyboard.press("ArrowLeft")                                         # back to item 2
    at(page, 2, 3, 2)
    pressed = page.locator('#candidates article[data-position="0"] button[aria-pressed="true"]')
    expect(pressed).to_have_text(str(expected[first2]))
    new_score = 1 if expected[first2] != 1 else 2
    page.keyboard.press(str(new_score))                                      # change response 1's score
    expected[first2] = new_score
    screenshot(page, "label-rating")
    page.keyboard.press("Enter")
    at(page, 2, 3, 3)

    assert len(read_jsonl(out / LOG_FILE)) == 3
    feedback = read_jsonl(out / FEEDBACK_FILE)
    assert len(feedback) == 8 and {r["response"]: r["score"] for r in feedback} == expected
    check_rm_rows(feedback, "rating")


def test_ranking_with_clicks_and_keys_undo_and_a_changed_order(page, serve_labels, candidates, tmp_path):
    out = tmp_path / "out"
    server = serve_labels(label_config(out, "mode=ranking", f"candidates={candidates['label_candidates']}",
                                       "max_items=3"))
    page.goto(server.page_url())
    at(page, 0, 3, 1)
    order1 = best_first(page)
    texts1 = shown(page)
    for j in order1[:-1]:                                                    # item 1: clicks; the last is implied
        page.click(f'#candidates article[data-position="{j}"]')
    expect(page.locator(f'#candidates article[data-position="{order1[-1]}"] .rank')).to_have_text("#4")
    page.click("#submit")
    at(page, 1, 3, 2)
    texts2, order2 = shown(page), best_first(page)
    for j in order2[:2]:                                                     # item 2: keys, with an undo
        page.keyboard.press(str(j + 1))
    page.keyboard.press("Backspace")
    expect(page.locator("#candidates .rank")).to_have_count(1)
    for j in order2[1:3]:
        page.keyboard.press(str(j + 1))
    page.keyboard.press("Enter")
    at(page, 2, 3, 3)
    page.keyboard.press("ArrowLeft")                                         # back to item 2: shown as ranked
    at(page, 2, 3, 2)
    expect(page.locator(f'#candidates article[data-position="{order2[0]}"] .rank')).to_have_text("#1")
    page.keyboard.press("c")
    reverse = order2[::-1]
    for j in reverse[:-1]:                                                   # change to the reverse order
        page.keyboard.press(str(j + 1))
    screenshot(page, "label-ranking")
    page.keyboard.press("Enter")
    at(page, 2, 3, 3)

    feedback = read_jsonl(out / FEEDBACK_FILE)
    assert len(feedback) == 2 and len(read_jsonl(out / LOG_FILE)) == 3
    for row, texts, order in ((feedback[0], texts1, order1), (feedback[1], texts2, reverse)):
        assert [row["responses"][i] for i in row["ranking"]] == [texts[j] for j in order]
    check_rm_rows(feedback, "ranking")


def write_ab(tmp_path: Path) -> tuple[str, str, list[str]]:
    """Answers of two models to 10 sort prompts and the verdict a careful annotator gives on each: A right on
    6, B right on 2, both wrong on 2 (one called a tie, one both bad)."""
    rows = make_rows(["sort"], 10, seed=11)
    verdicts = ["a"] * 6 + ["b"] * 2 + ["tie", "both_bad"]
    answers_a, answers_b = [], []
    for row, verdict in zip(rows, verdicts):
        right, prompt = row["output"], f"sort\n{row['input']}"
        wrong1, wrong2 = right[::-1] + "x", right + "y"
        answers_a.append({"prompt": prompt, "response": right if verdict == "a" else wrong1})
        answers_b.append({"prompt": prompt, "response": right if verdict == "b" else wrong2})
    paths = []
    for name, answers in (("a", answers_a), ("b", answers_b[::-1])):  # B's file in another order
        path = tmp_path / f"answers_{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in answers))
        paths.append(str(path))
    return paths[0], paths[1], verdicts


def test_ab_evaluation_is_blind_and_reports_the_win_rate(page, serve_labels, tmp_path, capsys):
    path_a, path_b, verdicts = write_ab(tmp_path)
    overrides = ["mode=ab", f"ab.candidates_a={path_a}", f"ab.candidates_b={path_b}", "ab.name_a=model-alpha",
                 "ab.name_b=model-beta"]
    server = serve_labels(label_config(tmp_path / "out", *overrides))
    answer_a = {row["prompt"]: row["response"] for row in read_jsonl(Path(path_a))}
    page.goto(server.page_url())
    sides_of_a = []
    for i, verdict in enumerate(verdicts):
        at(page, i, 10, i + 1)
        assert "model-alpha" not in page.content() and "model-beta" not in page.content()
        texts, right = shown(page), right_answer(page)
        sides_of_a.append(texts.index(answer_a[page.locator("#prompt .text").first.text_content()]))
        if verdict in ("a", "b"):
            if i % 2:
                page.click(f"#choose-{texts.index(right)}")
            else:
                page.keyboard.press(str(texts.index(right) + 1))
        else:
            page.keyboard.press("t" if verdict == "tie" else "b")
        if i == 8:
            screenshot(page, "label-ab")
    at(page, 10, 10, 10)
    assert 0 < sum(sides_of_a) < 10  # model A's answer was shown first on some items, second on others
    api = httpx.get(f"{server.base}/api/items/{server.items[0].item_id}",
                    headers={"Authorization": f"Bearer {TOKENS['alice']}"}).text
    assert "model-alpha" not in api and "model-beta" not in api

    config = tmp_path / "label.yaml"
    config.write_text(yaml.safe_dump({"mode": "ab", "output_dir": str(tmp_path / "out"), "ab": {
        "candidates_a": path_a, "candidates_b": path_b, "name_a": "model-alpha", "name_b": "model-beta"}}))
    assert main(["label-summary", str(config)]) == 0
    text = capsys.readouterr().out
    assert "A/B: model-alpha wins 6, model-beta wins 2, ties 1, both bad 1" in text
    assert "win rate of model-alpha over model-beta: 70.0% (95% CI 39.7% - 89.2%), n = 10" in text


def test_wrong_or_missing_token_gets_401_and_writes_nothing(page, serve_labels, candidates, tmp_path):
    out = tmp_path / "out"
    server = serve_labels(label_config(out, f"candidates={candidates['label_pairs']}"))
    for url in (f"{server.base}/?token=not-a-token-0123456789", f"{server.base}/",
                f"{server.base}/?token={TOKENS['alice'][:-1]}"):
        response = page.goto(url)
        assert response.status == 401 and "missing or wrong token" in page.content()
    response = httpx.post(f"{server.base}/api/items/{server.items[0].item_id}/judgement", json={"choice": 0},
                          headers={"Authorization": "Bearer not-a-token-0123456789"})
    assert response.status_code == 401
    assert (out / LOG_FILE).read_bytes() == b"" and read_jsonl(out / FEEDBACK_FILE) == []


def test_the_token_leaves_the_address_and_the_page_works_on_its_cookie(page, serve_labels, candidates, tmp_path):
    out = tmp_path / "out"
    server = serve_labels(label_config(out, f"candidates={candidates['label_pairs']}"))
    requests = []
    page.on("request", lambda request: requests.append(request))
    response = page.goto(server.page_url())
    assert page.url == f"{server.base}/" and response.status == 200
    assert response.request.redirected_from.url == server.page_url()  # the one address with the token
    at(page, 0, 4, 1)
    assert page.evaluate("document.cookie") == ""                      # HttpOnly: no script can read it
    page.go_back()                                                     # the history holds no token address
    assert TOKENS["alice"] not in page.url
    page.go_forward()
    at(page, 0, 4, 1)
    page.keyboard.press("1")                                           # judging works on the cookie alone
    at(page, 1, 4, 2)
    page.reload()                                                      # so does a reload of the clean address
    at(page, 1, 4, 2)
    later = requests[1:]
    assert len(later) >= 5 and all(TOKENS["alice"] not in r.url for r in later)
    assert all("authorization" not in r.headers for r in later)
    assert [r["annotator"] for r in read_jsonl(out / LOG_FILE)] == ["alice"] and len(read_jsonl(out / FEEDBACK_FILE)) == 1
    # Another browser without the cookie, at the clean address: refused.
    other = page.context.browser.new_context()
    try:
        assert other.new_page().goto(f"{server.base}/").status == 401
    finally:
        other.close()


def test_model_text_is_shown_as_text_never_as_html(page, serve_labels, tmp_path):
    prompt = 'Say <b>hi</b><script>window.pwned = "prompt"</script>'
    responses = ['<img src=x onerror="window.pwned = 1">', '</div><h1 id="injected">big</h1>\n  two lines']
    source = tmp_path / "c.jsonl"
    source.write_text(json.dumps({"prompt": prompt, "responses": responses}) + "\n")
    server = serve_labels(label_config(tmp_path / "out", f"candidates={source}"))
    page.goto(server.page_url())
    at(page, 0, 1, 1)
    assert page.locator("#prompt .text").text_content() == prompt
    assert sorted(shown(page)) == sorted(responses)
    assert page.locator("main img, main h1, main b, main script").count() == 0
    assert page.evaluate("window.pwned") is None


def start_cli(config: Path, port: int, log: Path) -> subprocess.Popen:
    """`rlhf-ray label` as its own process; returns once it answers."""
    with open(log, "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "rlhf_ray.cli", "label", str(config), f"server.port={port}"],
                                cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env={**os.environ})
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()
        try:
            if httpx.get(f"http://127.0.0.1:{port}/api/state", params={"token": TOKENS["alice"]}).status_code == 200:
                return proc
        except httpx.TransportError:
            time.sleep(0.1)
    proc.kill()
    raise AssertionError(f"rlhf-ray label did not answer within 60 s:\n{log.read_text()}")


def test_a_crash_and_restart_loses_nothing_and_repeats_nothing(page, candidates, tmp_path):
    out, port, log = tmp_path / "out", free_port(), tmp_path / "server.log"
    config = tmp_path / "label.yaml"
    config.write_text(f"mode: pairwise\ncandidates: {candidates['label_pairs']}\noutput_dir: {out}\n"
                      f"server: {{annotators: {json.dumps(TOKENS)}}}\n")
    proc = start_cli(config, port, log)
    try:
        page.goto(f"http://127.0.0.1:{port}/?token={TOKENS['alice']}")
        for i in range(2):
            at(page, i, 4, i + 1)
            page.keyboard.press(str(shown(page).index(right_answer(page)) + 1))
        at(page, 2, 4, 3)
    finally:
        proc.kill()  # SIGKILL: no shutdown code runs
        proc.wait(timeout=30)
    assert len(read_jsonl(out / LOG_FILE)) == 2
    assert "2 / 4" not in log.read_text() and "alice: 0 / 4 done" in log.read_text()

    proc = start_cli(config, port, log)
    try:
        assert "alice: 2 / 4 done" in log.read_text()
        page.reload()
        at(page, 2, 4, 3)                       # skips what alice labeled before the crash
        expect(page.locator("#status")).to_have_text("Not labeled yet.")
        page.keyboard.press("ArrowLeft")        # and still shows it
        at(page, 2, 4, 2)
        expect(page.locator('#actions button[aria-pressed="true"]')).to_have_count(1)
        page.keyboard.press("ArrowRight")
        for i in range(2, 4):
            at(page, i, 4, i + 1)
            page.keyboard.press(str(shown(page).index(right_answer(page)) + 1))
        at(page, 4, 4, 4)
    finally:
        proc.kill()
        proc.wait(timeout=30)
    log_rows, feedback = read_jsonl(out / LOG_FILE), read_jsonl(out / FEEDBACK_FILE)
    assert len(log_rows) == 4 and len({r["item_id"] for r in log_rows}) == 4
    assert len(feedback) == 4 and all(r["chosen"] == "".join(sorted(r["input"])) for r in feedback)
    check_rm_rows(feedback, "pairwise")
