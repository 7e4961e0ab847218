"""`instseg data check PATH`: a summary of a dataset in any supported format and every problem in it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from instseg.config import DataConfig
from instseg.data.formats import read_dataset
from instseg.data.parallel import available_cores
from instseg.data.schema import paused_gc
from instseg.data.validation import Problem, check_split, summarise_split


@dataclass
class CheckReport:
    root: Path
    format: str
    summaries: dict[str, dict[str, Any]] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not self.problems

    def kinds(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for problem in self.problems:
            counts[problem.kind] = counts.get(problem.kind, 0) + 1
        return counts


@paused_gc()
def check_dataset(
    root: Path, fmt: str | None = None, names: str | None = None, workers: int | None = None, decode: bool = False
) -> CheckReport:
    """Every split's summary and problems; `workers` processes (default: one per core) share the checks, and
    `decode` decodes every image fully (validation.image_problems)."""
    fmt, splits = read_dataset(root, fmt, names)
    report = CheckReport(root, fmt)
    workers = available_cores() if workers is None else max(1, workers)
    for split, data in splits.items():
        report.summaries[split] = summarise_split(data)
        report.problems.extend(check_split(data, _source_name(root, fmt, split), workers, decode))
    return report


def _source_name(root: Path, fmt: str, split: str) -> str:
    if fmt == "yolo":
        return str(root / "labels" / split)
    if fmt == "roboflow":
        return str(
            root / ("valid" if split == "val" and (root / "valid").is_dir() else split) / "_annotations.coco.json"
        )
    return str(root / "annotations" / f"instances_{split}.json")


def format_report(report: CheckReport, max_classes: int = 20) -> str:
    lines = [f"dataset {report.root} (format: {report.format})"]
    for split, s in report.summaries.items():
        lines.append(
            f"  split {split}: {s['images']} images, {s['instances']} instances, "
            f"{s['classes']} classes with instances, "
            f"{s['images_without_instances']} images without instances"
        )
        if s["width"]:
            w, h = s["width"], s["height"]
            lines.append(
                f"    image size: width {w['min']}-{w['max']} (median {w['median']}), "
                f"height {h['min']}-{h['max']} (median {h['median']})"
            )
        per_class = list(s["instances_per_class"].items())
        shown = ", ".join(f"{name} {count}" for name, count in per_class[:max_classes])
        more = f", ... {len(per_class) - max_classes} more" if len(per_class) > max_classes else ""
        lines.append(f"    instances per class: {shown}{more}")
    if report.clean:
        lines.append("no problems found")
    else:
        kinds = ", ".join(f"{kind} {count}" for kind, count in sorted(report.kinds().items()))
        lines.append(f"{len(report.problems)} problem(s): {kinds}")
        lines.extend(f"  {problem}" for problem in report.problems)
    return "\n".join(lines)


def missing_split_warnings(report: CheckReport, data: DataConfig | None = None) -> list[str]:
    """The training and validation splits a run would read (a config's, else the defaults) that the dataset
    lacks, each with how to make it."""
    data = data or DataConfig()
    warnings = []
    for key, split in (("data.train_split", data.train_split), ("data.val_split", data.val_split)):
        if split not in report.summaries:
            have = ", ".join(report.summaries) or "none"
            hint = f"set {key}"
            if key == "data.val_split":
                hint = f"make one with `instseg data split {report.root} --val 0.2`"
                if report.format != "coco":
                    convert = f"instseg data convert {report.root} DST"
                    hint = f"convert it (`{convert}`), then `instseg data split DST --val 0.2`"
            warnings.append(f"no split '{split}' ({key}) in {report.root} (it has: {have}): training needs it; {hint}")
    return warnings
