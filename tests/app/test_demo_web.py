"""The demo web app (stem/app/demo_server.py): Flask test-client tests of the refusals (form fields, uploads),
the file route, one job at a time with its progress, the inversion cache across jobs and uploads, a STEM result's
K per layer, a failed job's one line, the CLI; the equality of a demo reconstruction with `python run.py`; and one
real-browser test (headless Chromium via selenium) running a reconstruction by clicking.

Every real job runs the tiny random model on the CPU on 64x64 frames (`data.width=64 data.height=64` on the demo's
command line), 3 or 4 frames and 3 to 5 DDIM steps."""

from __future__ import annotations

import hashlib
import html
import json
import re
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from conftest import ROOT, run_cli
from web_helpers import browser, not_blank, public_server

flask = pytest.importorskip("flask", reason="the demo app needs Flask: pip install 'stem[app]'")

from stem.app.demo_server import create_app  # noqa: E402
from stem.data.video import write_video  # noqa: E402

SMALL = ["device=cpu", "data.width=64", "data.height=64", "progress=false"]
FORM = {"clip": "synthetic", "prompt": "a portrait photo of an astronaut", "inversion": "stem", "k": "128",
        "action": "reconstruct", "target": "a watercolor portrait", "steps": "5", "frames": "4"}


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    """An empty paths.data_root: the real sample clips are absent, whatever this machine holds."""
    return tmp_path_factory.mktemp("no_clips")


@pytest.fixture
def isolated(monkeypatch, data_root):
    monkeypatch.setenv("STEM_DATA_ROOT", str(data_root))
    monkeypatch.delenv("STEM_CACHE_DIR", raising=False)


@pytest.fixture(scope="module")
def demo(tmp_path_factory, data_root):
    """A demo app with its output folder, shared by the tests that run real jobs."""
    mp = pytest.MonkeyPatch()
    mp.setenv("STEM_DATA_ROOT", str(data_root))
    mp.delenv("STEM_CACHE_DIR", raising=False)
    out = tmp_path_factory.mktemp("demo")
    app = create_app(out, SMALL, max_upload_mb=1, max_upload_frames=6, max_side=128)
    yield app, out
    mp.undo()


@pytest.fixture(scope="module")
def refusing(tmp_path_factory, data_root):
    """A demo app that the refusal tests share (nothing it refuses may start a job or write a file): uploads of at
    most 0.02 MB, 6 frames and 128 pixels a side."""
    mp = pytest.MonkeyPatch()
    mp.setenv("STEM_DATA_ROOT", str(data_root))
    out = tmp_path_factory.mktemp("refusing") / "out"
    yield create_app(out, SMALL, max_upload_mb=0.02, max_upload_frames=6, max_side=128), out
    mp.undo()


def wait(client, location: str, deadline_s: float = 180) -> dict:
    """The status of the job at `location` once it ended (a guard against a hung job, not a timing)."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        status = client.get(location + "/status").get_json()
        if status["state"] in ("done", "failed"):
            return status
        time.sleep(0.1)
    raise AssertionError(f"job {location} did not end")


def submit(client, **changes) -> str:
    response = client.post("/run", data={**FORM, **changes})
    assert response.status_code == 303, error_of(response)
    return response.headers["Location"]


def job_of(app, location: str):
    return app.runner.jobs[location.rsplit("/", 1)[1]]


def error_of(response) -> str:
    """The page's one-line error (the form shown again with it)."""
    found = re.findall(r'<p class="error" id="error">(.*?)</p>', response.get_data(as_text=True), re.S)
    assert len(found) == 1, response.get_data(as_text=True)[:2000]
    return html.unescape(found[0])


