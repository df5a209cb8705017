"""A screenshot of a page of MLflow's UI with headless Chromium, driven over the DevTools protocol
(aiohttp's websocket client; no browser download, no Node): waits until the page shows the texts
asked for, closes MLflow's Assistant panel (it opens itself on a browser's first visit to a local
server; a user closes it once), and writes a PNG. Used by tests/e2e/test_ui_screenshot.py, which keeps
docs/mlflow_ui.png (README "Tracking with MLflow") up to date.

    python scripts/ui_screenshot.py URL OUT.png [--wait-for TEXT ...]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import itertools
import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--hide-scrollbars", "--remote-debugging-port=0")
CLOSE_ASSISTANT = ('document.querySelector(\'[data-component-id="mlflow.assistant.chat_panel.close"]\')'
                   '?.click() ?? null')


def find_chromium() -> Optional[str]:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


class Page:
    """One browser tab over the DevTools protocol."""

    def __init__(self, ws):
        self.ws, self.ids = ws, itertools.count(1)

    async def call(self, method: str, **params):
        msg_id = next(self.ids)
        await self.ws.send_str(json.dumps({"id": msg_id, "method": method, "params": params}))
        while True:
            reply = json.loads((await self.ws.receive()).data)
            if reply.get("id") == msg_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})

    async def evaluate(self, expression: str):
        result = await self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return result.get("result", {}).get("value")


async def _shoot(port: int, url: str, out: Path, width: int, height: int, wait_for: Sequence[str],
                 timeout: float) -> str:
    import aiohttp

    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{port}/json/list") as resp:
            targets = await resp.json()
        target = next(t for t in targets if t.get("type") == "page")
        async with session.ws_connect(target["webSocketDebuggerUrl"], max_msg_size=0) as ws:
            page = Page(ws)
            await page.call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1,
                            mobile=False)
            await page.call("Page.enable")
            await page.call("Page.navigate", url=url)
            deadline = time.monotonic() + timeout
            text = ""
            while time.monotonic() < deadline:
                # closed as soon as it opens: the panel's width would hide the table's last columns
                # (the table renders only the columns in view)
                await page.evaluate(CLOSE_ASSISTANT)
                text = await page.evaluate("document.body ? document.body.innerText : ''") or ""
                if all(w in text for w in wait_for):
                    break
                await asyncio.sleep(0.5)
            else:
                raise TimeoutError(f"{url}: after {timeout:.0f}s the page does not show {list(wait_for)}; "
                                   f"it shows: {text[:600]!r}")
            await page.evaluate(CLOSE_ASSISTANT)
            await asyncio.sleep(1.5)  # the panel's close and the table's layout settle
            text = await page.evaluate("document.body.innerText") or ""
            shot = await page.call("Page.captureScreenshot", format="png")
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(base64.b64decode(shot["data"]))
            return text


def screenshot(url: str, out: Path, wait_for: Sequence[str] = (), width: int = 1600, height: int = 900,
               timeout: float = 90.0, chromium: Optional[str] = None) -> str:
    """Write ``out`` (PNG) of ``url`` once the page shows every text of ``wait_for``; the page's text."""
    chromium = chromium or find_chromium()
    if chromium is None:
        raise FileNotFoundError("no chromium on PATH (apt-get install -y chromium)")
    with tempfile.TemporaryDirectory(prefix="twilbert-chromium-") as profile:
        proc = subprocess.Popen([chromium, *FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}",
                                 "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            port_file = Path(profile) / "DevToolsActivePort"
            deadline = time.monotonic() + 30
            while not (port_file.is_file() and port_file.read_text().strip()):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{chromium} did not start its DevTools endpoint")
                time.sleep(0.2)
            port = int(port_file.read_text().splitlines()[0])
            return asyncio.run(_shoot(port, url, Path(out), width, height, wait_for, timeout))
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("url")
    parser.add_argument("out", type=Path)
    parser.add_argument("--wait-for", nargs="*", default=[])
    parser.add_argument("--width", type=int, default=1600)
    parser.add_argument("--height", type=int, default=900)
    args = parser.parse_args()
    screenshot(args.url, args.out, args.wait_for, args.width, args.height)
    print(args.out)


if __name__ == "__main__":
    main()
