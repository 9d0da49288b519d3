"""Validate every manifest under deploy/ and how the manifests fit together (`make lint-deploy`).

- Kubernetes kinds: kubernetes-validate's strict schemas (unknown fields are errors), for the
  oldest Kubernetes vdiff targets (1.28, OpenShift 4.15) and the newest the package ships.
- ServiceMonitor, ServingRuntime, InferenceService: the schemas in schemas/, whose metadata
  and pod fields point into the same Kubernetes definitions.
- Kustomizations: what they list exists, and every manifest is listed by one; with kubectl on
  PATH, `kubectl kustomize` builds each.
- References: selectors select pods, named ports and mounted volumes exist, the Secrets, PVCs,
  HPA targets and KServe runtimes named are defined beside them.

Prints one line per problem and exits 1 if there is any.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
from deploy_files import MANIFESTS, WORKLOADS, describe, load_documents, pod_spec, rel
from kubernetes_validate.utils import major_minor, schema_contents
from referencing import Registry, Resource

KUBERNETES_VERSIONS = ("1.28", major_minor(kubernetes_validate.latest_version()))
SCHEMAS = Path(__file__).resolve().parent / "schemas"
CUSTOM_KINDS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "servicemonitor-monitoring-v1.json",
    (
        "serving.kserve.io/v1alpha1",
        "ServingRuntime",
    ): "servingruntime-serving.kserve.io-v1alpha1.json",
    (
        "serving.kserve.io/v1beta1",
        "InferenceService",
    ): "inferenceservice-serving.kserve.io-v1beta1.json",
}
DEPLOYMENT_MODES = {"RawDeployment", "Standard", "Serverless", "Knative", "ModelMesh"}
Doc = dict[str, Any]


# ---- schemas -------------------------------------------------------------------------------
def custom_validators(version: str) -> dict[tuple[str, str], jsonschema.Draft202012Validator]:
    definitions = schema_contents(
        f"kubernetes-json-schema/v{version}.0-local-strict/_definitions.json", version
    )
    registry = Resource.from_contents(definitions) @ Registry()
    out = {}
    for key, name in CUSTOM_KINDS.items():
        schema = json.loads((SCHEMAS / name).read_text(encoding="utf-8"))
        jsonschema.Draft202012Validator.check_schema(schema)
        out[key] = jsonschema.Draft202012Validator(schema, registry=registry)
    return out


def schema_problems(docs: list[tuple[Path, Doc]]) -> Iterator[str]:
    for version in KUBERNETES_VERSIONS:
        custom = custom_validators(version)
        for path, doc in docs:
            where = f"{rel(path)}: {describe(doc)} (Kubernetes {version})"
            key = (doc.get("apiVersion", ""), doc.get("kind", ""))
            if key in custom:
                for err in custom[key].iter_errors(doc):
                    yield f"{where}: {'.'.join(map(str, err.absolute_path))}: {err.message}"
                continue
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as err:
                yield f"{where}: {'.'.join(map(str, err.path))}: {err.message}"
            except kubernetes_validate.SchemaNotFoundError:
                yield f"{where}: no schema for {key[0]} {key[1]}"


# ---- kustomizations ------------------------------------------------------------------------
def kustomize(directory: Path, problems: list[str]) -> list[tuple[Path, Doc]]:
    """The documents a kustomization directory includes; problems with its list appended."""
    path = directory / "kustomization.yaml"
    (k,) = load_documents(path)
    if (k.get("apiVersion"), k.get("kind")) != ("kustomize.config.k8s.io/v1beta1", "Kustomization"):
        problems.append(f"{rel(path)}: not a kustomize.config.k8s.io/v1beta1 Kustomization")
    docs: list[tuple[Path, Doc]] = []
    for entry in k.get("resources", []):
        target = (directory / entry).resolve()
        if target.is_dir() and (target / "kustomization.yaml").is_file():
            docs += kustomize(target, problems)
        elif target.is_file():
            docs += [(target, doc) for doc in load_documents(target)]
        else:
            problems.append(f"{rel(path)}: resource {entry} does not exist")
    return docs


def kustomizations(problems: list[str]) -> dict[Path, list[tuple[Path, Doc]]]:
    found = {
        p.parent: kustomize(p.parent, problems)
        for p in sorted(MANIFESTS.rglob("kustomization.yaml"))
    }
    listed = {path for docs in found.values() for path, _ in docs}
    for path in sorted(MANIFESTS.rglob("*.yaml")):
        if path.name != "kustomization.yaml" and path not in listed:
            problems.append(f"{rel(path)}: listed by no kustomization.yaml")
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        print("kubectl not on PATH: kustomize builds not checked")
    else:
        for directory in found:
            done = subprocess.run(
                [kubectl, "kustomize", str(directory)], capture_output=True, text=True, check=False
            )
            if done.returncode:
                problems.append(f"{rel(directory)}: kubectl kustomize: {done.stderr.strip()}")
    return found


# ---- references ----------------------------------------------------------------------------
def selects(selector: dict[str, Any] | None, labels: dict[str, str] | None) -> bool:
    """matchLabels-style selection (the manifests use no matchExpressions)."""
    if not selector:
        return False
    return all((labels or {}).get(k) == v for k, v in selector.items())


def reference_problems(docs: list[Doc]) -> Iterator[str]:
    named = {(d["kind"], d["metadata"]["name"]) for d in docs}
    pods = [
        (d, d["spec"]["template"]["metadata"].get("labels", {}), d["spec"]["template"]["spec"])
        for d in docs
        if d["kind"] in WORKLOADS
    ]

    def ports_of(selector: dict[str, str]) -> tuple[set[str], set[int]] | None:
        chosen = [spec for _, labels, spec in pods if selects(selector, labels)]
        if not chosen:
            return None
        ports = [p for spec in chosen for c in spec["containers"] for p in c.get("ports", [])]
        return {p["name"] for p in ports if "name" in p}, {p["containerPort"] for p in ports}

    for doc in docs:
        kind, spec, what = doc["kind"], doc.get("spec", {}), describe(doc)
        if kind in WORKLOADS and "selector" in spec:
            if not selects(
                spec["selector"].get("matchLabels"), spec["template"]["metadata"].get("labels")
            ):
                yield f"{what}: selector does not select its own pod template"
        if (pods_spec := pod_spec(doc)) is not None:
            yield from pod_problems(what, pods_spec, named)
        if kind == "Service":
            found = ports_of(spec.get("selector", {}))
            if found is None:
                yield f"{what}: selects no pods"
                continue
            for port in spec["ports"]:
                target = port.get("targetPort", port["port"])
                if target not in (found[0] if isinstance(target, str) else found[1]):
                    yield f"{what}: targetPort {target} is no port of the pods it selects"
        elif kind == "PodDisruptionBudget" and ports_of(spec["selector"]["matchLabels"]) is None:
            yield f"{what}: selects no pods"
        elif kind == "HorizontalPodAutoscaler":
            ref = spec["scaleTargetRef"]
            if (ref["kind"], ref["name"]) not in named:
                yield f"{what}: scales {ref['kind']}/{ref['name']}, which is not defined"
        elif kind == "NetworkPolicy":
            found = ports_of(spec["podSelector"].get("matchLabels", {}))
            if found is None:
                yield f"{what}: selects no pods"
                continue
            for rule in spec.get("ingress", []):
                for peer in rule.get("from", []):
                    if (
                        "podSelector" in peer
                        and ports_of(peer["podSelector"].get("matchLabels", {})) is None
                    ):
                        yield f"{what}: a `from` podSelector selects no pods"
                for port in rule.get("ports", []):
                    if isinstance(port.get("port"), str) and port["port"] not in found[0]:
                        yield f"{what}: port {port['port']} is no port of the pods it selects"
        elif kind == "ServiceMonitor":
            services = [
                d
                for d in docs
                if d["kind"] == "Service"
                and selects(spec["selector"].get("matchLabels"), d["metadata"].get("labels"))
            ]
            names = {p.get("name") for s in services for p in s["spec"]["ports"]}
            for endpoint in spec["endpoints"]:
                if "port" in endpoint and endpoint["port"] not in names:
                    yield f"{what}: no Service it selects has a port named {endpoint['port']}"
        elif kind == "ServingRuntime":
            yield from runtime_problems(what, doc)
        elif kind == "InferenceService":
            yield from inference_problems(what, doc, docs)


def pod_problems(what: str, spec: Doc, named: set[tuple[str, str]]) -> Iterator[str]:
    volumes = {v["name"] for v in spec.get("volumes", [])}
    for v in spec.get("volumes", []):
        claim = v.get("persistentVolumeClaim", {}).get("claimName")
        if claim and ("PersistentVolumeClaim", claim) not in named:
            yield f"{what}: volume {v['name']} claims {claim}, which is not defined"
        secret = v.get("secret", {})
        if secret and not secret.get("optional") and ("Secret", secret["secretName"]) not in named:
            yield f"{what}: volume {v['name']} needs Secret {secret['secretName']}"
    containers = [*spec.get("initContainers", []), *spec["containers"]]
    if len({c["name"] for c in containers}) != len(containers):
        yield f"{what}: container names repeat"
    for c in containers:
        where = f"{what} container {c['name']}"
        for mount in c.get("volumeMounts", []):
            if mount["name"] not in volumes:
                yield f"{where}: mounts {mount['name']}, which is no volume of the pod"
        port_names = {p["name"] for p in c.get("ports", []) if "name" in p}
        port_numbers = {p["containerPort"] for p in c.get("ports", [])}
        for probe_name in ("startupProbe", "livenessProbe", "readinessProbe"):
            probe = c.get(probe_name, {})
            action = probe.get("httpGet") or probe.get("tcpSocket")
            if action and action["port"] not in (
                port_names if isinstance(action["port"], str) else port_numbers
            ):
                yield f"{where}: {probe_name} port {action['port']} is not a declared port"
        for env in c.get("env", []):
            ref = env.get("valueFrom", {}).get("secretKeyRef")
            if ref and not ref.get("optional") and ("Secret", ref["name"]) not in named:
                yield f"{where}: env {env['name']} needs Secret {ref['name']}"


def runtime_problems(what: str, doc: Doc) -> Iterator[str]:
    spec = doc["spec"]
    served = [c for c in spec["containers"] if c["name"] == "kserve-container"]
    if len(served) != 1:
        yield f"{what}: needs exactly one container named kserve-container"
        return
    port = spec.get("annotations", {}).get("prometheus.io/port")
    if port is not None and int(port) not in {
        p["containerPort"] for p in served[0].get("ports", [])
    }:
        yield f"{what}: prometheus.io/port {port} is no port of kserve-container"
    accelerators = (
        doc["metadata"].get("annotations", {}).get("opendatahub.io/recommended-accelerators")
    )
    if accelerators is not None:
        value = json.loads(accelerators)
        if not (isinstance(value, list) and all(isinstance(a, str) for a in value)):
            yield f"{what}: opendatahub.io/recommended-accelerators must be a JSON list of names"


def inference_problems(what: str, doc: Doc, docs: list[Doc]) -> Iterator[str]:
    mode = doc["metadata"].get("annotations", {}).get("serving.kserve.io/deploymentMode")
    if mode is not None and mode not in DEPLOYMENT_MODES:
        yield f"{what}: unknown serving.kserve.io/deploymentMode {mode}"
    model = doc["spec"]["predictor"]["model"]
    runtimes = [
        d
        for d in docs
        if d["kind"] == "ServingRuntime" and d["metadata"]["name"] == model.get("runtime")
    ]
    if not runtimes:
        yield f"{what}: runtime {model.get('runtime')} is not defined beside it"
        return
    formats = {f["name"] for f in runtimes[0]["spec"].get("supportedModelFormats", [])}
    if model["modelFormat"]["name"] not in formats:
        yield f"{what}: runtime {model['runtime']} does not support {model['modelFormat']['name']}"


def main() -> int:
    problems: list[str] = []
    groups = kustomizations(problems)
    every = sorted(
        {
            (path, json.dumps(doc, sort_keys=True)): (path, doc)
            for docs in groups.values()
            for path, doc in docs
        }.values(),
        key=lambda item: str(item[0]),
    )
    problems += schema_problems(every)
    if not problems:  # references assume documents that passed their schemas
        for directory, docs in groups.items():
            problems += [
                f"{rel(directory)}: {p}" for p in reference_problems([doc for _, doc in docs])
            ]
    for problem in problems:
        print(problem)
    print(
        f"{len(every)} manifests in {len(groups)} kustomizations: "
        f"{'ok' if not problems else f'{len(problems)} problems'}"
    )
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
