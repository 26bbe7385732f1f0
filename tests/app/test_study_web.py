"""The study web app (stem/app/study_server.py): Flask test-client tests of blinding, the video route's refusals,
answers refused twice, a reload or restart continuing, the access token and the CLI; and one real-browser test
(headless Chromium via selenium) answering a whole study by clicking. The study is built by `write_study` from the
fake sweep of tests/study/study_fakes.py: 16 pairs (4 clips x 2 prompts x 2 comparisons), 12 per participant."""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time

import pytest
from conftest import ROOT
from study_fakes import SOURCE_LEVEL, make_job
from web_helpers import browser, not_blank, public_server

from stem.study.pairs import write_study
from stem.study.store import AnswerStore, read_answers

flask = pytest.importorskip("flask", reason="the study app needs Flask: pip install 'stem[app]'")

from stem.app.study_server import PARTICIPANT_COOKIE, TOKEN_COOKIE, create_app  # noqa: E402

METHOD_WORDS = re.compile(r"stem|fate|token|flow|tune", re.IGNORECASE)   # any trace of a method's name
PROMPTS = ("in van gogh style", "made of lego")
N = 12


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """(manifest path, manifest) of 16 pairs: FateZero and TokenFlow pairs on 4 clips with 2 target prompts each."""
    root = tmp_path_factory.mktemp("web")
    job = 0
    for clip in SOURCE_LEVEL:
        for prompt in PROMPTS:
            for row in ("fatezero", "stem_fatezero", "tokenflow", "stem_tokenflow"):
                make_job(root / "sweep", job, row, clip, f"a {clip} {prompt}")
                job += 1
    manifest = write_study([root / "sweep"], root / "study")
    assert len(manifest["pairs"]) == 16
    return root / "study" / "manifest.json", manifest


def client_of(study, tmp_path, **kwargs):
    app = create_app(study[0], tmp_path / "answers.sqlite", n=N, **kwargs)
    return app.test_client()


def answer_all(client, count: int) -> list[str]:
    """Answer `count` pairs as the page asks (fidelity left, consistency right); returns the pairs answered."""
    pairs = []
    for _ in range(count):
        page = client.get("/study").get_data(as_text=True)
        pair = re.search(r'name="pair" value="([^"]+)"', page).group(1)
        response = client.post("/answer", data={"pair": pair, "fidelity": "left", "consistency": "right"})
        assert response.status_code == 303, response.get_data(as_text=True)
        pairs.append(pair)
    return pairs


def test_no_page_url_or_header_names_a_method_and_each_slot_serves_the_plans_file(study, tmp_path):
    """A whole study through the test client: no page, link, redirect or header carries a method name (not even a
    part: stem, fate, token, flow, tune), and each page's left/right video is byte for byte the edit of the method
    the participant's plan put on that side. Bug caught: a method name in a URL or file name (blinding broken), or
    the two sides swapped between the page and the database."""
    client = client_of(study, tmp_path)
    start = client.get("/")
    assert start.status_code == 200 and "Start" in start.get_data(as_text=True)
    who = client.get_cookie(PARTICIPANT_COOKIE).value
    with AnswerStore(tmp_path / "answers.sqlite", study[1], n=N) as store:
        plan = store.plan(who)
    by_id = {p["id"]: p for p in study[1]["pairs"]}
    seen = [start]
    for index in range(N):
        page = client.get("/study")
        html = page.get_data(as_text=True)
        seen.append(page)
        assert f"Video {index + 1} of {N}" in html and by_id[plan[index]["pair"]]["prompt"] in html
        urls = re.findall(r'src="([^"]+)"', html)
        assert urls == [f"/video/{plan[index]['pair']}/{slot}" for slot in ("source", "left", "right")]
        assert all('autoplay loop muted playsinline' in tag for tag in re.findall(r"<video[^>]*>", html))
        for slot, url in zip(("source", "left", "right"), urls):
            video = client.get(url)
            seen.append(video)
            entry = by_id[plan[index]["pair"]]
            expected = entry["source"] if slot == "source" else entry["videos"][plan[index][slot]]
            assert video.status_code == 200 and video.mimetype == "video/mp4"
            assert video.data == open(expected, "rb").read()
        posted = client.post("/answer", data={"pair": plan[index]["pair"], "fidelity": "left",
                                              "consistency": "right"})
        assert posted.status_code == 303
        seen.append(posted)
    thanks = client.get("/study", follow_redirects=True)
    assert thanks.request.path == "/thanks" and "Thank you" in thanks.get_data(as_text=True)
    seen.append(thanks)
    for response in seen:
        text = "" if response.mimetype == "video/mp4" else response.get_data(as_text=True)
        headers = "\n".join(f"{k}: {v}" for k, v in response.headers.items())
        assert not METHOD_WORDS.search(text + headers + response.request.url), (response.request.url, headers)
    rows, _ = read_answers(tmp_path / "answers.sqlite")
    assert len(rows) == 2 * N
    assert all(r["chosen"] == (r["left_method"] if r["question"] == "fidelity" else r["right_method"]) for r in rows)


