"""A page opened in a real headless Chromium through the DevTools protocol (aiohttp's websocket, which Ray's
dashboard already depends on): which images loaded, what the console said, and a screenshot.

chromium_path() finds Debian's `chromium`, installing it with apt-get where it is missing and we are root.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path


def chromium_path() -> tuple[str | None, str]:
    """(path to chromium, "") or (None, why it cannot be had here)."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found, ""
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return None, "chromium is not installed and apt-get cannot install it here (not root, or no apt-get)"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for argv in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "chromium"]):
        done = subprocess.run(argv, capture_output=True, text=True, timeout=900, env=env, check=False)
        if done.returncode != 0:
            return None, f"`{' '.join(argv)}` failed: {done.stderr.strip()[-300:]}"
    found = shutil.which("chromium")
    return (found, "") if found else (None, "apt-get installed chromium but it is not on PATH")


@dataclass
class PageCheck:
    """What the browser saw: each image as (src, natural width, natural height), console and network errors."""

    images: list[tuple[str, int, int]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    title: str = ""


def open_page(chromium: str, url: str, screenshot: Path, width: int = 1280, timeout: float = 60.0) -> PageCheck:
    """Load url in headless Chromium, wait for its load event, and report; the whole page goes to screenshot."""
    # Chromium's helpers (renderers, crashpad) outlive its main process for a moment and keep writing to the
    # profile: the whole session is stopped, and the profile's removal never fails the test.
    with tempfile.TemporaryDirectory(prefix="chromium-profile-", ignore_cleanup_errors=True) as profile:
        process = subprocess.Popen(
            [chromium, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-extensions",
             "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0", f"--user-data-dir={profile}",
             f"--window-size={width},900", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            endpoint = _devtools_endpoint(process, timeout)
            return asyncio.run(asyncio.wait_for(_check(endpoint, url, screenshot, width), timeout))
        finally:
            _stop_session(process)


def _stop_session(process: subprocess.Popen) -> None:
    """SIGTERM chromium's whole process group, SIGKILL what is left after 10 s."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(wait)
        except subprocess.TimeoutExpired:
            continue
        deadline = time.monotonic() + wait  # the main process is gone: give its helpers the same time
        while time.monotonic() < deadline:
            try:
                os.killpg(process.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)


def _devtools_endpoint(process: subprocess.Popen, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    assert process.stderr is not None
    while time.monotonic() < deadline:
        line = process.stderr.readline()
        if not line and process.poll() is not None:
            raise RuntimeError(f"chromium exited with {process.returncode} before its DevTools endpoint")
        match = re.search(r"DevTools listening on (ws://127\.0\.0\.1:\d+/\S+)", line)
        if match:
            return match.group(1)
    raise RuntimeError("chromium named no DevTools endpoint in time")


async def _check(endpoint: str, url: str, screenshot: Path, width: int) -> PageCheck:
    import aiohttp

    ids = itertools.count(1)
    result = PageCheck()
    async with aiohttp.ClientSession() as http, http.ws_connect(endpoint, max_msg_size=0) as ws:
        pending: dict[int, asyncio.Future] = {}
        loaded = asyncio.Event()

        async def reader() -> None:
            async for message in ws:
                data = message.json()
                if "id" in data and data["id"] in pending:
                    pending.pop(data["id"]).set_result(data)
                    continue
                method, params = data.get("method"), data.get("params", {})
                if method == "Page.loadEventFired":
                    loaded.set()
                elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                    result.errors.append("console: " + " ".join(str(a.get("value", a.get("description", "")))
                                                                for a in params.get("args", [])))
                elif method == "Runtime.exceptionThrown":
                    result.errors.append("exception: " + params["exceptionDetails"].get("text", ""))
                elif method == "Log.entryAdded" and params["entry"].get("level") == "error":
                    result.errors.append(f"{params['entry'].get('source')}: {params['entry'].get('text')} "
                                         f"{params['entry'].get('url', '')}".strip())

        async def call(method: str, session: str | None = None, **params) -> dict:
            number = next(ids)
            pending[number] = asyncio.get_running_loop().create_future()
            await ws.send_json({"id": number, "method": method, "params": params,
                                **({"sessionId": session} if session else {})})
            answer = await pending[number]
            if "error" in answer:
                raise RuntimeError(f"{method}: {answer['error']}")
            return answer.get("result", {})

        task = asyncio.create_task(reader())
        target = (await call("Target.createTarget", url="about:blank"))["targetId"]
        session = (await call("Target.attachToTarget", targetId=target, flatten=True))["sessionId"]
        for domain in ("Page.enable", "Runtime.enable", "Log.enable"):
            await call(domain, session)
        await call("Page.navigate", session, url=url)
        await loaded.wait()
        script = ("JSON.stringify({title: document.title, images: [...document.images].map("
                  "i => [i.getAttribute('src'), i.naturalWidth, i.naturalHeight])})")
        value = (await call("Runtime.evaluate", session, expression=script, returnByValue=True))["result"]["value"]
        import json

        seen = json.loads(value)
        result.title = seen["title"]
        result.images = [tuple(image) for image in seen["images"]]
        height = int((await call("Runtime.evaluate", session, expression="document.documentElement.scrollHeight",
                                 returnByValue=True))["result"]["value"])
        await call("Emulation.setDeviceMetricsOverride", session, width=width, height=min(height, 8000),
                   deviceScaleFactor=1, mobile=False)
        shot = await call("Page.captureScreenshot", session, format="png", captureBeyondViewport=True)
        screenshot.parent.mkdir(parents=True, exist_ok=True)
        screenshot.write_bytes(base64.b64decode(shot["data"]))
        await asyncio.sleep(0.2)  # late console messages
        task.cancel()
    return result
