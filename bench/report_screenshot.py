"""Open a sweep's report.html in a real headless browser (Debian's chromium) and save a
screenshot, to look at the page as a user would:

    python bench/report_screenshot.py <sweep dir> [out.png]

Needs chromium (`apt-get install chromium`); prints the screenshot's path."""
from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path


def main(argv: list[str]) -> int:
    sweep = Path(argv[0]).resolve()
    out = Path(argv[1] if len(argv) > 1 else sweep / "report_screenshot.png").resolve()
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        print("error: no chromium on PATH: apt-get install chromium", file=sys.stderr)
        return 2
    page = sweep / "report.html"
    if not page.exists():
        print(f"error: {page} does not exist: python -m pipelines.report {sweep}", file=sys.stderr)
        return 2
    # a closed network: no background connections, a fresh profile
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                        "--disable-quic", "--no-first-run", "--disable-background-networking",
                        "--disable-component-update", "--disable-sync", f"--user-data-dir={profile}",
                        f"--screenshot={out}", "--window-size=1400,2200", page.as_uri()],
                       check=True, capture_output=True, timeout=120)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
