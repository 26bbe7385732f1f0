"""The demo in a browser (docs/DEMO.md): pick a clip or upload one, an inversion and what to do, watch the job run,
see the source and the result side by side with their metrics.

    stem-demo                                   # tiny random model on the CPU: http://127.0.0.1:8000
    stem-demo model=sd15 device=cuda            # real weights on a GPU; overrides apply to every job

Pages: `/` (the form), `POST /run` (each field checked by `stem.app.demo_form.parse_form`, an upload by
`stem.app.demo_uploads.UploadStore`: a refusal is the form again with one line, HTTP 400 or 413, nothing written;
409 while a job runs), `/job/<id>` (progress, polling `/job/<id>/status`, then the result),
`/job/<id>/file/<name>` (only the files of `RESULT_FILES`, from that job's run folder: nothing in a request is a
path). Jobs run through run.py's own task function (`stem.app.demo_jobs`).

Access: 127.0.0.1 by default; `--public` binds 0.0.0.0 with a warning (anyone reaching it can run jobs on this
machine and upload files); `--token` makes every request need it (`?token=...`, header `X-Demo-Token`, or the cookie
set after a first valid `?token=`).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from stem.app.web import bind_address, flask_missing, import_flask, install_hint, refuse, require_token, serve
from stem.core.errors import StemError

APP = "demo app"
INSTALL = install_hint(APP)
TOKEN_COOKIE = "demo_token"
TOKEN_HEADER = "X-Demo-Token"
RESULT_FILES = ("source.mp4", "reconstruction.mp4", "edited.mp4", "comparison.mp4", "bases_per_layer.png",
                "metrics.json", "run.log")
MEDIA_TYPES = {".mp4": "video/mp4", ".png": "image/png", ".json": "application/json", ".log": "text/plain"}
RANDOM_WARNING = ("Random weights (model={model}): numbers from random weights show the mechanics, not the paper's "
                  "values. A random VAE cannot reproduce a photo, so the videos look like noise; run "
                  "stem-demo model=sd15 device=cuda for real results.")
DEFAULTS = {"max_frames": 16, "max_upload_mb": 50.0, "max_upload_frames": 300, "max_side": 1024}
UPLOADS = "uploads"

LAYOUT = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>STEM inversion demo</title>
<style>
body { font-family: sans-serif; margin: 1.2em auto; max-width: 76em; padding: 0 1em; background: #fafafa; }
.warning { background: #fff4ce; border: 1px solid #e0c060; padding: .5em .8em; border-radius: 4px; }
.error { background: #fde2e1; border: 1px solid #d9534f; padding: .5em .8em; border-radius: 4px; }
form { display: grid; grid-template-columns: 12em 1fr; gap: .6em 1em; align-items: center; max-width: 56em; }
input[type=text] { width: 100%; } .hint { color: #666; font-size: .9em; }
.videos { display: flex; gap: 1em; flex-wrap: wrap; }
.row { display: flex; gap: 1.5em; flex-wrap: wrap; align-items: flex-start; }
.row > .videos { flex: 0 1 42em; }
figure { margin: 0; flex: 1 1 16em; max-width: 20em; text-align: center; }
video { width: 100%; background: #222; border-radius: 4px; }
table { border-collapse: collapse; } td, th { border: 1px solid #ccc; padding: .2em .6em; text-align: left; }
pre { background: #eee; padding: .5em; white-space: pre-wrap; max-height: 16em; overflow: auto; }
button { font-size: 1.1em; padding: .3em 1.4em; } code { background: #eee; padding: 0 .2em; }
</style></head><body>
<h1><a href="{{ url_for('form') }}" style="color: inherit; text-decoration: none">STEM inversion demo</a></h1>
{% if random_warning %}<p class="warning" id="random-warning">{{ random_warning }}</p>{% endif %}
{{ body }}
</body></html>
"""

