"""The kustomize tree renders for every overlay and component combination and validates against the
Kubernetes and custom resource schemas."""

from __future__ import annotations

from pathlib import Path

import jsonschema
import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml

from tests.unit.k8s_support import (
    ALL,
    COMPONENTS,
    CRD_SCHEMAS,
    K8S,
    KUBERNETES_VERSIONS,
    OVERLAYS,
    ids,
    label,
    named,
    render,
)

# --------------------------------------------------------------------------------------------------
# Rendering and schema validation


@pytest.mark.parametrize("path", ALL, ids=ids)
def test_renders_and_validates_against_the_schemas(path: Path) -> None:
    objs = render(path)
    assert objs, f"{label(path)} rendered nothing"
    errors: list[str] = []
    for obj in objs:
        key = (obj["apiVersion"], obj["kind"])
        where = f"{obj['kind']}/{obj['metadata'].get('name')}"
        if key in CRD_SCHEMAS:
            validator = jsonschema.Draft202012Validator(CRD_SCHEMAS[key])
            errors += [
                f"{where}: {'.'.join(map(str, e.path))}: {e.message}"
                for e in validator.iter_errors(obj)
            ]
            continue
        for version in KUBERNETES_VERSIONS:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.SchemaNotFoundError:
                errors.append(f"{where}: no schema for {key} (add one to CRD_SCHEMAS)")
            except kubernetes_validate.ValidationError as exc:
                errors.append(
                    f"{where} (k8s {version}): {'.'.join(map(str, exc.path))}: {exc.message}"
                )
    assert not errors, "\n".join(errors)


def test_the_crd_schemas_reject_what_they_should() -> None:
    """The hand-written schemas catch a typo and a wrong type (they are not vacuous)."""
    so = named(render(K8S / "tests" / "prod-keda"), "ScaledObject", "provider-adapter")
    typo = {**so, "spec": {**so["spec"], "maxReplicas": 6}}
    validator = jsonschema.Draft202012Validator(CRD_SCHEMAS[("keda.sh/v1alpha1", "ScaledObject")])
    assert list(validator.iter_errors(so)) == []
    assert any("maxReplicas" in e.message for e in validator.iter_errors(typo))
    topic = named(render(K8S / "overlays" / "prod"), "KafkaTopic", "conveyor-tasks-v1-events")
    bad = {**topic, "spec": {**topic["spec"], "partitions": "6"}}
    validator = jsonschema.Draft202012Validator(
        CRD_SCHEMAS[("kafka.strimzi.io/v1beta2", "KafkaTopic")]
    )
    assert list(validator.iter_errors(topic)) == []
    assert list(validator.iter_errors(bad)) != []


def test_every_overlay_is_combined_with_every_component() -> None:
    """Online Boutique's rule: each optional component builds on top of each overlay in CI."""
    combos: dict[str, set[str]] = {}
    for path in (K8S / "tests").iterdir():
        doc = yaml.safe_load((path / "kustomization.yaml").read_text())
        resources = doc.get("resources", [])
        comps = {Path(c).name for c in doc.get("components", [])}
        for r in resources:
            if "overlays/" in r:
                combos.setdefault(Path(r).name, set()).update(comps)
        assert not {"autoscaling-keda", "autoscaling-hpa"} <= comps, (
            f"{path.name}: both autoscalers"
        )
    in_overlay = {
        o: {
            Path(c).name
            for c in yaml.safe_load((K8S / "overlays" / o / "kustomization.yaml").read_text()).get(
                "components", []
            )
        }
        for o in OVERLAYS
    }
    for overlay in OVERLAYS:
        covered = combos.get(overlay, set()) | in_overlay[overlay]
        wanted = set(COMPONENTS) - (
            {"in-cluster-kafka", "in-cluster-postgres"} if overlay == "prod" else set()
        )
        assert wanted <= covered, f"{overlay}: no combination with {sorted(wanted - covered)}"