@pytest.mark.parametrize("url", [
    "/video/..%2F..%2F..%2Fetc%2Fpasswd/left",   # ../ in the pair
    "/video/%2Fetc%2Fpasswd/source",              # an absolute path as the pair
    "/video//etc/passwd/left",                    # an absolute path in the URL
    "/video/../manifest.json/left",
    "/video/{pair}/..%2F..%2Fmanifest.json",      # ../ in the slot
    "/video/{pair}/comparison",                   # a slot that is no slot
    "/video/{pair}/FateZero",                     # a method name as the slot
    "/video/{other}/left",                        # a pair outside this participant's sample
])
def test_the_video_route_serves_nothing_but_the_plans_files(study, tmp_path, url):
    """404 with no file content for every path-like or foreign request. Bug caught: a request's text joined onto a
    folder (path traversal), or a participant fetching another participant's pairs."""
    client = client_of(study, tmp_path)
    client.get("/")
    who = client.get_cookie(PARTICIPANT_COOKIE).value
    with AnswerStore(tmp_path / "answers.sqlite", study[1], n=N) as store:
        mine = [p["pair"] for p in store.plan(who)]
    other = next(p["id"] for p in study[1]["pairs"] if p["id"] not in mine)
    response = client.get(url.format(pair=mine[0], other=other))
    assert response.status_code == 404
    assert b"root:" not in response.data and b"pairs" not in response.data and response.mimetype != "video/mp4"


def test_a_video_without_a_participant_is_refused(study, tmp_path):
    pair = study[1]["pairs"][0]["id"]
    assert client_of(study, tmp_path).get(f"/video/{pair}/source").status_code == 404


def test_bad_answers_are_refused_with_one_line_and_nothing_written(study, tmp_path):
    """A second answer to a pair: 409; an unknown pair or one outside the sample: 404; a missing or bad choice: 400;
    each one line of text with the database unchanged. Bug caught: a double-counted answer, or half of a bad form
    written (fidelity stored, consistency refused)."""
    client = client_of(study, tmp_path)
    client.get("/")
    (pair,) = answer_all(client, 1)
    who = client.get_cookie(PARTICIPANT_COOKIE).value
    with AnswerStore(tmp_path / "answers.sqlite", study[1], n=N) as store:
        mine = [p["pair"] for p in store.plan(who)]
    other = next(p["id"] for p in study[1]["pairs"] if p["id"] not in mine)
    cases = [({"pair": pair, "fidelity": "right", "consistency": "left"}, 409),
             ({"pair": pair, "fidelity": "right"}, 409),
             ({"pair": "nope", "fidelity": "left", "consistency": "left"}, 404),
             ({"pair": other, "fidelity": "left", "consistency": "left"}, 404),
             ({"pair": mine[1], "fidelity": "left"}, 400),
             ({"pair": mine[1], "fidelity": "left", "consistency": "FateZero"}, 400),
             ({"pair": mine[1], "fidelity": "middle", "consistency": "left"}, 400)]
    for form, status in cases:
        response = client.post("/answer", data=form)
        body = response.get_data(as_text=True)
        assert response.status_code == status and body.endswith("\n") and body.count("\n") == 1, (form, body)
        assert "nothing recorded" in body
    rows, _ = read_answers(tmp_path / "answers.sqlite")
    assert [(r["pair"], r["question"], r["side"]) for r in rows] == [(pair, "fidelity", "left"),
                                                                     (pair, "consistency", "right")]


