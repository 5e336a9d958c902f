"""Where reference data came from: shared by the make_reference_* programs. Plain Python, since some
of them run in a throwaway environment with the official code's own pinned versions."""

import subprocess
from pathlib import Path


def commit_of(checkout: Path) -> str:
    """The git commit of an official checkout, for the reference files' provenance."""
    try:
        return subprocess.run(["git", "-C", str(checkout), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
