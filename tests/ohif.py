"""Drive the OHIF viewer shipped in the monailabel wheel (served at /ohif/) in headless Debian
Chromium with Playwright, as a user would: open a study in the MONAI Label mode, connect, pick a
model and a label, click a voxel, run, and read back the labelmap OHIF holds.

Only loopback is reachable from the page (OHIF asks Google Fonts for its typeface: refused).
No browser is downloaded: Playwright drives /usr/bin/chromium.
"""

import os
import shutil
import time
from pathlib import Path
from urllib.parse import urlparse

CHROMIUM = os.environ.get("SAMLABEL_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
VIEWPORT = {"width": 1600, "height": 900}
AXIAL = "mpr-axial"


def browser_missing() -> str:
    """Why the OHIF tests cannot run here ('' when they can)."""
    if not (os.access(CHROMIUM, os.X_OK) or shutil.which(CHROMIUM)):
        return f"{CHROMIUM} not found (Debian package chromium)"
    try:
        import playwright  # noqa: F401
    except ImportError:
        return "playwright is not installed (requirements.txt)"
    return ""


def _viewport_js(body: str, guarded: bool = False) -> str:
    """A page function with `vp` = the axial viewport and `data` = its vtkImageData; guarded:
    false while the viewer is still being built."""
    function = ("const vp = window.cornerstone.getRenderingEngines()[0].getViewport('%s');"
                " const data = vp.getImageData().imageData; %s" % (AXIAL, body))
    return "(args) => { %s }" % (f"try {{ {function} }} catch (error) {{ return false; }}" if guarded else function)


# Statistics of OHIF's labelmap of segmentation '1' (the one the MONAI Label panel fills),
# computed in the page: voxel index (i, j, k) of flat index i + nx (j + ny k).
LABELMAP_STATS_JS = """() => {
  const volume = window.services.segmentationService.getLabelmapVolume('1');
  const [nx, ny, nz] = volume.dimensions;
  const data = volume.voxelManager.getCompleteScalarDataArray();
  let count = 0; const sum = [0, 0, 0]; const lo = [nx, ny, nz]; const hi = [-1, -1, -1];
  const values = {}; const slices = {};
  for (let n = 0; n < data.length; n++) {
    const v = data[n];
    if (!v) continue;
    const ijk = [n % nx, Math.floor(n / nx) % ny, Math.floor(n / (nx * ny))];
    count++; values[v] = (values[v] || 0) + 1; slices[ijk[2]] = (slices[ijk[2]] || 0) + 1;
    for (let a = 0; a < 3; a++) { sum[a] += ijk[a]; lo[a] = Math.min(lo[a], ijk[a]); hi[a] = Math.max(hi[a], ijk[a]); }
  }
  return {dimensions: [nx, ny, nz], count, centroid: sum.map(s => count ? s / count : null),
          min: lo, max: hi, values, slices};
}"""

# label -> [segment index, [r, g, b]] of the segments OHIF made from the labels of /info/.
SEGMENTS_JS = """(viewportId) => {
  const segmentation = window.services.segmentationService.getSegmentation('1');
  const color = window.cornerstoneTools.segmentation.config.color;
  const found = {};
  for (const [index, segment] of Object.entries(segmentation.segments)) {
    if (!segment) continue;
    const rgba = color.getSegmentIndexColor(viewportId, '1', Number(index));
    found[segment.label] = [Number(index), Array.from(rgba).slice(0, 3)];
  }
  return found;
}"""


class OhifSession:
    """One browser page on OHIF's MONAI Label mode. Use as a context manager."""

    def __init__(self, server_url: str, artifacts: Path):
        self.server_url = server_url.rstrip("/")
        self.artifacts = Path(artifacts)
        self.artifacts.mkdir(parents=True, exist_ok=True)
        self.console, self.page_errors, self.infer_requests = [], [], []

    def __enter__(self) -> "OhifSession":
        from playwright.sync_api import sync_playwright

        self._playwright = sync_playwright().start()
        self.browser = self._playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        self.context = self.browser.new_context(viewport=VIEWPORT)
        self.context.route("**/*", self._only_loopback)
        self.page = self.context.new_page()
        self.page.on("console", lambda m: self.console.append({"type": m.type, "text": m.text}))
        self.page.on("pageerror", lambda e: self.page_errors.append(str(e)))
        self.page.on("request", self._record_infer)
        return self

    def __exit__(self, *exc) -> None:
        self.browser.close()
        self._playwright.stop()

    @staticmethod
    def _only_loopback(route) -> None:
        host = urlparse(route.request.url).hostname
        if host in ("127.0.0.1", "localhost") or route.request.url.startswith(("data:", "blob:")):
            route.continue_()
        else:
            route.abort()

    def _record_infer(self, request) -> None:
        if "/infer/" in request.url and request.method == "POST":
            self.infer_requests.append({"url": request.url, "body": request.post_data})

    def screenshot(self, name: str) -> Path:
        path = self.artifacts / f"{name}.png"
        self.page.screenshot(path=str(path))
        return path

    def open_study(self, study_uid: str, timeout_ms: int = 120_000) -> None:
        """The study in OHIF's MONAI Label mode, connected to the server that serves OHIF."""
        page = self.page
        page.goto(f"{self.server_url}/ohif/monai-label?StudyInstanceUIDs={study_uid}", timeout=timeout_ms)
        banner = page.get_by_text("Confirm and Hide")
        banner.wait_for(timeout=timeout_ms)
        banner.click()
        page.wait_for_function(_viewport_js("return !!(data && data.getDimensions()[2] > 1);", guarded=True),
                               timeout=timeout_ms)
        page.locator("#monailabelServerURL").fill(self.server_url + "/")
        page.locator("table.settingsTable button.actionButton").first.click()
        page.get_by_text("Connected to MONAI Label - Successful").first.wait_for(timeout=timeout_ms)
        time.sleep(1.5)  # the panel creates the label segments on a timer after connecting

    def distance_to_plane(self, ijk) -> float:
        """Signed distance (mm) from voxel ijk's centre to the axial plane shown. OHIF reslices
        the volume: with oblique images the axial plane is not a k plane."""
        return self.page.evaluate(_viewport_js(
            "const w = data.indexToWorld(args); const cam = vp.getCamera();"
            " return [0, 1, 2].reduce((s, a) => s + (w[a] - cam.focalPoint[a]) * cam.viewPlaneNormal[a], 0);"),
            list(map(float, ijk)))

    def scroll_to(self, ijk) -> None:
        """Scroll the axial view (mouse wheel, one notch a plane) to the plane nearest voxel ijk."""
        box = self.page.locator(f"[data-viewport-uid='{AXIAL}'] canvas").first.bounding_box()
        self.page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
        distance = self.distance_to_plane(ijk)
        notch = 100
        new = self._wheel(notch, ijk, distance)
        if abs(new) > abs(distance):
            notch = -notch  # the other way
        distance = new
        for _ in range(500):
            new = self._wheel(notch, ijk, distance)
            if abs(new) >= abs(distance):  # passed the nearest plane: one back
                self._wheel(-notch, ijk, new)
                return
            distance = new
        raise AssertionError(f"could not scroll the axial view to voxel {list(ijk)}")

    def _wheel(self, notch: int, ijk, distance: float) -> float:
        self.page.mouse.wheel(0, notch)
        self.page.wait_for_function(_viewport_js(
            "const w = data.indexToWorld(args[0]); const cam = vp.getCamera();"
            " return Math.abs([0, 1, 2].reduce((s, a) => s + (w[a] - cam.focalPoint[a]) * cam.viewPlaneNormal[a], 0)"
            " - args[1]) > 1e-3;"), arg=[list(map(float, ijk)), distance], timeout=10_000)
        return self.distance_to_plane(ijk)

    def probe_points(self) -> list:
        """Continuous voxel indices of the point prompts placed so far (OHIF sends them rounded)."""
        return self.page.evaluate(_viewport_js(
            "return window.cornerstoneTools.annotation.state.getAllAnnotations()"
            ".filter(a => a.metadata.toolName === 'ProbeMONAILabel')"
            ".map(a => Array.from(data.worldToIndex(a.data.handles.points[0])));"))

    def canvas_point(self, ijk) -> tuple:
        """Page coordinates of voxel ijk's centre in the axial view."""
        x, y = self.page.evaluate(_viewport_js(
            "const world = data.indexToWorld(args); return vp.worldToCanvas(world);"), list(map(float, ijk)))
        box = self.page.locator(f"[data-viewport-uid='{AXIAL}'] canvas").first.bounding_box()
        scale = box["width"] / self.page.evaluate(_viewport_js("return vp.canvas.clientWidth;"))
        return box["x"] + x * scale, box["y"] + y * scale

    def choose(self, tab: str, model: str, label: str = "") -> None:
        """Open a tab of the MONAI Label panel, pick the model (and the label row)."""
        page = self.page
        self.tab = page.locator("div.tab", has=page.locator("label.tab-label", has_text=tab)).first
        self.tab.locator("label.tab-label").click()
        self.tab.locator("select.selectBox").select_option(model)
        if label:
            self.tab.locator("tr.clickable-row", has_text=label).first.click()

    def click_voxel(self, ijk) -> list:
        """Scroll to voxel ijk and click it; returns the continuous voxel index of the point
        placed (off by up to half a plane spacing along the view normal with oblique images,
        and by the rounding of the mouse position to whole pixels)."""
        self.scroll_to(ijk)
        x, y = self.canvas_point(ijk)
        before = len(self.probe_points())
        self.page.mouse.click(x, y)
        self.page.wait_for_function(
            "(n) => window.cornerstoneTools.annotation.state.getAllAnnotations()"
            ".filter(a => a.metadata.toolName === 'ProbeMONAILabel').length > n", arg=before, timeout=10_000)
        return self.probe_points()[-1]

    def clear_points(self) -> None:
        self.tab.get_by_text("Clear All Points").click()

    def run(self, model: str, success_text: str, timeout_ms: int = 300_000) -> float:
        """Press the chosen tab's Run button; returns seconds from press to the overlay's update."""
        page = self.page
        before = len(self.infer_requests)
        start = time.perf_counter()
        with page.expect_response(lambda r: f"/infer/{model}?" in r.url, timeout=timeout_ms) as response_info:
            self.tab.locator("button.actionButton", has_text="Run").click()
        response = response_info.value
        if response.status != 200:
            raise AssertionError(f"/infer/{model} answered {response.status}: {response.text()[:500]}")
        page.get_by_text(success_text).first.wait_for(timeout=timeout_ms)
        elapsed = time.perf_counter() - start
        assert len(self.infer_requests) > before, "the infer request was not seen"
        return elapsed

    def labelmap(self) -> dict:
        return self.page.evaluate(LABELMAP_STATS_JS)

    def segments(self) -> dict:
        """OHIF's segments of segmentation '1' as drawn in the axial view: label -> (index, RGB)."""
        return self.page.evaluate(SEGMENTS_JS, AXIAL)

    def tick_option(self, model: str, key: str) -> None:
        """Open the panel's Options / Configurations dialog and tick a boolean config key of a model
        (sent with that model's later requests once confirmed)."""
        page = self.page
        page.get_by_text("Options / Configurations").first.click()
        dialog = page.locator("div.optionsForm")
        dialog.locator("select[name='selectSection']").select_option("infer")
        dialog.locator("select[name='selectName']").select_option(model)
        dialog.locator(f"input[id='infer{model}{key}']").check()

    def confirm_options(self) -> None:
        self.page.get_by_role("button", name="Confirm").click()
        self.page.locator("div.optionsForm").wait_for(state="detached", timeout=10_000)

    def image_dimensions(self) -> list:
        return self.page.evaluate(_viewport_js("return Array.from(data.getDimensions());"))