def test_a_reload_or_a_restarted_server_continues_where_the_participant_stopped(study, tmp_path):
    """3 pairs answered, then a new app on the same database (a restart) and the same cookie (a reload): the page
    shows video 4, the 4th pair of the plan; the start page says 3 of 12 done. Bug caught: progress kept in memory,
    or a restart drawing another plan."""
    client = client_of(study, tmp_path)
    client.get("/")
    done = answer_all(client, 3)
    who = client.get_cookie(PARTICIPANT_COOKIE).value
    again = client_of(study, tmp_path)
    again.set_cookie(PARTICIPANT_COOKIE, who)
    assert "(3 of 12 done)" in again.get("/").get_data(as_text=True)
    html = again.get("/study").get_data(as_text=True)
    with AnswerStore(tmp_path / "answers.sqlite", study[1], n=N) as store:
        plan = store.plan(who)
    assert [p["pair"] for p in plan[:3]] == done
    assert "Video 4 of 12" in html and f'name="pair" value="{plan[3]["pair"]}"' in html


def test_a_new_visitor_gets_a_new_id_and_a_bad_cookie_is_replaced(study, tmp_path):
    one, two = client_of(study, tmp_path), client_of(study, tmp_path)
    one.get("/"), two.get("/")
    assert one.get_cookie(PARTICIPANT_COOKIE).value != two.get_cookie(PARTICIPANT_COOKIE).value
    bad = client_of(study, tmp_path)
    bad.set_cookie(PARTICIPANT_COOKIE, "x" * 500)
    bad.get("/")
    assert len(bad.get_cookie(PARTICIPANT_COOKIE).value) == 16
    fresh = client_of(study, tmp_path)
    assert fresh.get("/study").status_code == 302   # no participant yet: to the start page


def test_the_access_token_is_needed_on_every_route(study, tmp_path):
    """With a token: 403 without it or with a wrong one (pages, answers, videos); accepted as ?token=, as the header
    X-Study-Token, and as the cookie a first valid ?token= sets. Bugs caught: a route outside the check, and a wrong
    ?token= answered 403 but with the right token's cookie (the refusal's response went through after_request)."""
    client = client_of(study, tmp_path, token="s3cret")
    pair = study[1]["pairs"][0]["id"]
    for url in ("/", "/study", "/thanks", f"/video/{pair}/source", "/?token=wrong"):
        assert client.get(url).status_code == 403, url
    assert client.post("/answer", data={"pair": pair}).status_code == 403
    assert client.get_cookie(TOKEN_COOKIE) is None   # a refused ?token= sets no cookie
    assert client.get("/", headers={"X-Study-Token": "s3cret"}).status_code == 200
    assert client.get("/?token=s3cret").status_code == 200
    assert client.get("/study").status_code == 200   # the cookie now carries it
    rows, _ = read_answers(tmp_path / "answers.sqlite")
    assert rows == []


def run_cli(*args, block_flask=False, timeout=60):
    code = ("import sys\n" + ("sys.modules['flask'] = None\n" if block_flask else "") +
            "from stem.app.study_server import main\nsys.exit(main(sys.argv[1:]))")
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def test_cli_without_flask_says_which_extra_to_install(study, tmp_path):
    proc = run_cli("--manifest", study[0], "--db", tmp_path / "a.sqlite", block_flask=True)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "the study app needs Flask: pip install 'stem[app]'"]


def test_cli_refuses_a_network_address_without_public_and_a_bad_manifest(study, tmp_path):
    proc = run_cli("--manifest", study[0], "--db", tmp_path / "a.sqlite", "--host", "0.0.0.0")
    assert proc.returncode == 2 and "--public" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    proc = run_cli("--manifest", tmp_path / "none.json", "--db", tmp_path / "a.sqlite")
    assert proc.returncode == 2 and proc.stderr.startswith("error: manifest not found")
    assert not (tmp_path / "a.sqlite").exists()


