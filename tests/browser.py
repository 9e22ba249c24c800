"""Load a page in headless Chromium and report console errors, failed loads and a screenshot.

Talks the Chrome DevTools Protocol over ``--remote-debugging-pipe`` (file descriptors 3 and 4,
NUL-terminated JSON messages), so it needs nothing beyond the Python standard library and a
Chromium binary (Debian: ``apt-get install chromium``).
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import os
import shlex
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")


def find_chromium() -> str | None:
    env = os.environ.get("LTBENCH_CHROMIUM")
    if env:
        return env if shutil.which(env) or Path(env).exists() else None
    return next((p for c in CANDIDATES if (p := shutil.which(c))), None)


@dataclass
class PageResult:
    console: list[dict] = field(default_factory=list)  # {"level", "text"} of every console message
    exceptions: list[str] = field(default_factory=list)  # uncaught exceptions
    log: list[dict] = field(default_factory=list)  # browser log entries (failed loads, ...)
    evaluated: object = None  # value of the `evaluate` expression
    screenshot: bytes = b""  # the page from the top (at most max_height px)
    tiles: list = field(default_factory=list)  # the whole page as PNG tiles of tile_height px

    @property
    def errors(self) -> list[str]:
        out = [f"console.{c['level']}: {c['text']}" for c in self.console if c["level"] in ("error", "assert")]
        out += [f"exception: {e}" for e in self.exceptions]
        out += [
            f"log.{e.get('source')}: {e.get('text')} {e.get('url', '')}" for e in self.log if e.get("level") == "error"
        ]
        return out


def _above(fd: int, low: int = 10) -> int:
    """``fd`` moved to the lowest free descriptor ≥ ``low``."""
    high = fcntl.fcntl(fd, fcntl.F_DUPFD, low)
    os.close(fd)
    return high


class _Pipe:
    def __init__(self, binary: str, profile: str):
        r_to_chrome, w_to_chrome = os.pipe()
        r_from_chrome, w_from_chrome = os.pipe()
        # the child's ends above fd 9, so that moving them to 3 and 4 cannot overwrite one with the other
        # (pipe() may hand out 3 and 4 themselves, e.g. under pytest)
        r_to_chrome, w_from_chrome = _above(r_to_chrome), _above(w_from_chrome)
        args = [
            binary,
            "--headless",
            "--remote-debugging-pipe",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--no-default-browser-check",
            "--hide-scrollbars",
            "--disable-extensions",
            "--mute-audio",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-quic",
            f"--user-data-dir={profile}",
            "about:blank",
        ]

        # chromium reads commands on fd 3 and writes replies on fd 4: bash duplicates our pipe ends there
        # (bash, not sh: dash's redirections take single-digit descriptors only)
        cmd = " ".join(shlex.quote(a) for a in args) + f" 3<&{r_to_chrome} 4>&{w_from_chrome}"
        self.proc = subprocess.Popen(
            ["bash", "-c", "exec " + cmd],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            pass_fds=(r_to_chrome, w_from_chrome),
        )
        os.close(r_to_chrome)
        os.close(w_from_chrome)
        self.w = os.fdopen(w_to_chrome, "wb")
        self.r = os.fdopen(r_from_chrome, "rb")
        self.buf = b""
        self.next_id = 0
        self.events: list[dict] = []

    def send(self, method: str, params: dict | None = None, session: str | None = None, timeout: float = 60) -> dict:
        self.next_id += 1
        msg = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        self.w.write(json.dumps(msg).encode() + b"\0")
        self.w.flush()
        deadline = time.time() + timeout
        while time.time() < deadline:
            m = self._read()
            if m.get("id") == self.next_id:
                if "error" in m:
                    raise RuntimeError(f"{method}: {m['error']}")
                return m.get("result", {})
            self.events.append(m)
        raise TimeoutError(method)

    def wait_event(self, name: str, timeout: float = 60) -> dict:
        for i, e in enumerate(self.events):
            if e.get("method") == name:
                return self.events.pop(i)
        deadline = time.time() + timeout
        while time.time() < deadline:
            m = self._read()
            if m.get("method") == name:
                return m
            self.events.append(m)
        raise TimeoutError(name)

    def _read(self) -> dict:
        while b"\0" not in self.buf:
            chunk = os.read(self.r.fileno(), 1 << 20)
            if not chunk:
                raise RuntimeError("chromium closed the debugging pipe")
            self.buf += chunk
        raw, self.buf = self.buf.split(b"\0", 1)
        return json.loads(raw)

    def close(self):
        with contextlib.suppress(Exception):  # the browser may already be gone; it is killed below if not
            self.send("Browser.close", timeout=10)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for f in (self.w, self.r):
            with contextlib.suppress(OSError):
                f.close()


def load(
    url: str,
    width: int = 1280,
    height: int = 900,
    evaluate: str | None = None,
    full_page: bool = True,
    binary: str | None = None,
    settle_s: float = 0.3,
    max_height: int = 16000,
    tile_height: int = 0,
) -> PageResult:
    """Open ``url``, wait for the load event, collect console/log/exceptions, evaluate ``evaluate``
    (a JS expression whose value is returned by value) and take a PNG screenshot (the full page up to
    ``max_height`` px; with ``tile_height`` also the whole page as tiles)."""
    binary = binary or find_chromium()
    if not binary:
        raise FileNotFoundError("no chromium binary found (apt-get install chromium, or set LTBENCH_CHROMIUM)")
    profile = tempfile.mkdtemp(prefix="ltbench-chromium-")
    pipe = _Pipe(binary, profile)
    res = PageResult()
    try:
        target = pipe.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = pipe.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            pipe.send(f"{domain}.enable", session=session)
        pipe.send(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False},
            session=session,
        )
        pipe.send("Page.navigate", {"url": url}, session=session)
        pipe.wait_event("Page.loadEventFired", timeout=120)
        time.sleep(settle_s)
        if evaluate:
            r = pipe.send("Runtime.evaluate", {"expression": evaluate, "returnByValue": True}, session=session)
            res.evaluated = r.get("result", {}).get("value")
        metrics = pipe.send("Page.getLayoutMetrics", session=session)
        total = int((metrics.get("cssContentSize") or metrics["contentSize"])["height"])

        def capture(y: int, h: int) -> bytes:
            shot = {
                "format": "png",
                "captureBeyondViewport": True,
                "clip": {"x": 0, "y": y, "width": width, "height": h, "scale": 1},
            }
            return base64.b64decode(pipe.send("Page.captureScreenshot", shot, session=session, timeout=120)["data"])

        res.screenshot = capture(0, min(total, max_height) if full_page else height)
        if tile_height:
            res.tiles = [capture(y, min(tile_height, total - y)) for y in range(0, total, tile_height)]
        pipe.send("Runtime.evaluate", {"expression": "1"}, session=session)  # flush pending events
    finally:
        pipe.close()
        shutil.rmtree(profile, ignore_errors=True)
    for e in pipe.events:
        m, p = e.get("method"), e.get("params", {})
        if m == "Runtime.consoleAPICalled":
            text = " ".join(str(a.get("value", a.get("description", ""))) for a in p.get("args", []))
            res.console.append({"level": p.get("type"), "text": text})
        elif m == "Runtime.exceptionThrown":
            d = p.get("exceptionDetails", {})
            res.exceptions.append(d.get("exception", {}).get("description") or d.get("text", ""))
        elif m == "Log.entryAdded":
            res.log.append(p.get("entry", {}))
    return res
