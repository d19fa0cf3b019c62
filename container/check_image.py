"""Build-time check of the runner image: Python and cloudexec are the versions asked for.

Run by the Dockerfiles after installing, so an image that could not read its
clients' pickles (another Python minor version) or speaks another cloudexec
fails to build rather than failing its first job::

    python check_image.py --python 3.11 --cloudexec 0.1.0

Exit status 0 when both match, 1 with one line per mismatch otherwise.
"""

from __future__ import annotations

import argparse
import sys


def check(python: str, cloudexec_version: str) -> list[str]:
    """Returns what differs from the requested versions (empty when all match).

    Args:
        python: The clients' Python version, ``3.11`` (a patch level is ignored).
        cloudexec_version: The clients' cloudexec version, e.g. ``0.1.0``.
    """
    problems = []
    wanted = ".".join(python.split(".")[:2])
    running = f"{sys.version_info.major}.{sys.version_info.minor}"
    if wanted != running:
        problems.append(
            f"the image runs Python {running} but PYTHON_VERSION={python}: dill pickles do not travel "
            "across Python minor versions; build from the base image of your clients' Python"
        )
    try:
        from cloudexec._version import __version__
    except ImportError as exc:
        problems.append(f"cloudexec is not importable in the image ({exc}); check the pip install step")
    else:
        if __version__ != cloudexec_version:
            problems.append(
                f"the image has cloudexec {__version__} but CLOUDEXEC_VERSION={cloudexec_version}: build "
                "from a checkout of your clients' cloudexec version (git checkout v<version>)"
            )
    return problems


def main(argv: list[str] | None = None) -> int:
    """Checks the running interpreter; prints each mismatch to stderr."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--python", required=True, help="the clients' Python version, e.g. 3.11")
    parser.add_argument("--cloudexec", required=True, help="the clients' cloudexec version, e.g. 0.1.0")
    args = parser.parse_args(argv)
    problems = check(args.python, args.cloudexec)
    for problem in problems:
        sys.stderr.write(f"cloudexec image: {problem}\n")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