def test_cli_public_binds_every_interface_with_a_warning(study, tmp_path):
    """`--public --port 0`: a warning on stderr naming 0.0.0.0 and the missing token; the link printed answers."""
    status, err = public_server("stem.app.study_server", "--manifest", study[0], "--db", tmp_path / "a.sqlite")
    assert status == 200
    assert "WARNING" in err and "0.0.0.0" in err and "no --token" in err


def test_a_real_browser_answers_twelve_pairs_and_sees_the_thank_you_page(study, tmp_path):
    """Headless Chromium against the app served on a free port: start, click both answers on 12 pages (alternating
    sides), see the thank-you page; the database then holds 24 answers with the sides clicked, and the videos of a
    study page were decoded and playing. Screenshots of the study and thank-you pages are not blank. Bug caught:
    a page that works in the test client but not in a browser (form, cookies, redirects, video range requests)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait
    from werkzeug.serving import make_server

    driver = browser()
    server = make_server("127.0.0.1", 0, create_app(study[0], tmp_path / "answers.sqlite", n=N), threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    clicked = []
    try:
        wait = WebDriverWait(driver, 20)
        driver.get(f"http://127.0.0.1:{server.server_port}/")
        driver.find_element(By.ID, "start").click()
        for index in range(N):
            wait.until(ec.text_to_be_present_in_element((By.TAG_NAME, "h1"), f"Video {index + 1} of {N}"))
            if index == 0:
                playing = ("return ['source', 'left', 'right'].every(id => {const v = document.getElementById(id);"
                           " return v.readyState >= 2 && v.videoWidth === 32 && !v.paused;})")
                wait.until(lambda d: d.execute_script(playing))
                driver.save_screenshot(str(tmp_path / "study.png"))
            pair = driver.find_element(By.NAME, "pair").get_attribute("value")
            sides = ("left", "right") if index % 2 == 0 else ("right", "left")
            for question, side in zip(("fidelity", "consistency"), sides):
                driver.find_element(By.CSS_SELECTOR, f'input[name="{question}"][value="{side}"]').click()
            clicked.append((pair, sides))
            button = driver.find_element(By.ID, "next")
            button.click()
            wait.until(ec.staleness_of(button))
        wait.until(ec.presence_of_element_located((By.ID, "thanks")))
        driver.save_screenshot(str(tmp_path / "thanks.png"))
        who = driver.get_cookie(PARTICIPANT_COOKIE)["value"]
    finally:
        driver.quit()
        server.shutdown()
        thread.join(10)
    rows, _ = read_answers(tmp_path / "answers.sqlite")
    assert len(rows) == 2 * N and {r["participant"] for r in rows} == {who}
    got = {(r["pair"], r["question"]): r["side"] for r in rows}
    assert got == {(p, q): s for p, sides in clicked for q, s in zip(("fidelity", "consistency"), sides)}
    assert not_blank(tmp_path / "study.png") > 10 and not_blank(tmp_path / "thanks.png") > 5


def test_serving_a_study_to_many_participants_at_once_loses_no_answer(study, tmp_path):
    """4 participants answering at once through a threaded server: 4 x 24 answers, none lost or doubled."""
    import http.cookiejar
    import urllib.parse
    import urllib.request

    from werkzeug.serving import make_server

    server = make_server("127.0.0.1", 0, create_app(study[0], tmp_path / "answers.sqlite", n=N), threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{server.server_port}"
    errors = []

    def participant():
        try:
            opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))
            opener.open(base + "/", timeout=30).read()
            for _ in range(N):
                html = opener.open(base + "/study", timeout=30).read().decode()
                pair = re.search(r'name="pair" value="([^"]+)"', html).group(1)
                data = urllib.parse.urlencode({"pair": pair, "fidelity": "left", "consistency": "left"}).encode()
                opener.open(base + "/answer", data=data, timeout=30).read()
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(repr(e))

    started = time.monotonic()
    workers = [threading.Thread(target=participant) for _ in range(4)]
    try:
        for w in workers:
            w.start()
        for w in workers:
            w.join(120)
    finally:
        server.shutdown()
        thread.join(10)
    assert errors == [] and time.monotonic() - started < 120
    rows, _ = read_answers(tmp_path / "answers.sqlite")
    assert len(rows) == 4 * 2 * N and len({(r["participant"], r["pair"], r["question"]) for r in rows}) == len(rows)
