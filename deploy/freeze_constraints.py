"""Write the pins of the Docker image: the installed version of every runtime dependency of
kling-gateway[scale,archive,otel].

Run from the repository root, in a venv where the project is installed (``make test`` makes one)::

    .venv/bin/python deploy/freeze_constraints.py > constraints.txt

Only the runtime closure is pinned (test and dev tools are not), so the image installs exactly what the tests ran
against. The Dockerfile installs with ``pip install -c constraints.txt '.[scale,archive,otel]'``; ``make`` does
the same for the development venv.
"""

from __future__ import annotations

import sys
from importlib.metadata import PackageNotFoundError, distribution

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

PROJECT = "kling-gateway"
EXTRAS = ("scale", "archive", "otel")


def runtime_closure(project: str = PROJECT, extras: tuple[str, ...] = EXTRAS) -> dict[str, str]:
    """Canonical name -> installed version of every package ``project[extras]`` needs on this platform."""
    found: dict[str, str] = {}
    seen: set[tuple[str, tuple[str, ...]]] = set()
    pending = [(canonicalize_name(project), extras)]
    while pending:
        name, wanted = pending.pop()
        if (name, wanted) in seen:
            continue
        seen.add((name, wanted))
        try:
            dist = distribution(name)
        except PackageNotFoundError:
            raise SystemExit(f"{name} is not installed in this environment; install the project first") from None
        if name != canonicalize_name(project):
            found[name] = dist.version
        for line in dist.requires or []:
            requirement = Requirement(line)
            markers = [{"extra": extra} for extra in ("", *wanted)]
            if requirement.marker is not None and not any(requirement.marker.evaluate(m) for m in markers):
                continue
            pending.append((canonicalize_name(requirement.name), tuple(sorted(requirement.extras))))
    return found


def main() -> int:
    pins = runtime_closure()
    print("# Runtime pins of kling-gateway[scale,archive,otel] (Docker image, dev venv). Regenerate with:")
    print("#   .venv/bin/python deploy/freeze_constraints.py > constraints.txt")
    for name in sorted(pins):
        print(f"{name}=={pins[name]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