FORM = """{% if error %}<p class="error" id="error">{{ error }}</p>{% endif %}
<form method="post" action="{{ url_for('run') }}" enctype="multipart/form-data" id="demo-form">
<label for="clip">Clip</label>
<select name="clip" id="clip">
{% for name, (path, prompt, edit_prompt, present) in clips.items() %}
<option value="{{ name }}" data-prompt="{{ prompt }}" data-target="{{ edit_prompt or '' }}"
 {% if not present %}disabled{% endif %} {% if values.clip == name %}selected{% endif %}>{{ name }}{% if not present
 %} (not found under paths.data_root: python scripts/download_clips.py){% endif %}</option>
{% endfor %}
<option value="upload" {% if values.clip == 'upload' %}selected{% endif %}>upload a clip</option>
</select>
<label for="video">Upload</label>
<span><input type="file" name="video" id="video" accept="{{ suffixes }}"> <span class="hint">{{ limits }}</span></span>
<label for="prompt">Source prompt</label><input type="text" name="prompt" id="prompt" value="{{ values.prompt }}">
<label for="inversion">Inversion</label>
<select name="inversion" id="inversion">
{% for value, label in inversions.items() %}<option value="{{ value }}" {% if values.inversion == value %}selected{%
 endif %}>{{ label }}</option>{% endfor %}
</select>
<label for="k">K (STEM bases)</label>
<span><input type="text" name="k" id="k" value="{{ values.k }}" list="k-choices" size="6">
<datalist id="k-choices">{% for k in k_choices %}<option value="{{ k }}">{% endfor %}</datalist>
<span class="hint">128, 256 (paper), 512 or any number from {{ k_range[0] }} to {{ k_range[1] }}; used by "STEM with
K bases"</span></span>
<label for="action">What to do</label>
<select name="action" id="action">
{% for value, label in actions.items() %}<option value="{{ value }}" {% if values.action == value %}selected{%
 endif %}>{{ label }}</option>{% endfor %}
</select>
<label for="target">Target prompt</label><input type="text" name="target" id="target" value="{{ values.target }}">
<label for="steps">DDIM steps</label>
<span><input type="number" name="steps" id="steps" value="{{ values.steps }}" min="{{ steps_range[0] }}"
 max="{{ steps_range[1] }}"> <span class="hint">{{ steps_range[0] }} to {{ steps_range[1] }} (paper: 50)</span></span>
<label for="frames">Frames</label>
<span><input type="number" name="frames" id="frames" value="{{ values.frames }}" min="{{ min_frames }}"
 max="{{ max_frames }}"> <span class="hint">{{ min_frames }} to {{ max_frames }} (the first frames of a clip)</span>
</span>
<span></span><span><button type="submit" id="submit">Run</button>
<span class="hint">model {{ model }} on {{ device }}; one job at a time</span></span>
</form>
<script>
// A sample clip fills in its prompts (the configs/data preset's); typed prompts are kept when the upload is chosen.
document.getElementById("clip").addEventListener("change", e => {
  const o = e.target.selectedOptions[0];
  if (o.dataset.prompt) { document.getElementById("prompt").value = o.dataset.prompt;
                          document.getElementById("target").value = o.dataset.target; }
});
</script>
{% if jobs %}<h2>Jobs</h2><ul>{% for job in jobs %}<li><a href="{{ url_for('job_page', job_id=job.id) }}">{{
 job.request.describe() }}</a>: {{ job.state }}</li>{% endfor %}</ul>{% endif %}
"""

