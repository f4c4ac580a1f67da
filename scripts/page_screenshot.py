"""Screenshot a results page (reftbench-report DIR --html OUT.html) in headless chromium, full height.

    python scripts/page_screenshot.py results/mini/mini.html results/mini/mini_page.png [--width 1366]
"""
import argparse
import shutil
import time
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.chrome.service import Service


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("page", type=Path)
    parser.add_argument("png", type=Path)
    parser.add_argument("--width", type=int, default=1366, help="a laptop screen's width")
    args = parser.parse_args()
    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium")
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                f"--window-size={args.width},900"):
        opts.add_argument(arg)
    browser = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=opts)
    try:
        browser.get(args.page.resolve().as_uri())
        height = browser.execute_script("return document.documentElement.scrollHeight")
        browser.set_window_size(args.width, height + 140)  # + the window's own chrome
        time.sleep(1)  # plotly redraws at the new size
        browser.save_screenshot(str(args.png))
    finally:
        browser.quit()


if __name__ == "__main__":
    main()
