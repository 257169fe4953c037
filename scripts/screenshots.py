"""Take the documentation's dashboard screenshots from real runs (a `pipeline` runs folder).

    .venv/bin/python scripts/screenshots.py --runs runs --upload-from data/synthetic-test --out docs/images
    .venv/bin/python scripts/screenshots.py --runs runs --upload-from data/synthetic-test --pacs

Starts the app on a free local port over RUNS (read only), opens every panel in Debian's chromium with
the pipeline's VGG16 and Inception_v3 stage-2 runs chosen wherever a panel compares two runs, uploads the
series of one patient with a hemorrhage for the predict panel, and writes `dashboard-<panel>.png`.

``--pacs`` takes the PACS panels' screenshots instead (`dashboard-worklist.png`,
`dashboard-predict-pacs.png`; Debian's Orthanc needed): a throwaway Orthanc (tests/pacs_fixtures.py)
receives the series of four patients, a `pacs watch` poll with the Inception_v3 run predicts the two
with the least hemorrhage, and the dashboard opens the one with the most from its worklist, predicts it
and stores its SR (the fourth stays unpredicted).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
]
SETTLED = (
    "() => !document.documentElement.classList.contains('shiny-busy') && "
    "![...document.querySelectorAll('.recalculating')].some(e => e.offsetParent !== null)"
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_app(runs: Path, port: int, extra_env: dict[str, str] | None = None) -> subprocess.Popen:
    env = {**os.environ, "HEMORRHAGE_RUNS_DIR": str(runs), "CUDA_VISIBLE_DEVICES": "", **(extra_env or {})}
    cmd = [sys.executable, "-m", "shiny", "run", "--host", "127.0.0.1", "--port", str(port), "app.py"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2)
            return proc
        except OSError:
            if proc.poll() is not None:
                raise SystemExit(f"the app exited: {proc.stderr.read().decode()[-2000:]}") from None
            time.sleep(0.5)
    proc.kill()
    raise SystemExit("the app did not answer within 120 s")


class Camera:
    """One chromium page on the app: ``settle`` waits for Shiny and plotly, ``shoot`` writes
    ``OUT/dashboard-<name>.png`` once the page shows no output error."""

    def __init__(self, pw, port: int, width: int, out: Path) -> None:
        self.browser = pw.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        self.page = self.browser.new_page(viewport={"width": width, "height": 1000})
        self.page.goto(f"http://127.0.0.1:{port}/")
        self.out = out

    def settle(self) -> None:
        self.page.wait_for_function(SETTLED, timeout=120_000)
        self.page.wait_for_timeout(800)  # plotly draws after the data arrives

    def shoot(self, name: str) -> None:
        from playwright.sync_api import expect

        self.settle()
        expect(self.page.locator(".shiny-output-error")).to_have_count(0)
        path = self.out / f"dashboard-{name}.png"
        self.page.screenshot(path=str(path), full_page=True)
        print(f"wrote {path}")

    def show_likeliest_slice(self) -> None:
        """Select the slice the model finds most likely to bleed (the z profile's ``any`` trace)."""
        best = self.page.evaluate(
            "() => { const t = (document.getElementById('predict-profile').data || [])"
            ".find(x => x.name === 'any'); return t ? t.y.indexOf(Math.max(...t.y)) : 0; }"
        )
        self.page.select_option("#predict-slice", index=int(best))
        self.settle()


def hemorrhage_series(data: Path) -> list[Path]:
    """The slices of the patient with the most hemorrhage-positive slices (several types if possible)."""
    return ranked_series(data)[0]


def ranked_series(data: Path) -> list[list[Path]]:
    """Every series of the data set, the most hemorrhage-positive first (several types if possible)."""
    import pandas as pd

    from hemorrhage_core.dicom import read_header

    table = pd.read_csv(data / "stage_2_train.csv")
    parts = table["ID"].str.rsplit("_", n=1, expand=True)
    table["image"], table["label"] = parts[0], parts[1]
    wide = table.pivot_table(index="image", columns="label", values="Label", aggfunc="max")
    by_series: dict[str, list[Path]] = {}
    for path in sorted((data / "stage_2_train").glob("*.dcm")):
        by_series.setdefault(read_header(path).series_uid, []).append(path)

    def score(paths: list[Path]) -> tuple[int, int]:
        rows = wide.reindex([p.stem for p in paths]).fillna(0)
        types = int((rows.drop(columns="any").max() > 0).sum())
        return types, int(rows["any"].sum())

    return sorted(by_series.values(), key=score, reverse=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, required=True, help="a runs folder holding pipeline.json")
    parser.add_argument("--upload-from", type=Path, required=True, help="a data set (RSNA layout) to upload from")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "images")
    parser.add_argument("--width", type=int, default=1400)
    parser.add_argument("--pacs", action="store_true", help="the PACS panels' screenshots instead (needs Orthanc)")
    args = parser.parse_args()
    if args.pacs:
        return pacs_screenshots(args)

    from playwright.sync_api import expect, sync_playwright
    from shiny.playwright import controller

    pipeline = json.loads((args.runs / "pipeline.json").read_text())
    vgg, inception = pipeline["phase1"]["stage2"], pipeline["phase2"]["stage2"]
    series = hemorrhage_series(args.upload_from)
    args.out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    app = start_app(args.runs.resolve(), port)
    try:
        with sync_playwright() as pw:
            camera = Camera(pw, port, args.width, args.out)
            page, settle, shoot = camera.page, camera.settle, camera.shoot

            def open_panel(panel: str) -> None:
                controller.PageNavbar(page, "panel").set(panel)
                settle()

            settle()
            shoot("runs")
            open_panel("metrics")
            chosen = [pipeline[p][s] for p in ("phase1", "phase2") for s in ("stage1", "stage2")]
            controller.InputSelectize(page, "metrics-runs").set(chosen)
            # Every chosen run has its traces in the figure (the legend names end in the run's tag).
            page.wait_for_function(
                "tags => { const d = document.getElementById('metrics-curves').data || [];"
                " return tags.every(t => d.some(x => (x.name || '').includes(t))); }",
                arg=[run[-4:] for run in chosen],
                timeout=120_000,
            )
            shoot("metrics")
            open_panel("roc")
            controller.InputSelect(page, "roc-run_a").set(inception)
            controller.InputSelect(page, "roc-run_b").set(vgg)
            page.wait_for_function(
                "() => (document.getElementById('roc-roc').data || []).some(t => t.legendgroup === 'run1')",
                timeout=120_000,
            )
            shoot("roc")
            open_panel("thresholds")
            controller.InputSelect(page, "thresholds-run").set(inception)
            shoot("thresholds")
            open_panel("calibration")
            controller.InputSelect(page, "calibration-run").set(inception)
            page.wait_for_selector("#calibration-reliability.js-plotly-plot", timeout=120_000)
            shoot("calibration")
            open_panel("stn")
            controller.InputSelect(page, "stn-run").set(inception)
            shoot("stn")
            open_panel("compare")
            controller.InputSelect(page, "compare-run_a").set(vgg)
            controller.InputSelect(page, "compare-run_b").set(inception)
            # The bootstrap intervals arrive last (patients resampled a thousand times): wait for the
            # verdict of exactly this pair, not of the pair the panel opened with.
            page.wait_for_function(
                "tags => { const t = (document.getElementById('compare-verdict') || {}).innerText || '';"
                " return t.includes('A = ') && !t.includes('Computing') && tags.every(x => t.includes(x)); }",
                arg=[vgg[-4:], inception[-4:]],
                timeout=600_000,
            )
            shoot("compare")
            open_panel("predict")
            controller.InputSelect(page, "predict-model").set(inception)
            controller.InputFile(page, "predict-files").set([str(p) for p in series])
            expect(page.locator("#predict-aligned_image img")).to_be_visible(timeout=300_000)
            settle()
            camera.show_likeliest_slice()
            shoot("predict")
            if any(json.loads(p.read_text()).get("kind") == "grid" for p in args.runs.glob("*/run.json")):
                open_panel("grid")
                shoot("grid")
            open_panel("report")
            expect(page.locator("#report-download_report")).to_be_visible(timeout=300_000)
            page.wait_for_function(
                "() => ((document.getElementById('report-summary') || {}).innerText || '').length > 0",
                timeout=300_000,
            )
            shoot("report")
            camera.browser.close()
    finally:
        app.terminate()
        app.wait(timeout=30)
    return 0


