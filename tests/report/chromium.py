"""Open an HTML file in headless Chromium and report what a user's browser would see.

Speaks the Chrome DevTools Protocol over ``--remote-debugging-pipe`` (fd 3 in, fd 4 out,
messages separated by NUL), so no websocket client and no network port are needed. Records
console errors, uncaught exceptions and every request the page makes, evaluates a script in the
page and takes a full-page screenshot. Used by the run report's and the tuning report's tests.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import queue
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "chrome")


def find_chromium() -> str | None:
    """The browser's path (``$CHROMIUM`` first), or ``None`` when none is installed."""
    env = os.environ.get("CHROMIUM")
    if env and Path(env).exists():
        return env
    for name in CANDIDATES:
        path = shutil.which(name)
        if path:
            return path
    return None


@dataclass
class PageVisit:
    """What happened while the page was open."""

    url: str
    console_errors: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)
    result: Any = None  # the value of the evaluated script
    screenshot: Path | None = None

    def external_requests(self) -> list[str]:
        """Requests that left the page: anything but the file itself and inline data."""
        return [
            u
            for u in self.requests
            if u != self.url and not u.startswith(("data:", "blob:", "about:"))
        ]


class _Pipe:
    def __init__(self, exe: str, profile_dir: Path):
        to_child_r, self._to_child = os.pipe()
        self._from_child, from_child_w = os.pipe()

        def wire_fds() -> None:  # in the child, before exec: fd 3 reads commands, fd 4 answers
            a = fcntl.fcntl(to_child_r, fcntl.F_DUPFD, 100)
            b = fcntl.fcntl(from_child_w, fcntl.F_DUPFD, 100)
            os.dup2(a, 3)
            os.dup2(b, 4)

        args = [
            exe,
            "--headless=new",
            "--no-sandbox",  # tests may run as root in a container
            "--disable-gpu",
            "--remote-debugging-pipe",
            f"--user-data-dir={profile_dir}",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-extensions",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-default-apps",
            "--disable-dev-shm-usage",
            "--mute-audio",
            "--hide-scrollbars",
            "about:blank",
        ]
        self._log = open(os.environ.get("CHROMIUM_LOG", os.devnull), "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            # CHROMIUM_LOG=FILE keeps the browser's own log when a test needs debugging.
            stderr=self._log,
            preexec_fn=wire_fds,
            # dup2 made fds 3 and 4 inheritable; everything else Python opens is close-on-exec.
            close_fds=False,
        )
        os.close(to_child_r)
        os.close(from_child_w)
        self.messages: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._next_id = 0
        threading.Thread(target=self._read, daemon=True).start()
        self.events: list[dict[str, Any]] = []

    def _read(self) -> None:
        buf = b""
        while True:
            try:
                chunk = os.read(self._from_child, 1 << 16)
            except OSError:
                chunk = b""
            if not chunk:
                self.messages.put(None)
                return
            buf += chunk
            while b"\0" in buf:
                msg, buf = buf.split(b"\0", 1)
                self.messages.put(json.loads(msg))

    def call(
        self,
        method: str,
        params: dict | None = None,
        session: str | None = None,
        timeout: float = 60,
    ) -> dict:
        self._next_id += 1
        mid = self._next_id
        msg: dict[str, Any] = {"id": mid, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._to_child, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            m = self.messages.get(timeout=max(0.01, deadline - time.monotonic()))
            if m is None:
                raise RuntimeError(f"chromium exited during {method}")
            if m.get("id") == mid:
                if "error" in m:
                    raise RuntimeError(f"{method}: {m['error']}")
                return m.get("result", {})
            self.events.append(m)

    def wait_event(self, method: str, timeout: float = 60) -> dict:
        for ev in self.events:
            if ev.get("method") == method:
                return ev
        deadline = time.monotonic() + timeout
        while True:
            m = self.messages.get(timeout=max(0.01, deadline - time.monotonic()))
            if m is None:
                raise RuntimeError(f"chromium exited waiting for {method}")
            self.events.append(m)
            if m.get("method") == method:
                return m

    def drain(self) -> None:
        while True:
            try:
                m = self.messages.get_nowait()
            except queue.Empty:
                return
            if m is not None:
                self.events.append(m)

    def close(self) -> None:
        try:
            self.call("Browser.close", timeout=10)
        except Exception:
            pass
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()
        for fd in (self._to_child, self._from_child):
            try:
                os.close(fd)
            except OSError:
                pass


def visit(
    html_file: Path,
    script: str,
    ready: str = "true",
    screenshot: Path | None = None,
    exe: str | None = None,
    timeout: float = 90,
) -> PageVisit:
    """Open ``html_file``, wait until the JS expression ``ready`` is true, evaluate ``script``.

    Args:
        html_file: the page to open (as a ``file://`` URL).
        script: a JS expression whose JSON-serialisable value becomes ``PageVisit.result``.
        ready: a JS expression polled until true (e.g. every plot has drawn).
        screenshot: where to save a full-page PNG.
        exe: the browser (default: :func:`find_chromium`).
        timeout: seconds for loading and for ``ready``.
    """
    exe = exe or find_chromium()
    if exe is None:
        raise RuntimeError("no chromium found")
    url = Path(html_file).resolve().as_uri()
    profile = Path(html_file).resolve().parent / f".chromium-profile-{os.getpid()}"
    pipe = _Pipe(exe, profile)
    out = PageVisit(url=url)
    try:
        target = pipe.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = pipe.call("Target.attachToTarget", {"targetId": target, "flatten": True})[
            "sessionId"
        ]
        for domain in ("Runtime", "Log", "Network", "Page"):
            pipe.call(f"{domain}.enable", session=session)
        pipe.call(
            "Emulation.setDeviceMetricsOverride",
            {"width": 1280, "height": 900, "deviceScaleFactor": 1, "mobile": False},
            session=session,
        )
        pipe.events.clear()
        pipe.call("Page.navigate", {"url": url}, session=session)
        pipe.wait_event("Page.loadEventFired", timeout)
        deadline = time.monotonic() + timeout
        while True:
            r = pipe.call(
                "Runtime.evaluate",
                {"expression": f"!!({ready})", "returnByValue": True},
                session=session,
            )
            if r.get("result", {}).get("value") is True or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        r = pipe.call(
            "Runtime.evaluate",
            {"expression": f"JSON.stringify({script})", "returnByValue": True},
            session=session,
        )
        if "exceptionDetails" in r:
            raise RuntimeError(f"script failed in the page: {r['exceptionDetails']}")
        out.result = json.loads(r["result"]["value"])
        if screenshot is not None:
            size = pipe.call("Page.getLayoutMetrics", session=session)["cssContentSize"]
            shot = pipe.call(
                "Page.captureScreenshot",
                {
                    "format": "png",
                    "captureBeyondViewport": True,
                    "clip": {
                        "x": 0,
                        "y": 0,
                        "width": size["width"],
                        "height": min(size["height"], 16000),
                        "scale": 1,
                    },
                },
                session=session,
            )
            screenshot.write_bytes(base64.b64decode(shot["data"]))
            out.screenshot = screenshot
        pipe.drain()
    finally:
        pipe.close()
        shutil.rmtree(profile, ignore_errors=True)
    for ev in pipe.events:
        method, params = ev.get("method"), ev.get("params", {})
        if method == "Network.requestWillBeSent":
            out.requests.append(params["request"]["url"])
        elif method == "Runtime.exceptionThrown":
            d = params.get("exceptionDetails", {})
            out.console_errors.append(
                f"uncaught: {d.get('text')} {d.get('exception', {}).get('description', '')}"
            )
        elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            out.console_errors.append(
                "console.error: "
                + " ".join(
                    str(a.get("value", a.get("description"))) for a in params.get("args", [])
                )
            )
        elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
            e = params["entry"]
            out.console_errors.append(f"{e.get('source')}: {e.get('text')} {e.get('url', '')}")
    return out


# Every plotly figure of the page: its id, how many traces carry data, how many marks it drew.
PLOTS_SCRIPT = """
Array.from(document.querySelectorAll('.js-plotly-plot')).map(gd => ({
  id: gd.id,
  title: (gd.layout && gd.layout.title && (gd.layout.title.text || gd.layout.title)) || '',
  traces_with_data: (gd.data || []).filter(t =>
      ['x', 'y', 'z'].some(k => t[k] && t[k].length > 0)).length,
  marks: gd.querySelectorAll(
      '.scatterlayer .trace path.js-line, .scatterlayer .trace .point, .barlayer .point path, ' +
      '.heatmaplayer image, .hm image').length,
}))
"""

PLOTS_READY = (
    "Array.from(document.querySelectorAll('.plotly-graph-div'))"
    ".every(gd => gd.classList.contains('js-plotly-plot') && gd._fullLayout)"
)
