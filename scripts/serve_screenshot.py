"""The README's screenshot of `nerd serve`: serve the page, denoise the bundled sample in a headless chromium, save
docs/img/serve.png.

    python scripts/serve_screenshot.py [--out docs/img/serve.png] [--iterate K]

Needs gradio and selenium (pip install -e '.[test]') and Debian's chromium + chromium-driver. The sample is
denoised with the shipped sigma-25 weights and their own stopping rule (a minute on a 2-core CPU); the iteration view is
left at iterate K (default: the last). The page is captured 1400 px wide and stored 1200 px wide as a 128-colour
PNG (under 300 KB).
"""

from __future__ import annotations

import argparse
import shutil
import socket
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def wait(condition, seconds: float, what: str):  # noqa: ANN001, ANN201 -- a selenium lookup
    """condition()'s first truthy value within `seconds`; SystemExit naming `what` otherwise."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            found = condition()
        except Exception:
            found = None
        if found:
            return found
        time.sleep(0.3)
    raise SystemExit(f"timed out after {seconds:g} s waiting for {what}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "docs" / "img" / "serve.png"))
    parser.add_argument("--iterate", type=int, default=None, help="iterate shown in the iteration view")
    parser.add_argument("--width", type=int, default=1200, help="width of the saved image (the page is 1400 wide)")
    parser.add_argument("--colours", type=int, default=128, help="palette size of the saved PNG")
    parser.add_argument("--height", type=int, default=1460, help="window height in pixels")
    args = parser.parse_args()

    from PIL import Image
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    from nerd.serve import Engine, launch

    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not binary or not driver:
        raise SystemExit("needs chromium and chromedriver: sudo apt-get install chromium chromium-driver")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    engine = Engine(device="cpu")
    app = launch(engine, port=port, block=False)
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", f"--window-size=1400,{args.height}",
                "--hide-scrollbars", "--force-device-scale-factor=1"):
        options.add_argument(arg)
    browser = webdriver.Chrome(service=Service(driver), options=options)
    try:
        browser.get(f"http://127.0.0.1:{port}/")
        wait(lambda: browser.find_element(By.ID, "sample"), 60, "the page").click()
        wait(lambda: "sample" in browser.find_element(By.ID, "upload").text, 30, "the sample in the upload box")
        browser.find_element(By.ID, "denoise").click()
        start = time.monotonic()
        report = wait(lambda: "iterations" in (t := browser.find_element(By.ID, "report").text) and t, 600,
                      "the denoised sample")
        print(f"denoised in {time.monotonic() - start:.0f} s: {report}")
        if args.iterate is not None:
            box = browser.find_element(By.CSS_SELECTOR, "#scrub input[type=number]")
            box.send_keys(Keys.CONTROL, "a")
            box.send_keys(str(args.iterate), Keys.ENTER)
            wait(lambda: f"iterate z_{args.iterate}" in browser.find_element(By.ID, "caption").text, 30,
                 f"iterate {args.iterate}")
            browser.find_element(By.TAG_NAME, "h2").click()  # the number box loses its focus ring
        time.sleep(2)  # the plots draw
        raw = Path(args.out).with_suffix(".raw.png")
        raw.parent.mkdir(parents=True, exist_ok=True)
        browser.save_screenshot(str(raw))
    finally:
        browser.quit()
        app.close()
        engine.close()
    image = Image.open(raw).convert("RGB")
    image = image.resize((args.width, round(image.height * args.width / image.width)), Image.Resampling.LANCZOS)
    image.quantize(args.colours, method=Image.Quantize.MEDIANCUT).save(args.out, optimize=True)
    raw.unlink()
    print(f"{args.out}: {image.width}x{image.height}, {Path(args.out).stat().st_size / 1024:.0f} KB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
