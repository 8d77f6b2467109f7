"""`conveyor kserve chart`: a Helm chart that runs `conveyor serve` on a repository from a volume.

The chart's templates ship as files beside this module (chart/); only Chart.yaml and
values.yaml are filled in here: the chart's name and version, the image and the models.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from string import Template

from conveyor import __version__

CHART_SOURCE = Path(__file__).resolve().parent / "chart"
DASHBOARD_SOURCE = Path(__file__).resolve().parent / "dashboards" / "conveyor.json"
DASHBOARD_IN_CHART = Path("dashboards") / "conveyor.json"  # the path templates/dashboard-configmap.yaml reads
HELMIGNORE = "# Left out of the packaged chart.\n.git/\n*.orig\n*.swp\n*~\n"


def split_image(image: str) -> tuple[str, str]:
    """(repository, tag) of an image reference; the tag defaults to Conveyor's version."""
    name, separator, tag = image.rpartition(":")
    if not separator or "/" in tag:  # no tag, or the colon was a registry's port
        return image, __version__
    return name, tag


def write_chart(out: Path, *, name: str, image: str, models: list[str]) -> bool:
    """Write the chart into `out`; True when the Grafana dashboard was shipped with it."""
    out.mkdir(parents=True, exist_ok=True)
    shutil.copytree(CHART_SOURCE / "templates", out / "templates", dirs_exist_ok=True)
    (out / ".helmignore").write_text(HELMIGNORE)
    repository, tag = split_image(image)
    fill = {"name": name, "version": __version__, "image_repository": repository, "image_tag": tag,
            "models": json.dumps(models)}  # fmt: skip
    for file_name in ("Chart.yaml", "values.yaml"):
        text = (CHART_SOURCE / f"{file_name}.template").read_text()
        (out / file_name).write_text(Template(text).substitute(fill))
    if not DASHBOARD_SOURCE.is_file():
        return False
    (out / DASHBOARD_IN_CHART).parent.mkdir(exist_ok=True)
    shutil.copyfile(DASHBOARD_SOURCE, out / DASHBOARD_IN_CHART)
    return True