JOB = """<h2 id="title">{{ job.request.describe() }}</h2>
<p>Same as <code id="command">{{ job.command() }}</code></p>
{% if job.state in ('queued', 'running') %}
<p id="progress">{{ status.phase }}</p>
<pre id="log">{{ status.log | join('\\n') }}</pre>
<script>
// Poll the job's status; reload the page (with its result) once the job has ended.
(function poll() {
  fetch("{{ url_for('job_status', job_id=job.id) }}", {cache: "no-store"}).then(r => r.json()).then(s => {
    if (s.state === "done" || s.state === "failed") { location.reload(); return; }
    const step = s.step ? ` ${s.step[0]}/${s.step[1] === null ? "?" : s.step[1]}` : "";
    document.getElementById("progress").textContent = `${s.phase}${step} (${s.elapsed_s} s)`;
    document.getElementById("log").textContent = s.log.join("\\n");
    setTimeout(poll, 500);
  }).catch(() => setTimeout(poll, 2000));
})();
</script>
{% elif job.state == 'failed' %}
<p class="error" id="error">{{ job.error }}</p>
<pre id="log">{{ status.log | join('\\n') }}</pre>
{% else %}
<div class="row">
<div class="videos" id="result">
{% for name, label in videos %}
<figure><video id="video-{{ loop.index0 }}" src="{{ url_for('job_file', job_id=job.id, name=name) }}" autoplay loop
 muted playsinline preload="auto"></video><figcaption>{{ label }}</figcaption></figure>
{% endfor %}
</div>
<div><h3 style="margin-top: 0">Metrics</h3>
<table id="metrics">{% for label, value in scores %}<tr><th>{{ label }}</th><td>{{ value }}</td></tr>{% endfor %}
</table></div>
</div>
<p id="cache">{{ cache }}</p>
{% if bases %}
<h3>K per layer (STEM bases)</h3>
<div class="row">
<table id="bases"><tr><th>layer</th>{% for phase in bases.phases %}<th>K ({{ phase }})</th>{% endfor %}</tr>
{% for layer, ks in bases.rows %}<tr><td>{{ layer }}</td>{% for k in ks %}<td>{{ k }}</td>{% endfor %}</tr>{% endfor %}
</table>
{% if bases.plot %}<img id="bases-plot" src="{{ url_for('job_file', job_id=job.id, name='bases_per_layer.png') }}"
 alt="bases per layer" style="max-width: 40em; flex: 1 1 20em">{% endif %}
</div>
{% endif %}
<p>Run folder: <code>{{ job.run_dir }}</code> (<a href="{{ url_for('job_file', job_id=job.id, name='metrics.json')
 }}">metrics.json</a>, <a href="{{ url_for('job_file', job_id=job.id, name='run.log') }}">run.log</a>)</p>
<script>
// Keep the videos in step: the first leads; the others follow it within a tenth of a second.
(function () {
  const all = Array.from(document.querySelectorAll("#result video"));
  const lead = all[0], rest = all.slice(1);
  lead.addEventListener("play", () => rest.forEach(v => { v.currentTime = lead.currentTime; v.play(); }));
  setInterval(() => rest.forEach(v => {
    if (Math.abs(v.currentTime - lead.currentTime) > 0.1) v.currentTime = lead.currentTime;
  }), 250);
})();
</script>
{% endif %}
"""


def _number(value, digits: int = 4) -> str:
    return f"{value:.{digits}g}" if isinstance(value, (int, float)) else str(value)


def result_scores(metrics: dict) -> list[tuple[str, str]]:
    """The rows of the result's metrics table, from metrics.json: PSNR/SSIM vs the source (a reconstruction's, or
    for an edit the plain reconstruction of its inverted latents, `report_reconstruction`), vs the VAE round
    trip, and an edit's CLIP score, frame consistency and warp error where present."""
    rows = []
    for prefix, what in (("vs_input", "reconstruction vs source"), ("vs_vae", "reconstruction vs VAE round trip"),
                         ("reconstruction_vs_input", "reconstruction of the inverted latents vs source"),
                         ("reconstruction_vs_vae", "reconstruction of the inverted latents vs VAE round trip"),
                         ("vae_vs_input", "VAE round trip vs source (the ceiling)")):
        section = metrics.get(prefix)
        if isinstance(section, dict) and "psnr" in section:
            rows.append((f"PSNR, {what}", f"{_number(section['psnr'])} dB"))
            rows.append((f"SSIM, {what}", _number(section.get("ssim"))))
    edit = [("clip", "clip_score", "CLIP score (target prompt)"), ("clip", "frame_consistency", "CLIP frame "
            "consistency"), ("warp_error", "warp_error", "warp error (x1e-3)")]
    for section, key, label in edit:
        if isinstance(metrics.get(section), dict) and key in metrics[section]:
            rows.append((label, _number(metrics[section][key])))
    seconds = metrics.get("seconds", {})
    for key in ("inversion", "reconstruction", "editing"):
        if key in seconds:
            rows.append((f"seconds, {key}", _number(seconds[key], 3)))
    return rows


def cache_line(metrics: dict) -> str:
    cache = metrics.get("inversion_cache") or {}
    if cache.get("hit"):
        return f"Inversion: from the cache (entry {cache.get('key')}): not inverted again."
    if cache.get("path"):
        return f"Inversion: computed now and cached (entry {cache.get('key')}): the next job on this clip reuses it."
    return "Inversion: computed now, not cached (use_cache=false)."


