"""The Table 3 study in a browser (docs/STUDY.md): a small Flask app over `stem.study.store.AnswerStore`.

    python -m stem.app.study_server --manifest study/manifest.json --db study/answers.sqlite   # http://127.0.0.1:8000

Why Flask: the study is four server-rendered pages and a video route; Flask (with Werkzeug) gives exactly that
with a test client and no JavaScript framework, and it is a small, well-kept dependency. Gradio (this field's demo
stack) hides the request, so it could not promise that no path from a request reaches the file system or that no
method name reaches the page; FastAPI would add an ASGI server for no gain here.

Pages: `/` (the participant's id from the cookie `study_participant`, or a new random one), `/study` (the next pair:
the source and the two edits, looping muted and kept in sync by a small script, the target prompt and the paper's two
questions), `POST /answer` (both answers, each committed by `AnswerStore.answer`; 404 for a pair unknown or outside
the participant's sample, 409 for a question already answered, 400 for a missing or bad choice, each a one-line
message with nothing written), `/thanks`, and `/video/<pair>/<slot>` (slot source | left | right), which serves only
the file `AnswerStore.video` names from the manifest and the plan: nothing in the request is a path. Blinding: no
method name appears in a page, a URL or a header; the sides come from the participant's plan.

Access: 127.0.0.1 by default; `--public` binds 0.0.0.0 with a warning. With a token (`--token`), every request
needs it as `?token=...`, the header `X-Study-Token` or the cookie set after a first valid `?token=`; else 403.
"""

from __future__ import annotations

import argparse
import secrets
import sys
from datetime import datetime, timezone
from pathlib import Path

from stem.app.web import bind_address, flask_missing, import_flask, install_hint, refuse, require_token, serve
from stem.core.errors import StemError, StudyError
from stem.study.pairs import load_manifest
from stem.study.sampling import DEFAULT_PAIRS, check_participant
from stem.study.store import QUESTIONS, SIDES, AnswerStore

APP = "study app"
INSTALL = install_hint(APP)
PARTICIPANT_COOKIE = "study_participant"
TOKEN_COOKIE = "study_token"
TOKEN_HEADER = "X-Study-Token"
COOKIE_DAYS = 30   # a participant who comes back within a month continues where they stopped
QUESTION_TEXT = {   # Table 3's two columns, asked as the paper asks them
    "fidelity": "Edit fidelity: which edit follows the target prompt better?",
    "consistency": "Temporal consistency: which edit is temporally more consistent (less flicker, smoother motion)?",
}

