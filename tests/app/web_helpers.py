"""What the web apps' tests share: a headless Chromium (or a skip naming what to install), a screenshot's
blankness, and a `--public` server started on a free port."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import urllib.request

import numpy as np
import pytest
from conftest import ROOT


def browser():
    """A headless Chromium driven by selenium, or a skip saying what to install."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not chromium or not driver:
        pytest.skip("install Debian's chromium and chromium-driver (apt-get install -y chromium chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="the browser test needs selenium: pip install "
                                    "'stem[dev]'")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,900",
                "--autoplay-policy=no-user-gesture-required"):
        options.add_argument(arg)
    return webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver))


def not_blank(png) -> float:
    """The standard deviation of a screenshot's pixels (0 for a blank page)."""
    import imageio.v3 as iio

    return float(np.asarray(iio.imread(png), dtype=np.float64)[..., :3].std())


def public_server(module: str, *args, env=None) -> tuple[int, str]:
    """`python -m <module> <args> --public --port 0`: the HTTP status of the link it prints, and its stderr once
    stopped."""
    proc = subprocess.Popen([sys.executable, "-m", module, *map(str, args), "--public", "--port", "0"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        link = re.search(r"http://\S+", proc.stdout.readline()).group(0)
        status = urllib.request.urlopen(link, timeout=30).status
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    return status, err