def files_under(folder) -> list:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def clip_file(path, frames: int = 4, size: int = 64, seed: int = 0):
    """A small mp4 of moving noise blocks (frames x size x size)."""
    rng = np.random.default_rng(seed)
    base = rng.random((3, size // 8, size // 8)).repeat(8, 1).repeat(8, 2)
    video = np.stack([np.roll(base, 2 * i, axis=2) for i in range(frames)]).astype(np.float32)
    import torch

    write_video(path, torch.from_numpy(video), 10)
    return path


# --- refusals: form fields and uploads ---------------------------------------------------------------------------

@pytest.mark.parametrize("changes, status, fragment", [
    ({"inversion": "stem_official"}, 400, "inversion 'stem_official' is not one of"),
    ({"k": "5000"}, 400, "K (the number of STEM bases) must be a whole number from 2 to 2048"),
    ({"frames": "17"}, 400, "frames must be a whole number from 2 to 16"),
    ({"steps": "1000"}, 400, "DDIM steps must be a whole number from 2 to 100"),
    ({"clip": "car_turn"}, 400, "clip 'car_turn' cannot run here: choose one of synthetic, upload"),
    ({"action": "tokenflow", "target": ""}, 400, "the target prompt is empty"),
    ({"clip": "upload"}, 400, "no file chosen"),
])
def test_a_bad_field_is_refused_on_the_form_with_one_line_and_nothing_written(refusing, changes, status, fragment):
    """The form comes back with one line naming the field, HTTP 400, no job and no file under --out. Bug caught: a
    field checked only in the browser (the server trusting the form), or a run folder left by a refused job."""
    app, out = refusing
    response = app.test_client().post("/run", data={**FORM, **changes})
    assert response.status_code == status
    line = error_of(response)
    assert fragment in line and "\n" not in line
    assert app.runner.jobs == {} and files_under(out) == []


@pytest.mark.parametrize("name, content, status, fragment", [
    ("big.mp4", b"\0" * 30_000, 413, "the upload is larger than 0.02 MB"),
    ("notes.txt", b"hello", 400, "'notes.txt' is not a video this demo reads"),
    ("fake.mp4", b"this is not a video" * 10, 400, "the upload is not a readable video"),
    ("empty.webm", b"", 400, "the uploaded file is empty"),
    ("huge.mp4", b"\0" * 1_100_000, 413, "the upload is larger than 0.02 MB"),   # past Flask's request limit
    ("long.mp4", "frames:8", 400, "8 frames: cut it to at most 6"),
    ("wide.mp4", "size:136", 400, "the video is 136x136: resize it to at most 128 pixels a side"),
])
def test_a_bad_upload_is_refused_with_one_line_and_nothing_left_on_disk(refusing, tmp_path, name, content, status,
                                                                        fragment):
    """Size (413, also past Flask's request limit), format, decodability, frames and frame size (400), each one
    line on the form, with no file left under --out (the upload's temporary file removed). Bug caught: a refused
    upload kept (disk filled by refusals) or accepted by its name alone."""
    if isinstance(content, str):
        key, value = content.split(":")
        content = clip_file(tmp_path / "clip.mp4", **({"frames": int(value)} if key == "frames" else
                                                       {"size": int(value)})).read_bytes()
    assert len(content) < 20_000 or name in ("big.mp4", "huge.mp4")   # refused for what the case is about
    app, out = refusing
    import io

    response = app.test_client().post("/run", data={**FORM, "clip": "upload", "video": (io.BytesIO(content), name)},
                                      content_type="multipart/form-data")
    assert response.status_code == status
    line = error_of(response)
    assert fragment in line and "\n" not in line
    assert app.runner.jobs == {} and files_under(out) == []


def test_a_missing_sample_clip_is_shown_disabled(refusing):
    page = refusing[0].test_client().get("/").get_data(as_text=True)
    for name in ("woman_running", "taylor", "wolf", "car_turn"):
        option = re.search(rf'<option value="{name}"[^>]*>', page, re.S).group(0)
        assert "disabled" in option, option
    assert "disabled" not in re.search(r'<option value="synthetic"[^>]*>', page, re.S).group(0)


def test_the_random_weights_warning_shows_only_for_random_weights(tmp_path, isolated):
    """tiny and sd15_arch (random weights): the README's warning; sd15 (real weights, only composed here): none."""
    for model, shown in (("tiny", True), ("sd15_arch", True), ("sd15", False)):
        page = create_app(tmp_path / model, ["device=cpu", f"model={model}"]).test_client().get("/")
        text = html.unescape(page.get_data(as_text=True))
        assert ('id="random-warning"' in text) == shown, model
        assert ("numbers from random weights show the mechanics, not the paper's values" in text) == shown


def test_the_access_token_guards_every_route(tmp_path, isolated):
    """With --token: 403 on every page, route and form post without it or with a wrong one (no job started);
    accepted as ?token=, then as the cookie it sets, and as the header X-Demo-Token."""
    app = create_app(tmp_path / "out", SMALL, token="s3cret")
    client = app.test_client()
    for url in ("/", "/?token=wrong", "/job/0/status", "/job/0/file/metrics.json"):
        assert client.get(url).status_code == 403, url
    assert client.post("/run", data=FORM).status_code == 403 and app.runner.jobs == {}
    assert app.test_client().get("/", headers={"X-Demo-Token": "s3cret"}).status_code == 200
    assert client.get("/?token=s3cret").status_code == 200 and client.get("/").status_code == 200


# --- one job at a time, progress, a failed job ----------------------------------------------------------------------

def test_progress_is_the_live_loop_and_a_second_job_waits_for_the_first(tmp_path, isolated):
    """With a task that opens a progress bar ("DDIM inversion", 7 steps), advances it 3 steps and waits: the
    status says phase "DDIM inversion", step [3, 7], the job's log line; a second submit is refused (409, one line,
    no second job); once the first ended, a new submit runs. Bug caught: two jobs at once (one model each, the
    memory doubled), or a progress that is not the running loop's."""
    from tqdm.auto import tqdm

    release, started = threading.Event(), threading.Event()

    def task(cfg):
        import logging

        logging.getLogger("run").info("inverting %d frames", cfg.data.n_frames)
        with tqdm(total=7, desc="DDIM inversion") as bar:
            bar.update(3)
            started.set()
            release.wait(60)

    app = create_app(tmp_path / "out", SMALL, task=task)
    client = app.test_client()
    first = submit(client)
    assert started.wait(60)
    status = client.get(first + "/status").get_json()
    assert status["state"] == "running" and status["phase"] == "DDIM inversion" and status["step"] == [3, 7]
    assert status["log"] == ["inverting 4 frames"] and status["error"] is None
    second = client.post("/run", data=FORM)
    assert second.status_code == 409 and "a job is running" in error_of(second)
    assert len(app.runner.jobs) == 1
    page = client.get(first).get_data(as_text=True)
    assert 'id="progress"' in page and "DDIM inversion" in page
    release.set()
    assert wait(client, first)["state"] == "done"
    wait(client, submit(client))
    assert len(app.runner.jobs) == 2


def test_a_failed_job_shows_its_one_line(tmp_path, isolated):
    """A setting run_job refuses (seed=-1 on the command line): the job fails with run.py's one line, which the
    status, the page and status.json (what a table shows) all carry. Bug caught: a traceback on the page, or a
    failure shown as done."""
    app = create_app(tmp_path / "out", [*SMALL, "seed=-1"])
    client = app.test_client()
    location = submit(client)
    status = wait(client, location)
    assert status["state"] == "failed" and status["error"].startswith("seed=-1 must be an integer")
    job = job_of(app, location)
    assert json.loads((job.run_dir / "status.json").read_text())["reason"] == status["error"]
    page = client.get(location).get_data(as_text=True)
    assert html.unescape(re.search(r'<p class="error" id="error">(.*?)</p>', page).group(1)) == status["error"]


# --- real jobs: equality with run.py, K per layer, files, cache ---------------------------------------------------

@pytest.fixture(scope="module")
def stem_job(demo):
    """A STEM (K=128) reconstruction through the demo: (app, client, location, run folder)."""
    app, out = demo
    client = app.test_client()
    location = submit(client)
    assert wait(client, location)["state"] == "done", client.get(location + "/status").get_json()
    return app, client, location, job_of(app, location).run_dir


def test_a_demo_reconstruction_equals_python_run_py_with_the_same_settings(stem_job, tmp_path):
    """`python run.py` (a subprocess) with the settings typed here by hand and no cache gives the PSNR/SSIM of the
    demo's job (vs the source and vs the VAE round trip, per frame) bit for bit: both run `run_job` on the same
    fp32 CPU ops with the same seed, so no tolerance is needed. Bug caught: a second pipeline in the demo, or a
    form field mapped to another setting (K, steps, frames, size) than run.py's."""
    *_, run_dir = stem_job
    proc = run_cli("data=synthetic", "data.n_frames=4", "data.width=64", "data.height=64", "inversion=stem",
                   "inversion.num_bases=128", "inversion.num_steps=5", "excess_bases=clamp", "use_cache=false",
                   "device=cpu", "progress=false", f"hydra.run.dir={tmp_path / 'cli'}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ours, theirs = (json.loads((d / "metrics.json").read_text()) for d in (run_dir, tmp_path / "cli"))
    for section in ("vs_input", "vs_vae"):
        for key in ("psnr", "ssim", "psnr_per_frame", "ssim_per_frame"):
            assert ours[section][key] == theirs[section][key], (section, key)
    assert ours["inversion"] == theirs["inversion"] and ours["bases"] == theirs["bases"]
    assert ours["inversion_cache"]["hit"] is False


def test_the_stem_result_shows_k_per_layer(stem_job):
    """The result page's K per layer is K=128 clamped to each layer's tokens per EM group (4 frames x the latent's
    8x8, 4x4, 2x2, 1x1 at the UNet's four resolutions), computed here from the geometry, in both phases; the
    plot is served. Bug caught: the page showing K=128 everywhere (the clamp hidden) or another run's bases."""
    _, client, location, run_dir = stem_job
    page = client.get(location).get_data(as_text=True)
    rows = re.findall(r"<tr><td>([\w.]+)</td><td>(\d+)</td><td>(\d+)</td></tr>", page)
    side = {"down_blocks.0": 8, "down_blocks.1": 4, "down_blocks.2": 2, "mid_block.attentions": 1,
            "up_blocks.1": 2, "up_blocks.2": 4, "up_blocks.3": 8}   # the latent's side at each block
    expected = {layer: min(128, 4 * side[".".join(layer.split(".")[:2])] ** 2) for layer, _, _ in rows}
    assert len(rows) == 16 and {layer: int(k) for layer, k, _ in rows} == expected
    assert all(k_inv == k_rec for _, k_inv, k_rec in rows)
    assert sorted(set(expected.values())) == [4, 16, 64, 128]
    plot = client.get(location + "/file/bases_per_layer.png")
    assert plot.status_code == 200 and plot.data == (run_dir / "bases_per_layer.png").read_bytes()


def test_the_result_shows_the_source_and_the_reconstruction_with_their_scores(stem_job):
    """Two looping videos (the run folder's source.mp4 and reconstruction.mp4, 4 frames of 64x64), the PSNR/SSIM
    of metrics.json, and that the inversion was computed (not from the cache)."""
    import imageio.v3 as iio

    _, client, location, run_dir = stem_job
    page = client.get(location).get_data(as_text=True)
    sources = re.findall(r'<video id="video-\d" src="([^"]+)" autoplay loop', page)
    assert sources == [f"{location}/file/source.mp4", f"{location}/file/reconstruction.mp4"]
    for url in sources:
        body = client.get(url).data
        assert body == (run_dir / url.rsplit("/", 1)[1]).read_bytes()
        assert iio.imread(body, extension=".mp4").shape == (4, 64, 64, 3)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert f"{metrics['vs_input']['psnr']:.4g} dB" in page and f"{metrics['vs_vae']['psnr']:.4g} dB" in page
    assert "computed now and cached" in page


@pytest.mark.parametrize("path", [
    "../metrics.json", "..%2Fmetrics.json", "..%2F..%2F..%2Fetc%2Fpasswd", "%2Fetc%2Fpasswd", ".hydra%2Fconfig.yaml",
    "config.yaml", "inverted_latents", "status.json", "git.json", "METRICS.JSON", "metrics.json%00.png",
])
def test_the_file_route_serves_only_the_whitelist_of_the_jobs_folder(stem_job, path):
    """404 for every name outside the whitelist and every path-like request; an unknown job: 404. Bug caught: a
    request's text joined onto the run folder (path traversal) or any file of the folder served."""
    _, client, location, _ = stem_job
    response = client.get(f"{location}/file/{path}")
    assert response.status_code == 404 and b"root:" not in response.data and b"psnr" not in response.data
    assert client.get("/job/000000000000/file/metrics.json").status_code == 404
    assert client.get(f"{location}/../../etc/passwd").status_code == 404


def test_a_second_job_on_the_same_clip_takes_the_inversion_from_the_cache(demo):
    """A DDIM reconstruction, then a TokenFlow edit of the same clip with the same inversion: the edit's
    metrics.json says cache hit with the first job's key (and no inversion memory measured: nothing inverted), the
    page says so, and the cache holds one entry for both. Bug caught: a cache per job (the demo inverting again)."""
    app, out = demo
    client = app.test_client()
    common = {"inversion": "ddim_1frame", "frames": "3", "steps": "3"}
    first = submit(client, **common)
    assert wait(client, first)["state"] == "done"
    second = submit(client, **common, action="tokenflow")
    assert wait(client, second)["state"] == "done", client.get(second + "/status").get_json()
    one, two = (json.loads((job_of(app, loc).run_dir / "metrics.json").read_text()) for loc in (first, second))
    assert one["inversion_cache"]["hit"] is False and two["inversion_cache"]["hit"] is True
    assert two["inversion_cache"]["key"] == one["inversion_cache"]["key"]
    assert two["memory"]["inversion_peak_mib"] is None and two["method"] == "TokenFlow"
    assert one["inversion_cache"]["path"].startswith(str(out.resolve() / "cache"))
    page = client.get(second).get_data(as_text=True)
    assert "from the cache" in page and "/file/edited.mp4" in page
    assert f"{two['reconstruction_vs_input']['psnr']:.4g} dB" in page   # report_reconstruction's PSNR


def test_a_fatezero_edit_on_stem_is_stem_fatezero_with_its_edit_and_reconstruction(demo):
    """FateZero edit + STEM K=128: the job is STEM-FateZero (metrics.json `method`, the K asked for), the page shows
    the source, the edit and the plain reconstruction of the edited latents, the edit's CLIP score and warp error
    and the reconstruction's PSNR from metrics.json, and the K per layer of the inversion (an edit samples back
    with FateZero, so no reconstruction phase). Bug caught: the editor's preset inversion run instead of the
    form's, or an edit page without its scores."""
    app, _ = demo
    client = app.test_client()
    location = submit(client, action="fatezero", frames="3", steps="3")
    assert wait(client, location)["state"] == "done", client.get(location + "/status").get_json()
    metrics = json.loads((job_of(app, location).run_dir / "metrics.json").read_text())
    assert metrics["method"] == "STEM-FateZero" and metrics["inversion"]["num_bases"] == 128
    assert metrics["edit_prompt"] == FORM["target"]
    page = client.get(location).get_data(as_text=True)
    assert re.findall(r'<video id="video-\d" src="[^"]+/file/([\w.]+)"', page) == [
        "source.mp4", "edited.mp4", "reconstruction.mp4"]
    for shown in (metrics["clip"]["clip_score"], metrics["warp_error"]["warp_error"],
                  metrics["reconstruction_vs_input"]["psnr"]):
        assert f"{shown:.4g}" in page
    assert "<th>K (inversion)</th>" in page and "K (reconstruction)" not in page


def test_a_reupload_is_the_same_file_and_hits_the_cache(demo, tmp_path):
    """The same bytes uploaded twice (under two names): one file, named by their SHA-256 (computed here); the
    second job's inversion comes from the cache of the first. Bug caught: uploads stored by name or with a
    random name (every upload inverted again)."""
    import io

    app, out = demo
    client = app.test_client()
    content = clip_file(tmp_path / "clip.mp4", frames=3).read_bytes()
    locations = []
    for name in ("mine.mp4", "again.mp4"):
        form = {**FORM, "clip": "upload", "inversion": "ddim_1frame", "frames": "3", "steps": "3",
                "prompt": "moving blocks", "video": (io.BytesIO(content), name)}
        response = client.post("/run", data=form, content_type="multipart/form-data")
        assert response.status_code == 303, error_of(response)
        locations.append(response.headers["Location"])
        assert wait(client, locations[-1])["state"] == "done", client.get(locations[-1] + "/status").get_json()
    stored = [p for p in (out / "uploads").iterdir()]
    assert [p.name for p in stored] == [hashlib.sha256(content).hexdigest()[:24] + ".mp4"]
    one, two = (json.loads((job_of(app, loc).run_dir / "metrics.json").read_text()) for loc in locations)
    assert one["video"]["source"] == two["video"]["source"] == str(stored[0])
    assert (one["inversion_cache"]["hit"], two["inversion_cache"]["hit"]) == (False, True)


# --- CLI ------------------------------------------------------------------------------------------------------------

def demo_cli(*args, block_flask=False, timeout=120, env=None):
    code = ("import sys\n" + ("sys.modules['flask'] = None\n" if block_flask else "") +
            "from stem.app.demo_server import main\nsys.exit(main(sys.argv[1:]))")
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_cli_without_flask_says_which_extra_to_install(tmp_path):
    proc = demo_cli("--out", tmp_path / "out", block_flask=True)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "the demo app needs Flask: pip install 'stem[app]'"]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args, fragment", [
    (["--host", "0.0.0.0"], "--host 0.0.0.0 is not a loopback address: add --public to serve the demo"),
    (["inversion=stem"], "inversion=stem: the form chooses the clip"),
    (["no_such_key=1"], "the config does not compose"),
])
def test_cli_refuses_with_one_line(tmp_path, args, fragment):
    proc = demo_cli("--out", tmp_path / "out", *args)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert proc.stderr.startswith("error: ") and fragment in proc.stderr, proc.stderr


