"""The README's picture of MLflow's compare view (docs/mlflow-compare.png), taken with headless
Chromium (Debian: `apt-get install chromium`) against a flowar store, by default the quickstart's.

    .venv/bin/python docs/screenshot.py [--store flowar-runs/mlflow.db] [--experiment flowar-sweeps]
                                        [--prefix ablations-table6-injection-tiny-] [--out docs/mlflow-compare.png]

It starts `mlflow server` on the store (loopback), opens the compare view of the FINISHED runs of
the experiment whose names start with --prefix, and, through Chromium's DevTools protocol, sets
the parallel-coordinates plot to the swept parameters against eval/fid and closes the assistant
panel, then saves the page as PNG.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from urllib.parse import quote

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url: str, proc: subprocess.Popen, what: str) -> bytes:
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"{what} exited with status {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                return r.read()
        except OSError:
            time.sleep(0.5)


def compare_url(uri: str, experiment: str, prefix: str) -> tuple[str, list[str]]:
    from mlflow import MlflowClient

    c = MlflowClient(uri)
    exp = c.get_experiment_by_name(experiment)
    if exp is None:
        raise SystemExit(f"no experiment {experiment!r} in the store")
    runs = [r for r in c.search_runs([exp.experiment_id], "attributes.status = 'FINISHED'", max_results=500)
            if r.info.run_name.startswith(prefix)]
    if len(runs) < 2:
        raise SystemExit(f"{len(runs)} finished run(s) named {prefix}*: nothing to compare")
    keys = set.intersection(*(set(r.data.params) for r in runs))
    # the swept settings; the seed axis is replicates, not a setting (its lines would cross the plot)
    swept = sorted(k for k in keys if len({r.data.params[k] for r in runs}) > 1
                   and k not in ("mlflow.run_name", "train.seed"))
    ids = json.dumps(sorted(r.info.run_id for r in runs))
    return (f"{uri}/#/compare-runs?runs={quote(ids)}&experiments={quote(json.dumps([exp.experiment_id]))}",
            swept)


CLICK_TEXT = """(text) => {
  const el = [...document.querySelectorAll('button, [role=button]')].find(
      e => e.innerText.trim() === text || e.getAttribute('aria-label') === text);
  if (el) { el.click(); return true; } return false;
}"""
CLICK_ANY = """(text) => {
  const el = [...document.querySelectorAll('label, span, div, button')].reverse().find(
      e => e.innerText && e.innerText.trim() === text);
  if (el) { el.click(); return true; } return false;
}"""
FOCUS_SELECT = """(i) => {
  const el = document.querySelectorAll('.ant-select-selector, [class*=select-selector]')[i];
  if (!el) return false;
  el.dispatchEvent(new MouseEvent('mousedown', {bubbles: true}));
  const input = el.querySelector('input'); if (input) input.focus(); return true;
}"""


async def drive(ws_url: str, url: str, params: list[str], metric: str, out: Path) -> None:
    import aiohttp

    async with aiohttp.ClientSession() as session, session.ws_connect(ws_url, max_msg_size=0) as ws:
        counter = iter(range(1, 10**6))

        async def call(method, **params_):
            i = next(counter)
            await ws.send_json({"id": i, "method": method, "params": params_})
            async for msg in ws:
                data = json.loads(msg.data)
                if data.get("id") == i:
                    return data.get("result", {})

        async def js(fn: str, *args):
            expr = f"({fn})({', '.join(json.dumps(a) for a in args)})"
            return (await call("Runtime.evaluate", expression=expr, returnByValue=True))["result"].get("value")

        async def key(name: str, code: int):
            for kind in ("keyDown", "keyUp"):
                await call("Input.dispatchKeyEvent", type=kind, key=name, code=name,
                           windowsVirtualKeyCode=code)

        async def open_compare_view():
            await call("Page.navigate", url=url)
            for _ in range(120):  # the compare page renders once the runs have loaded
                if await js("() => !!document.querySelector('.ant-select-selector, [class*=select-selector]')"):
                    return
                await asyncio.sleep(0.5)
            raise SystemExit(f"the compare view did not render: {url}")

        await call("Page.enable")
        await open_compare_view()
        # The sidebar's layout switch (kept by the browser): Model training, as flowar's users work.
        if await js(CLICK_ANY, "Model training"):
            await asyncio.sleep(1)
            await open_compare_view()
        await js(CLICK_TEXT, "Close")  # the assistant panel
        await js(CLICK_TEXT, "Clear All")
        for index, values in ((0, params), (1, [metric])):
            for value in values:
                await js(FOCUS_SELECT, index)
                await call("Input.insertText", text=value)
                await asyncio.sleep(0.5)
                await key("Enter", 13)
            await key("Escape", 27)
        await asyncio.sleep(2)
        shot = await call("Page.captureScreenshot", format="png")
        out.write_bytes(base64.b64decode(shot["data"]))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", default=str(ROOT / "flowar-runs" / "mlflow.db"))
    p.add_argument("--experiment", default="flowar-sweeps")
    p.add_argument("--prefix", default="ablations-table6-injection-tiny-")
    p.add_argument("--metric", default="eval/fid")
    p.add_argument("--out", default=str(ROOT / "docs" / "mlflow-compare.png"))
    a = p.parse_args()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise SystemExit("no chromium on PATH (Debian: apt-get install chromium)")
    port, devtools = free_port(), free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    server = subprocess.Popen([str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1",
                               "--port", str(port), "--backend-store-uri", f"sqlite:///{Path(a.store).resolve()}"],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as profile:
        browser = subprocess.Popen([chromium, "--headless=new", "--no-sandbox", "--disable-gpu",
                                    "--hide-scrollbars", "--window-size=1600,1250",
                                    f"--remote-debugging-port={devtools}", f"--user-data-dir={profile}",
                                    "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            uri = f"http://127.0.0.1:{port}"
            wait_for(uri + "/health", server, "mlflow server")
            url, swept = compare_url(uri, a.experiment, a.prefix)
            pages = json.loads(wait_for(f"http://127.0.0.1:{devtools}/json", browser, "chromium"))
            page = next(t for t in pages if t["type"] == "page")
            asyncio.run(drive(page["webSocketDebuggerUrl"], url, swept, a.metric, Path(a.out)))
        finally:
            browser.terminate()
            server.terminate()
            browser.wait(timeout=30)  # before its profile folder is removed
    print(f"wrote {a.out} ({', '.join(swept)} against {a.metric})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
