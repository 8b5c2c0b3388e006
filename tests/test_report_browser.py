"""report.html opened in a real browser: headless Debian ``chromium`` (``.ci/run`` installs it).

How the page is checked, and why this way: chromium's own ``--enable-logging=stderr``
prints every console message of the page as a ``CONSOLE`` line, and a copy of the
report gets one small probe script that, once the page has loaded, logs how many
charts it drew and how many of its images decoded (``naturalWidth > 0``). The
report itself has no script, so any other console line (an uncaught error, a
blocked request the page made) fails the test. That needs nothing but the
browser: a driver library (playwright, selenium) would add a large dev dependency
and a second way of launching chromium for the same three facts. Name resolution
is mapped to nowhere, so a page that tried to fetch anything could not. Without
chromium the test is skipped, except where DATAPOOL_REQUIRE_CHROMIUM is set (.ci/run
sets it after installing the package).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
from PIL import Image

from datapool.layout import REPORT_FILES
from tests.test_report import _increment

pytestmark = pytest.mark.slow  # a browser start: several seconds

CHROMIUM = "/usr/bin/chromium"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--host-resolver-rules=MAP * ~NOTFOUND",
    "--enable-logging=stderr",
    "--log-level=0",
    "--window-size=1280,2600",
    "--virtual-time-budget=5000",  # let the load event (and the probe) run before the shot
]
PROBE = """<script>
window.addEventListener("load", () => {
  const images = [...document.images];
  console.log("PROBE " + JSON.stringify({
    charts: document.querySelectorAll("svg.chart").length,
    images: images.length,
    decoded: images.filter((i) => i.complete && i.naturalWidth > 0).length,
  }));
});
</script>"""
CONSOLE = re.compile(r':CONSOLE(?:\(\d+\))?:?\d*\] "(.*)", source: ')


def open_in_chromium(page: Path, screenshot: Path, profile: Path) -> list[str]:
    """Load ``page`` in headless chromium with a fresh profile; save a screenshot; return the
    page's console messages."""
    result = subprocess.run(
        [
            CHROMIUM,
            *FLAGS,
            f"--user-data-dir={profile}",
            f"--screenshot={screenshot}",
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return CONSOLE.findall(result.stderr)


@pytest.mark.skipif(
    not Path(CHROMIUM).is_file() and not os.environ.get("DATAPOOL_REQUIRE_CHROMIUM"),
    reason="needs Debian's chromium (.ci/run installs it: apt-get install chromium)",
)
def test_report_loads_in_chromium_with_plots_images_and_no_console_errors(
    tmp_path: Path,
) -> None:
    _, _, out = _increment(tmp_path, pool_rows=6, n_samples=4)
    report = out / "report" / REPORT_FILES["html"]
    probed = tmp_path / "probed.html"
    probed.write_text(report.read_text(encoding="utf-8").replace("</body>", PROBE + "</body>"))
    shot = tmp_path / "report.png"
    messages = open_in_chromium(probed, shot, tmp_path / "profile")
    probes = [json.loads(m.removeprefix("PROBE ")) for m in messages if m.startswith("PROBE ")]
    assert probes == [{"charts": 4, "images": 4 + 2 * 6, "decoded": 4 + 2 * 6}], messages
    assert [m for m in messages if not m.startswith("PROBE ")] == []
    with Image.open(shot) as image:
        assert image.size == (1280, 2600)
        colours = image.convert("RGB").getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 200  # charts and thumbnails, not a blank page