def bases_table(metrics: dict, run_dir: Path) -> dict | None:
    """{"phases", "rows": [(layer, [K per phase])], "plot"} from metrics.json's `bases` (STEM runs), else None.
    A layer's K is one number, or "min-max" when it changed over the steps (auto K chosen every step)."""
    section = metrics.get("bases")
    if not isinstance(section, dict):
        return None
    phases = [p for p in ("inversion", "reconstruction") if isinstance(section.get(p), dict)]
    if not phases:
        return None
    layers = list(dict.fromkeys(layer for p in phases for layer in section[p].get("layers", {})))

    def k_of(phase: str, layer: str) -> str:
        ks = (section[phase].get("layers", {}).get(layer) or {}).get("k") or []
        return "-" if not ks else str(ks[0]) if min(ks) == max(ks) else f"{min(ks)}-{max(ks)}"

    short = [layer.replace(".transformer_blocks.0.attn1", "") for layer in layers]
    return {"phases": phases, "rows": [(s, [k_of(p, layer) for p in phases]) for s, layer in zip(short, layers)],
            "plot": (run_dir / "bases_per_layer.png").is_file()}


def create_app(out, command_line: list[str] | None = None, *, token: str | None = None,
               max_frames: int = DEFAULTS["max_frames"], max_upload_mb: float = DEFAULTS["max_upload_mb"],
               max_upload_frames: int = DEFAULTS["max_upload_frames"], max_side: int = DEFAULTS["max_side"],
               task=None):
    """The demo's Flask app: run folders, the inversion cache and uploads under `out`, the Hydra overrides
    `command_line` applied to every job (ConfigError here for one the form owns, or one that does not compose).
    `task`: the function that runs a job's config (run.py's `stem.app.launch.task`; tests may pass their own)."""
    flask = import_flask(APP)
    from flask import redirect, render_template_string, request, send_file, url_for
    from werkzeug.exceptions import RequestEntityTooLarge

    from stem.app import demo_form
    from stem.app.demo_jobs import Busy, JobRunner, check_command_line, demo_overrides, read_setup
    from stem.app.demo_uploads import SUFFIXES, UploadStore

    out = Path(out)
    command_line = list(command_line or [])
    check_command_line(command_line)
    setup = read_setup([*demo_overrides(out, False, False), *command_line])
    runner = JobRunner(out, command_line, setup, task=task)
    uploads = UploadStore(out / UPLOADS, max_mb=max_upload_mb, max_frames=max_upload_frames, max_side=max_side)
    clips = {name: present for name, (_, _, _, present) in setup.clips.items()}
    warning = RANDOM_WARNING.format(model=setup.model) if setup.random_model else None

    app = flask.Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = uploads.max_bytes + (1 << 20)   # the form's fields besides the file
    require_token(app, token, cookie=TOKEN_COOKIE, header=TOKEN_HEADER,
                  refusal="this demo needs its access token: open the link you were given")

    def page(template: str, code: int = 200, **values):
        html = render_template_string(LAYOUT.replace("{{ body }}", template), random_warning=warning, **values)
        return html, code

    synthetic = setup.clips["synthetic"]
    blank = {"clip": "synthetic", "prompt": synthetic[1], "target": synthetic[2] or "", "inversion": "stem",
             "k": "256", "action": "reconstruct", "steps": setup.steps, "frames": min(setup.frames, max_frames)}

    def form_page(values: dict | None = None, error: str | None = None, code: int = 200):
        return page(FORM, code, clips=setup.clips, values={**blank, **(values or {})}, error=error,
                    inversions=demo_form.INVERSIONS, actions=demo_form.ACTIONS, k_choices=demo_form.K_CHOICES,
                    k_range=demo_form.K_RANGE, steps_range=demo_form.STEPS_RANGE, min_frames=demo_form.MIN_FRAMES,
                    max_frames=max_frames, limits=uploads.limits(), suffixes=",".join(SUFFIXES), model=setup.model,
                    device=setup.device, jobs=list(reversed(runner.jobs.values()))[:10])

    @app.errorhandler(RequestEntityTooLarge)
    def too_large(_e):
        return form_page(error=f"the upload is larger than {max_upload_mb:g} MB: cut or compress the clip",
                         code=413)

    @app.after_request
    def no_store(response):
        response.headers["Cache-Control"] = "no-store"
        return response

    @app.get("/")
    def form():
        return form_page()

    @app.post("/run")
    def run():
        values = {k: request.form.get(k, "") for k in blank}
        busy = runner.running()
        if busy is not None:
            return form_page(values, f"a job is running ({busy.request.describe()}): wait for it to finish, then "
                                     "submit again", 409)
        try:
            asked = demo_form.parse_form(request.form, clips, max_frames)
            if asked.clip == demo_form.UPLOAD:
                file = request.files.get("video")
                if file is None or not file.filename:
                    raise demo_form.FormError("no file chosen: choose a video to upload, or a sample clip")
                stored = uploads.store(file.stream, file.filename)
                asked = demo_form.DemoRequest(**{**asked.__dict__, "upload": stored.path})
            job = runner.submit(asked)
        except demo_form.FormError as e:   # a field or an upload (UploadRefused)
            return form_page(values, str(e), e.status)
        except Busy as e:
            return form_page(values, str(e), 409)
        except StemError as e:
            return form_page(values, str(e), 400)
        return redirect(url_for("job_page", job_id=job.id), code=303)

    def job_of(job_id: str):
        job = runner.jobs.get(job_id)
        if job is None:
            refuse(404, "no such job (jobs are kept while the demo runs)")
        return job

    @app.get("/job/<job_id>")
    def job_page(job_id: str):
        job = job_of(job_id)
        values = {"job": job, "status": runner.status(job)}
        if job.state == "done":
            metrics = json.loads((job.run_dir / "metrics.json").read_text())
            output = "edited.mp4" if (job.run_dir / "edited.mp4").is_file() else "reconstruction.mp4"
            videos = [("source.mp4", "Source"), (output, "Edit" if output == "edited.mp4" else "Reconstruction")]
            if output == "edited.mp4" and (job.run_dir / "reconstruction.mp4").is_file():
                videos.append(("reconstruction.mp4", "Reconstruction (no edit)"))
            values.update(videos=videos, scores=result_scores(metrics), cache=cache_line(metrics),
                          bases=bases_table(metrics, job.run_dir))
        return page(JOB, **values)

    @app.get("/job/<job_id>/status")
    def job_status(job_id: str):
        return flask.jsonify(runner.status(job_of(job_id)))

    @app.get("/job/<job_id>/file/<name>")
    def job_file(job_id: str, name: str):
        job = job_of(job_id)
        if name not in RESULT_FILES:
            refuse(404, "no such file")
        path = job.run_dir / RESULT_FILES[RESULT_FILES.index(name)]   # the whitelist's name, not the request's
        if not path.is_file():
            refuse(404, "no such file")
        return send_file(path, mimetype=MEDIA_TYPES[path.suffix], conditional=True, max_age=0)

    app.runner = runner   # the tests' handle on the jobs
    return app


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="stem-demo", description="The demo web app (docs/DEMO.md): invert, "
                                     "reconstruct or edit a clip in the browser, with run.py's configs.")
    parser.add_argument("overrides", nargs="*", help="run.py overrides for every job, e.g. model=sd15 device=cuda")
    parser.add_argument("--host", default=None, help="address to bind (default 127.0.0.1; another needs --public)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--public", action="store_true", help="serve on the network (0.0.0.0): anyone reaching it")
    parser.add_argument("--token", default=None, help="access token every request must carry (?token=...)")
    parser.add_argument("--out", default="outputs/demo", help="run folders, the inversion cache and uploads")
    parser.add_argument("--max-frames", type=int, default=DEFAULTS["max_frames"], help="frames a job may use")
    parser.add_argument("--max-upload-mb", type=float, default=DEFAULTS["max_upload_mb"])
    parser.add_argument("--max-upload-frames", type=int, default=DEFAULTS["max_upload_frames"])
    parser.add_argument("--max-side", type=int, default=DEFAULTS["max_side"], help="an upload's largest side (px)")
    args = parser.parse_args(argv)
    if flask_missing(APP):
        return 2
    try:
        host = bind_address(args.host, args.public, "the demo")
        app = create_app(args.out, args.overrides, token=args.token, max_frames=args.max_frames,
                         max_upload_mb=args.max_upload_mb, max_upload_frames=args.max_upload_frames,
                         max_side=args.max_side)
    except StemError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    # the jobs' log on the console as run.py shows it; the page's status polls are not logged
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    return serve(app, host, args.port, public=args.public, token=args.token,
                 warning="the demo is served on the network ({address}): anyone who can reach this machine can "
                         "run jobs on it and upload files to it",
                 banner=f"demo: {{link}}  (Ctrl+C stops it; run folders go to {args.out})")


if __name__ == "__main__":
    sys.exit(main())
