"""The README's Python API snippet runs as written, with only its documented `num_steps = 50` line swapped for
2 steps. It imports the public API from `stem` (stem/__init__.py)."""

import re
import socket
from pathlib import Path

import stem
import stem.runs.reconstruction
from stem.runs.reconstruction import reconstruct_video

README = Path(__file__).resolve().parents[1] / "README.md"
HEADING = "## Library use without Hydra"


def readme_snippet() -> str:
    """The first ```python block under HEADING."""
    text = README.read_text()
    assert HEADING in text, f"README.md lost its '{HEADING}' section"
    match = re.search(r"```python\n(.*?)```", text.split(HEADING, 1)[1], re.S)
    assert match, f"no python block under '{HEADING}'"
    return match.group(1)


def test_api_snippet_runs_as_written_offline_with_two_steps(tmp_path, monkeypatch, capsys):
    """Catches: a snippet that no longer runs (a renamed import or argument: `reconstruction_metric`
    seen failing), one whose methods ignore `num_steps` (runs 50 steps: seen failing), one that
    downloads (`load_pretrained()` as the model: seen failing on the blocked network) or writes files."""
    code = readme_snippet()
    steps_line = re.search(r"^num_steps = 50\b.*$", code, re.M)
    assert steps_line, "the snippet's `num_steps = 50` line (the one this test swaps) is gone"
    code = code.replace(steps_line.group(0), "num_steps = 2")

    def no_network(*args, **kwargs):
        raise OSError("the README snippet must not touch the network")

    calls = []

    def recorded(model, video, method, *args, **kwargs):
        result = reconstruct_video(model, video, method, *args, **kwargs)
        calls.append((method.num_steps, len(result.inverted.trajectory.latents)))
        return result

    monkeypatch.setattr(stem.runs.reconstruction, "reconstruct_video", recorded)
    monkeypatch.setattr(stem, "reconstruct_video", recorded)  # what `from stem import reconstruct_video` gets
    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.chdir(tmp_path)
    scope = {"__name__": "readme_snippet"}
    exec(compile(code, str(README), "exec"), scope)
    printed = [line.split() for line in capsys.readouterr().out.splitlines()]
    # one "<method> <PSNR vs the VAE round trip>" line per method, each method inverted with the 2 steps
    assert len(printed) == 2 and all(len(p) == 2 and float(p[1]) > 30 for p in printed), printed
    assert calls == [(2, 3), (2, 3)]
    assert list(tmp_path.iterdir()) == []