def test_cli_public_binds_every_interface_with_a_warning(tmp_path):
    """`--public --port 0`: a warning on stderr naming 0.0.0.0 and the missing token; the link printed answers."""
    import os

    status, err = public_server("stem.app.demo_server", "--out", tmp_path / "out", "device=cpu",
                                env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert status == 200
    assert "WARNING" in err and "0.0.0.0" in err and "no --token" in err and "run jobs" in err


# --- a real browser -------------------------------------------------------------------------------------------------

def test_a_real_browser_runs_a_reconstruction_and_sees_the_videos(demo, tmp_path):
    """Headless Chromium against the app on a free port: the form, STEM K=128 on the synthetic clip with 3 frames
    and 3 steps, Run; the job page turns into the result; both videos decode (readyState >= 2, 64 pixels wide) and
    play. Screenshots of the form and the result are not blank. Bug caught: a page that works in the test client
    but not in a browser (the form's multipart post, the polling script, video range requests)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait
    from werkzeug.serving import make_server

    app, _ = demo
    driver = browser()
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        driver.get(f"http://127.0.0.1:{server.server_port}/")
        Select(driver.find_element(By.ID, "clip")).select_by_value("synthetic")
        Select(driver.find_element(By.ID, "inversion")).select_by_value("stem")
        Select(driver.find_element(By.ID, "action")).select_by_value("reconstruct")
        for field, value in (("k", "128"), ("steps", "3"), ("frames", "3")):
            box = driver.find_element(By.ID, field)
            box.clear()
            box.send_keys(value)
        driver.save_screenshot(str(tmp_path / "form.png"))
        driver.find_element(By.ID, "submit").click()
        decoded = ("const v = Array.from(document.querySelectorAll('#result video'));"
                   "return v.length === 2 && v.every(x => x.readyState >= 2 && x.videoWidth === 64 && !x.paused);")
        WebDriverWait(driver, 120).until(lambda d: d.execute_script(decoded))
        driver.save_screenshot(str(tmp_path / "result.png"))
        title = driver.find_element(By.ID, "title").text
        rows = len(driver.find_elements(By.CSS_SELECTOR, "#bases tr"))
    finally:
        driver.quit()
        server.shutdown()
        thread.join(10)
    assert title == "STEM (K=128), reconstruction of synthetic, 3 frames, 3 DDIM steps" and rows == 17
    assert not_blank(tmp_path / "form.png") > 10 and not_blank(tmp_path / "result.png") > 10
