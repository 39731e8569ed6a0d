"""Screenshot a running sweep's Ray dashboard with headless Chromium (for docs and notes).

    python scripts/dashboard_screenshot.py http://127.0.0.1:8265 docs/dashboard.png overview actors

Writes one PNG per page (`docs/dashboard_overview.png`, ...). Ray 2.59+ asks the browser for
the cluster's auth token; this reads the local one (`~/.ray/auth_token`, what `ray
get-auth-token` prints) and sets it as the dashboard's cookie. Needs `pip install playwright`
and a Chromium (`apt install chromium`; `--chromium` for another path): not dependencies of
the project.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from urllib.parse import urlparse

TOKEN_COOKIE = "ray-authentication-token"  # ray._private.authentication.authentication_constants


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("url", help="dashboard address, e.g. http://127.0.0.1:8265")
    parser.add_argument("out", type=Path, help="PNG path; the page name is appended")
    parser.add_argument("pages", nargs="*", default=["overview"], help="overview, jobs, actors, cluster, ...")
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    parser.add_argument("--wait-ms", type=int, default=8000, help="time for the page's data to load")
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    token = (Path.home() / ".ray" / "auth_token").read_text().strip()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=args.chromium, args=["--no-sandbox", "--disable-dev-shm-usage"]
        )
        context = browser.new_context(viewport={"width": 1500, "height": 1000})
        host = urlparse(args.url).hostname or "127.0.0.1"
        context.add_cookies([{"name": TOKEN_COOKIE, "value": token, "domain": host, "path": "/"}])
        page = context.new_page()
        for name in args.pages:
            page.goto(f"{args.url.rstrip('/')}/#/{name}")
            page.wait_for_timeout(args.wait_ms)
            out = args.out.with_name(f"{args.out.stem}_{name}{args.out.suffix}")
            page.screenshot(path=str(out))
            print(out)
        browser.close()


if __name__ == "__main__":
    main()
