"""Screenshots of TensorBoard's Time Series, Scalars, HParams and Text pages for a log directory, taken in
headless Chromium: how a user's first look at `tensorboard --logdir outputs` is checked.

    python scripts/tensorboard_look.py outputs --out tb_look     # needs playwright and a Chromium

Chromium: Debian's `chromium` package (/usr/bin/chromium) or `--chromium PATH`; playwright: `pip install playwright`.
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

PAGES = {"timeseries": "#timeseries", "scalars": "#scalars", "hparams": "#hparams", "text": "#text"}
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("logdir")
    p.add_argument("--out", default="tb_look", help="folder for the PNGs")
    p.add_argument("--chromium", default="/usr/bin/chromium")
    p.add_argument("--wait", type=float, default=6.0, help="seconds a page gets to draw")
    args = p.parse_args()
    from playwright.sync_api import sync_playwright

    port = free_port()
    tb = subprocess.Popen([sys.executable, "-m", "tensorboard.main", "--logdir", args.logdir, "--port", str(port),
                           "--host", "127.0.0.1", "--reload_interval", "0"],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        url = f"http://127.0.0.1:{port}/"
        for _ in range(120):
            try:
                urllib.request.urlopen(url + "data/runs", timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=args.chromium, args=FLAGS)
            page = browser.new_page(viewport={"width": 1600, "height": 1200})
            for name, anchor in PAGES.items():
                page.goto(url + anchor)
                page.wait_for_timeout(args.wait * 1000)
                page.screenshot(path=str(out / f"{name}.png"))
                (out / f"{name}.txt").write_text(page.inner_text("body"))
                print(out / f"{name}.png")
            browser.close()
    finally:
        tb.terminate()
        tb.wait()


if __name__ == "__main__":
    main()