def pacs_screenshots(args: argparse.Namespace) -> int:
    """The worklist and the Predict panel's PACS source over a throwaway Orthanc (see the docstring)."""
    import tempfile

    import pydicom
    from playwright.sync_api import expect, sync_playwright
    from shiny.playwright import controller

    sys.path.insert(0, str(REPO / "tests"))
    from pacs_fixtures import OrthancServer

    from hemorrhage_core.evaluations import read_calibration
    from hemorrhage_core.inference import Predictor
    from hemorrhage_core.pacs import PacsClient, Watcher, WatchState
    from hemorrhage_core.runs import read_run

    pipeline = json.loads((args.runs / "pipeline.json").read_text())
    run = read_run(args.runs / pipeline["phase2"]["stage2"])
    series = ranked_series(args.upload_from)
    chosen, watched, waiting = series[0], series[-2:], series[len(series) // 2]
    args.out.mkdir(parents=True, exist_ok=True)
    server = OrthancServer("hemorrhage-screenshots")
    server.start()
    app = None
    try:
        with tempfile.TemporaryDirectory(prefix="hemorrhage-shots-") as scratch:
            state = Path(scratch) / "watch.json"
            os.environ.update(server.env)  # this process's library calls read the credentials here
            predictor = Predictor.from_checkpoint(run.model_path, calibration=read_calibration(run.path))
            with PacsClient.from_url(server.url) as client:
                for paths in watched:
                    server.stow([pydicom.dcmread(p) for p in paths])
                watcher = Watcher(client, predictor, WatchState.load(state, url=client.url, run_id=run.id),
                                  run_id=run.id, include_existing=True)
                watcher.poll_once()
                watcher.poll_once()  # a study is predicted once its instance count has settled
            for paths in (chosen, waiting):
                server.stow([pydicom.dcmread(p) for p in paths])
            target = pydicom.dcmread(chosen[0], stop_before_pixels=True).StudyInstanceUID
            port = free_port()
            app = start_app(args.runs.resolve(), port, {"HEMORRHAGE_DICOMWEB_URL": server.url,
                                                       "HEMORRHAGE_PACS_WATCH_STATE": str(state), **server.env})
            with sync_playwright() as pw:
                camera = Camera(pw, port, args.width, args.out)
                page, settle, shoot = camera.page, camera.settle, camera.shoot

                controller.PageNavbar(page, "panel").set("worklist")
                controller.InputSelect(page, "worklist-model").set(run.path.name)
                rows = page.locator(f"#worklist-table tr[data-study='{target}']")
                expect(rows).to_have_count(1, timeout=120_000)
                rows.locator("button.worklist-open").click()
                expect(page.locator("#predict-status")).to_contain_text("slice(s) predicted", timeout=600_000)
                settle()
                camera.show_likeliest_slice()
                page.locator("#predict-pacs_push").click()
                expect(page.locator("#predict-pacs_pushed")).to_contain_text("Stored in the PACS", timeout=120_000)
                shoot("predict-pacs")
                controller.PageNavbar(page, "panel").set("worklist")
                expect(page.locator(f"#worklist-table tr[data-study='{target}']")).to_contain_text(
                    "SR stored", timeout=60_000)
                shoot("worklist")
                camera.browser.close()
    finally:
        if app is not None:
            app.terminate()
            app.wait(timeout=30)
        server.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
