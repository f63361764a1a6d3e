"""Where the checkout's own folders are (suites, results), for code that reads or writes them."""

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
SUITES_DIR = REPO_ROOT / "suites"
