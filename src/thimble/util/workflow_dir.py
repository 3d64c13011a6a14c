"""Where the workflow's own files are: the directory holding ``Snakefile``, ``rules/`` and ``workflow/``.

The package runs the workflow's stages, but the workflow itself (the Snakefile, the rules, the report
captions, the shipped calibrations in ``workflow/calibration/``) is not part of the package: it lives in
a clone of the repository. An editable install finds it beside its source; a non-editable one (``pip
install .``, a wheel) has only ``site-packages``, so the clone is looked for, in this order, in

1. ``$THIMBLE_WORKFLOW`` (the Snakefile sets it to its own directory, so its jobs find the workflow
   that started them even when ``--directory`` points elsewhere);
2. the source checkout the package was installed from in editable mode;
3. the current working directory and its parents.

The config schema is part of the workflow too (``workflow/schemas/config.schema.yaml``).
Kept free of torch and h5py: the Snakefile imports it while building the DAG.
"""

from __future__ import annotations

import os
from pathlib import Path

from thimble.errors import ThimbleError

#: an explicit workflow directory, checked first
WORKFLOW_ENV = "THIMBLE_WORKFLOW"


class WorkflowNotFoundError(ThimbleError):
    """No workflow directory (a clone of the repository) could be found."""


def is_workflow_dir(path: Path) -> bool:
    """Whether ``path`` holds the workflow: its Snakefile and the rule files it includes."""
    return (path / "Snakefile").is_file() and (path / "rules").is_dir()


def source_checkout() -> Path:
    """The directory two levels above the package (``src/thimble`` → the checkout) in an editable
    install; in an installed copy it is somewhere inside the environment and holds no Snakefile."""
    package = Path(__file__).resolve().parents[1]  # this module is thimble/util/workflow_dir.py
    return package.parents[1]


def find_workflow_dir(cwd: Path | None = None) -> Path:
    """The workflow directory (see the module's docstring for the order), resolved.

    Raises ``WorkflowNotFoundError`` naming what was searched and the two ways out.
    """
    explicit = os.environ.get(WORKFLOW_ENV)
    if explicit:
        # a wrong explicit setting is an error, not a reason to quietly use some other clone
        path = Path(explicit).expanduser().resolve()
        if not is_workflow_dir(path):
            raise WorkflowNotFoundError(f"{WORKFLOW_ENV}={explicit} is not a thimble workflow directory (no "
                                        f"Snakefile and rules/ in {path}); point it at a clone of the repository")
        return path
    if is_workflow_dir(source_checkout()):
        return source_checkout()
    start = (cwd or Path.cwd()).resolve()
    for candidate in (start, *start.parents):
        if is_workflow_dir(candidate):
            return candidate
    raise WorkflowNotFoundError(f"no thimble workflow (a directory with Snakefile and rules/) in {start} or its "
                                f"parents, nor beside the installed package; run inside a clone of the workflow "
                                f"repository or set {WORKFLOW_ENV} to one")
