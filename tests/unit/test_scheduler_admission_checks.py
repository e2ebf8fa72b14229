"""conveyor_scheduler.admission.validation without a database: bad fields are named."""

from __future__ import annotations

from conveyor.tasks.v1 import task_pb2
from conveyor_scheduler.admission.validation import validate_item
from conveyor_testkit import scheduler as kit


def test_validation_names_the_bad_fields() -> None:
    good = kit.spec()
    assert validate_item("", "r1", good, 10) == []
    bad = task_pb2.TaskSpec(kind=9, model="noslash", max_attempts=50)  # type: ignore[arg-type]
    fields = {v.field for v in validate_item("x.", "", bad, 10)}
    assert fields == {"x.request_id", "x.spec.kind", "x.spec.target", "x.spec.max_attempts"}
