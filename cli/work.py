"""``easyphoto work``: the arithmetic of painting faces, for capacity planning (``docs/design.md``).

The rows a Generate runs (``server/pipeline.py: planned_rows``, at the request's pass settings)
times each row's FLOPs (``engines/models/work.py``, counted at one square crop side), and, given a
device's peak, the faces per second it would paint at a share of that peak. Counted, not
measured: the bench measures what a device reaches.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from easyphoto.engines.models.work import RowFlops, row_flops
from easyphoto.server.options import GenerateOptions
from easyphoto.server.pipeline import ModelRows, planned_rows

UTILISATIONS = (0.3, 0.5)  # shares of a device's peak that the capacity table shows


@dataclass(frozen=True)
class FaceWork:
    rows: ModelRows
    flops: RowFlops
    faces: int

    def parts(self) -> dict[str, tuple[int, float]]:
        """Per model: rows of the request and FLOPs of one row."""
        return {
            name: (getattr(self.rows, name), getattr(self.flops, name))
            for name in (column.name for column in fields(ModelRows))
        }

    @property
    def flops_per_face(self) -> float:
        return sum(rows * flops for rows, flops in self.parts().values()) / self.faces


def face_work(
    models: str, faces: int = 1, side: int = 512, options: GenerateOptions | None = None
) -> FaceWork:
    """What a template with ``faces`` painted faces costs at ``options`` (default: the reference's),
    every pass at a ``side`` x ``side`` crop."""
    return FaceWork(planned_rows(options or GenerateOptions(), faces), row_flops(models, side), faces)


def work_table(work: FaceWork, models: str, peak_tflops: float | None = None) -> list[str]:
    lines = [
        f"{models}, {work.faces} painted face(s) a template, {work.flops.side} px crops:",
        "",
        "| model | rows a template | GFLOP a row | TFLOP a face |",
        "| --- | --- | --- | --- |",
    ]
    for name, (rows, flops) in work.parts().items():
        lines.append(f"| {name} | {rows} | {flops / 1e9:.4g} | {rows * flops / work.faces / 1e12:.4g} |")
    lines.append(f"| all | | | {work.flops_per_face / 1e12:.4g} |")
    if peak_tflops:
        lines += ["", f"At a peak of {peak_tflops:g} TFLOP/s:"]
        for share in UTILISATIONS:
            rate = share * peak_tflops * 1e12 / work.flops_per_face
            lines.append(f"- {share:.0%} of it: {rate:.4g} faces/s, {60 * rate:.4g} faces/min")
    return lines
