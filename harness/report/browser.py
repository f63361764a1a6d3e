"""Headless Chromium driven over the DevTools protocol on a pipe (no websocket, no extra packages).

Chromium started with ``--remote-debugging-pipe`` reads NUL-terminated JSON commands from fd 3 and
writes replies and events to fd 4.  :class:`Browser` opens one page, and offers what the HTML
leaderboard needs: evaluate JavaScript, click at a point with real mouse events, take a
full-page screenshot.  :func:`screenshot` is the one-call helper the publish step uses.

Chromium runs with its sandbox.  Only as root, where Chromium refuses to start sandboxed, is it started
with ``--no-sandbox`` (CI's containers run as root), and a warning says so: run as an unprivileged user to
keep the sandbox.  The pages it loads are the project's own reports.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import select
import shutil
import signal
import tempfile
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")
FLAGS = [
    "--headless", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--no-first-run", "--no-default-browser-check", "--disable-extensions",
    "--disable-sync", "--mute-audio", "--hide-scrollbars", "--disable-dev-shm-usage",
    "--remote-debugging-pipe",
]


class BrowserError(RuntimeError):
    pass


def running_as_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


def chromium_flags() -> list[str]:
    """:data:`FLAGS`, plus ``--no-sandbox`` only when running as root (Chromium will not start sandboxed
    as root), with a warning."""
    if running_as_root():
        log.warning("running as root: Chromium cannot use its sandbox as root and is started with --no-sandbox "
                    "(run as an unprivileged user to keep the sandbox)")
        return [*FLAGS, "--no-sandbox"]
    return list(FLAGS)


def find_chromium() -> str | None:
    """Path of a Chromium/Chrome executable ($QUANTBENCH_CHROMIUM first), or None."""
    env = os.environ.get("QUANTBENCH_CHROMIUM")
    if env:
        return env if Path(env).exists() else shutil.which(env)
    for name in CANDIDATES:
        p = shutil.which(name)
        if p:
            return p
    return None


class Browser:
    """One headless Chromium with one page, driven over the DevTools pipe."""

    def __init__(self, executable: str | None = None, width: int = 1280, height: int = 900,
                 timeout: float = 30.0) -> None:
        exe = executable or find_chromium()
        if not exe:
            raise BrowserError("no chromium executable found (install Debian's `chromium` package)")
        self.timeout = timeout
        self._profile = tempfile.mkdtemp(prefix="quantbench-chromium-")
        to_child_r, self._w = os.pipe()
        self._r, from_child_w = os.pipe()
        argv = [exe, *chromium_flags(), f"--user-data-dir={self._profile}", f"--window-size={width},{height}",
                "about:blank"]
        devnull = os.open(os.devnull, os.O_RDWR)
        actions = [
            (os.POSIX_SPAWN_DUP2, devnull, 0), (os.POSIX_SPAWN_DUP2, devnull, 1),
            (os.POSIX_SPAWN_DUP2, devnull, 2),
            (os.POSIX_SPAWN_DUP2, to_child_r, 3), (os.POSIX_SPAWN_DUP2, from_child_w, 4),
        ]
        try:
            self.pid = os.posix_spawn(exe, argv, dict(os.environ), file_actions=actions, setsid=True)
        except BaseException:
            for fd in (self._w, self._r):
                os.close(fd)
            shutil.rmtree(self._profile, ignore_errors=True)
            raise
        finally:
            for fd in (to_child_r, from_child_w, devnull):
                os.close(fd)
        self._buf = b""
        self._next_id = 0
        self._events: list[dict[str, Any]] = []
        self.session: str | None = None
        try:
            targets = self.call("Target.getTargets")["targetInfos"]
            pages = [t for t in targets if t.get("type") == "page"]
            target = pages[0]["targetId"] if pages else self.call("Target.createTarget", url="about:blank")["targetId"]
            self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
            self.call("Page.enable")
            self.call("Runtime.enable")
            self.call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1,
                      mobile=False)
        except BaseException:
            self.close()
            raise

    # ---------------------------------------------------------------- protocol
    def _read_message(self, deadline: float) -> dict[str, Any]:
        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BrowserError("timed out waiting for chromium")
            ready, _, _ = select.select([self._r], [], [], left)
            if not ready:
                continue
            chunk = os.read(self._r, 1 << 20)
            if not chunk:
                raise BrowserError("chromium closed the DevTools pipe (did it crash?)")
            self._buf += chunk
        msg, self._buf = self._buf.split(b"\0", 1)
        return json.loads(msg)

    def call(self, method: str, session: bool = True, **params: Any) -> dict[str, Any]:
        """Send one DevTools command and wait for its result (events seen meanwhile are kept)."""
        self._next_id += 1
        msg: dict[str, Any] = {"id": self._next_id, "method": method, "params": params}
        if session and self.session:
            msg["sessionId"] = self.session
        os.write(self._w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + self.timeout
        while True:
            reply = self._read_message(deadline)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise BrowserError(f"{method}: {reply['error'].get('message')}")
                return reply.get("result", {})
            if "method" in reply:
                self._events.append(reply)

    def wait_event(self, name: str) -> dict[str, Any]:
        deadline = time.monotonic() + self.timeout
        while True:
            for i, ev in enumerate(self._events):
                if ev["method"] == name:
                    return self._events.pop(i)
            ev = self._read_message(deadline)
            if "method" in ev:
                self._events.append(ev)

    # ---------------------------------------------------------------- page
    def goto(self, url: str) -> None:
        """Navigate and wait for the load event."""
        self._events = [e for e in self._events if e["method"] != "Page.loadEventFired"]
        res = self.call("Page.navigate", url=url)
        if res.get("errorText"):
            raise BrowserError(f"cannot load {url}: {res['errorText']}")
        self.wait_event("Page.loadEventFired")

    def evaluate(self, expression: str) -> Any:
        """Value of a JavaScript expression (returned by value, JSON-compatible)."""
        res = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in res:
            d = res["exceptionDetails"]
            raise BrowserError(f"JavaScript error: {d.get('exception', {}).get('description') or d.get('text')}")
        return res["result"].get("value")

    def click(self, x: float, y: float) -> None:
        """A real left click (mouse moved, pressed, released) at page coordinates."""
        self.call("Input.dispatchMouseEvent", type="mouseMoved", x=x, y=y)
        for kind in ("mousePressed", "mouseReleased"):
            self.call("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=1)

    def click_selector(self, selector: str) -> None:
        """Scroll the first element matching ``selector`` into view and click its centre."""
        box = self.evaluate(
            f"(() => {{ const e = document.querySelector({json.dumps(selector)}); if (!e) return null;"
            " e.scrollIntoView({block: 'center'}); const r = e.getBoundingClientRect();"
            " return [r.left + r.width / 2, r.top + r.height / 2]; })()")
        if box is None:
            raise BrowserError(f"no element matches {selector!r}")
        self.click(*box)

    def screenshot(self, path: str | Path, full_page: bool = True) -> Path:
        """PNG of the page (the whole scroll height when ``full_page``)."""
        params: dict[str, Any] = {"format": "png"}
        if full_page:
            w, h = self.evaluate("[document.documentElement.scrollWidth, document.documentElement.scrollHeight]")
            params.update(captureBeyondViewport=True, clip={"x": 0, "y": 0, "width": w, "height": h, "scale": 1})
        data = self.call("Page.captureScreenshot", **params)["data"]
        out = Path(path)
        out.write_bytes(base64.b64decode(data))
        return out

    def close(self) -> None:
        try:
            if self.session is not None:
                self.call("Browser.close", session=False)
        except (BrowserError, OSError):
            pass
        for fd in (self._w, self._r):
            try:
                os.close(fd)
            except OSError:
                pass
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            pid, _ = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                break
            time.sleep(0.05)
        else:
            try:
                os.killpg(self.pid, signal.SIGKILL)  # its own session (setsid): the browser's processes only
                os.waitpid(self.pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
        shutil.rmtree(self._profile, ignore_errors=True)

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def screenshot(html_path: str | Path, png_path: str | Path, width: int = 1280) -> Path:
    """Render ``html_path`` (a local file) in headless Chromium and save a full-page PNG."""
    with Browser(width=width) as b:
        b.goto(Path(html_path).resolve().as_uri())
        return b.screenshot(png_path)