LAYOUT = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>Video editing study</title>
<style>
body { font-family: sans-serif; margin: 1.5em auto; max-width: 72em; padding: 0 1em; background: #fafafa; }
.videos { display: flex; gap: 1em; flex-wrap: wrap; }
figure { margin: 0; flex: 1 1 14em; text-align: center; }
video { width: 100%; background: #222; border-radius: 4px; }
fieldset { margin: 1em 0; border: 1px solid #bbb; border-radius: 4px; }
.prompt { font-size: 1.3em; background: #e8f0fe; padding: .4em .8em; border-radius: 4px; }
button { font-size: 1.1em; padding: .4em 1.6em; }
</style></head><body>
{{ body }}
</body></html>
"""

START = """<h1>Video editing study</h1>
<p>You will see {{ total }} short videos. For each, the source video is shown with two edits of it, left and right,
and the text the edits should follow (the target prompt). Answer two questions for each: which edit follows the target
prompt better, and which edit is temporally more consistent (less flicker, smoother motion).</p>
<p>Your answers are saved as you go: if you close the page, come back and continue where you stopped.</p>
<p><a id="start" href="{{ url_for('study') }}"><button type="button">{{ 'Continue' if done else 'Start' }}</button></a>
{% if done %}({{ done }} of {{ total }} done){% endif %}</p>
"""

STUDY = """<h1>Video {{ index + 1 }} of {{ total }}</h1>
<p>Target prompt: <span class="prompt" id="prompt">{{ prompt }}</span></p>
<div class="videos">
{% for slot, label in (("source", "Source"), ("left", "Left"), ("right", "Right")) %}
<figure><video id="{{ slot }}" src="{{ url_for('video', pair=pair, slot=slot) }}" autoplay loop muted playsinline
 preload="auto"></video><figcaption>{{ label }}</figcaption></figure>
{% endfor %}
</div>
<form method="post" action="{{ url_for('answer') }}">
<input type="hidden" name="pair" value="{{ pair }}"><input type="hidden" name="shown_at" value="{{ shown_at }}">
{% for q in questions %}
<fieldset><legend>{{ text[q] }}</legend>
{% for side in sides %}<label><input type="radio" name="{{ q }}" value="{{ side }}" required> {{ side }}</label>
{% endfor %}</fieldset>
{% endfor %}
<button id="next" type="submit">{{ 'Finish' if index + 1 == total else 'Next' }}</button>
</form>
<script>
// Keep the three videos in step: the source leads; the edits follow it within a tenth of a second.
(function () {
  const lead = document.getElementById("source");
  const rest = [document.getElementById("left"), document.getElementById("right")];
  lead.addEventListener("play", () => rest.forEach(v => { v.currentTime = lead.currentTime; v.play(); }));
  lead.addEventListener("pause", () => rest.forEach(v => v.pause()));
  setInterval(() => rest.forEach(v => {
    if (Math.abs(v.currentTime - lead.currentTime) > 0.1) v.currentTime = lead.currentTime;
  }), 250);
})();
</script>
"""

THANKS = """<h1 id="thanks">Thank you!</h1>
<p>You answered all {{ total }} videos; your answers are saved. You may close this page.</p>
"""


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def _shown_at(value) -> str | None:
    """The time the page was shown, as the form sent it back: kept only when it is an ISO 8601 time."""
    if not isinstance(value, str) or len(value) > 40:
        return None
    try:
        datetime.fromisoformat(value)
    except ValueError:
        return None
    return value


def create_app(manifest_path, db_path, seed: int = 0, n: int = DEFAULT_PAIRS, token: str | None = None):
    """The study's Flask app: the pairs of the manifest at `manifest_path`, answers in the SQLite file `db_path`,
    each participant's `n` pairs drawn with `seed` (`stem.study.sampling`). `token`: when set, every request needs
    it. StudyError (one line) for a bad manifest or a database of another study; StemError without Flask."""
    flask = import_flask(APP)
    from flask import redirect, render_template_string, request, send_file, url_for

    manifest = load_manifest(manifest_path)
    db_path = Path(db_path)
    AnswerStore(db_path, manifest, seed=seed, n=n).close()   # a database of another study: refused now, not later
    prompts = {p["id"]: p["prompt"] for p in manifest["pairs"]}

    app = flask.Flask(__name__)
    require_token(app, token, cookie=TOKEN_COOKIE, header=TOKEN_HEADER,
                  refusal="this study needs its access token: open the link you were given")

    def store() -> AnswerStore:
        """One connection per request (SQLite connections stay in the thread that made them), closed after it."""
        if "store" not in flask.g:
            flask.g.store = AnswerStore(db_path, manifest, seed=seed, n=n)
        return flask.g.store

    @app.teardown_appcontext
    def close_store(_exc):
        opened = flask.g.pop("store", None)
        if opened is not None:
            opened.close()

    def page(template: str, **values):
        return render_template_string(LAYOUT.replace("{{ body }}", template), **values)   # autoescaped

    @app.after_request
    def remember(response):
        participant = getattr(flask.g, "new_participant", None)
        if participant:
            response.set_cookie(PARTICIPANT_COOKIE, participant, max_age=COOKIE_DAYS * 86400, httponly=True,
                                samesite="Lax")
        response.headers["Cache-Control"] = "no-store"
        return response

    def participant(create: bool) -> str | None:
        """The participant of this request: the cookie's id when usable; else a new random one (`create`) or None."""
        given = request.cookies.get(PARTICIPANT_COOKIE)
        try:
            return check_participant(given)
        except StudyError:
            pass
        if not create:
            return None
        flask.g.new_participant = secrets.token_hex(8)
        return flask.g.new_participant

    @app.get("/")
    def start():
        where = store().progress(participant(create=True))
        return page(START, total=where["total"], done=where["done"])

    @app.get("/study")
    def study():
        who = participant(create=False)
        if who is None:
            return redirect(url_for("start"))
        where = store().progress(who)
        if where["finished"]:
            return redirect(url_for("thanks"))
        pair = where["plan"][where["next"]]["pair"]
        return page(STUDY, index=where["next"], total=where["total"], pair=pair, prompt=prompts[pair],
                    questions=where["remaining"], text=QUESTION_TEXT, sides=SIDES, shown_at=_now())

    @app.post("/answer")
    def answer():
        who = participant(create=False)
        if who is None:
            refuse(400, "no participant: open the study's start page first (cookies must be on)")
        pair = request.form.get("pair", "")
        where = store().progress(who)
        if pair not in {p["pair"] for p in where["plan"]}:
            refuse(404, f"unknown pair {pair[:80]!r} for this participant; nothing recorded")
        done = where["answered"].get(pair, [])
        given = {q: request.form.get(q) for q in QUESTIONS if q in request.form}
        if any(q in done for q in given):
            refuse(409, "this video was already answered: one answer per question; nothing recorded")
        todo = [q for q in QUESTIONS if q not in done]
        bad = [q for q in todo if given.get(q) not in SIDES]
        if bad:
            refuse(400, f"choose left or right for {' and '.join(bad)}; nothing recorded")
        shown_at = _shown_at(request.form.get("shown_at"))
        try:
            for q in todo:
                store().answer(who, pair, q, given[q], shown_at=shown_at)
        except StudyError as e:   # a second tab answered between the check and the write
            refuse(409, str(e))
        return redirect(url_for("study"), code=303)

    @app.get("/thanks")
    def thanks():
        who = participant(create=False)
        if who is None:
            return redirect(url_for("start"))
        where = store().progress(who)
        if not where["finished"]:
            return redirect(url_for("study"))
        return page(THANKS, total=where["total"])

    @app.get("/video/<pair>/<slot>")
    def video(pair: str, slot: str):
        who = participant(create=False)
        if who is None:
            refuse(404, "no such video")
        try:
            path = store().video(who, pair, slot)   # the manifest's file for this plan: nothing here is a path
        except StudyError:
            refuse(404, "no such video")
        if not path.is_file():
            refuse(404, "the study's video is missing on the server")
        response = send_file(path, mimetype="video/mp4", conditional=True, etag=False, max_age=0,
                             download_name=f"{slot}.mp4")
        response.headers.pop("Last-Modified", None)   # a file's time could tell the two edits apart
        return response

    return app


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stem.app.study_server", description=__doc__.split("\n")[0])
    parser.add_argument("--manifest", required=True, help="study/manifest.json (scripts/make_study.py)")
    parser.add_argument("--db", required=True, help="the answers' SQLite file (created when missing)")
    parser.add_argument("--host", default=None, help="address to bind (default 127.0.0.1; another needs --public)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--seed", type=int, default=0, help="the study's seed (each participant's pairs and sides)")
    parser.add_argument("--n", type=int, default=DEFAULT_PAIRS, help="pairs per participant (the paper: 12)")
    parser.add_argument("--token", default=None, help="access token every request must carry (?token=...)")
    parser.add_argument("--public", action="store_true", help="serve on the network (0.0.0.0): anyone reaching it")
    args = parser.parse_args(argv)
    if flask_missing(APP):
        return 2
    try:
        host = bind_address(args.host, args.public, "the study")
        app = create_app(args.manifest, args.db, seed=args.seed, n=args.n, token=args.token)
    except StemError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return serve(app, host, args.port, public=args.public, token=args.token,
                 warning="the study is served on the network ({address}): anyone who can reach this machine can "
                         "open it and answer",
                 banner=f"study: {{link}}  (Ctrl+C stops it; answers are saved in {args.db} as they come)")


if __name__ == "__main__":
    sys.exit(main())
