#!/usr/bin/env bash
# Validates deploy/kubernetes/ (run by .ci/run; run it by hand after editing a manifest):
#
#  1. every Kubernetes object in every manifest (kustomization.yaml excepted: it is kustomize's
#     input, not an object; secret.yaml included) against the Kubernetes OpenAPI schema of
#     $K8S_VERSIONS, in strict mode (unknown fields are errors), with the PyPI package
#     kubernetes-validate (pinned below). An object whose kind/apiVersion has no schema is an
#     error too (the tool itself only warns);
#  2. the references between the objects that a schema cannot see: every resource that
#     kustomization.yaml lists exists; the ConfigMaps/Secrets (and keys) the Deployment uses
#     exist; container ports named by probes, Services and the NetworkPolicy exist; the
#     selectors of the Deployment, Services, PDB and NetworkPolicy match the Pod labels; the
#     HPA targets the Deployment;
#  3. every *.toml embedded in a ConfigMap parses as TOML (python3 tomllib);
#  4. `fwgate check` as the Deployment's `check` init container runs it: the init container's
#     volume mounts are recreated under a temporary root (ConfigMap keys as files, emptyDirs as
#     empty directories), absolute paths in the embedded fwgate.toml that point into those
#     mounts are moved under that root, and the init container's args are run with the
#     debug binary. The binary is built first, with `cargo test --locked --no-run`: that is the
#     build the `cargo test --locked` after this script in .ci/run needs anyway (a plain
#     `cargo build` would compile serde, syn and their dependents a second time, because
#     dev-dependencies change their features). With FWGATE_VALIDATE_NO_BUILD=1 nothing is
#     built: the newer of target/{debug,release}/fwgate is used, and the step is skipped if
#     there is neither. "target" is $CARGO_TARGET_DIR when it is set, as for cargo itself.
#
# The validator lives in a virtualenv under ${TMPDIR:-/tmp} (never in the repository), created
# once per set of pinned versions and reused: after the first run this takes a few seconds.
# Needs python3 >= 3.11 (tomllib; the pinned packages need it too) with venv and pip, and PyPI
# reachable on the first run.
set -euo pipefail

# The validator and everything it pulls in, pinned (the script below also uses jsonschema,
# referencing and packaging directly). kubernetes-validate 1.37.0 ships schemas for 1.25-1.37.
PINS=(
    kubernetes-validate==1.37.0
    attrs==26.1.0
    importlib_resources==7.1.0
    jsonschema==4.26.0
    jsonschema-specifications==2025.9.1
    packaging==26.3
    PyYAML==6.0.3
    referencing==0.37.0
    rpds-py==2026.9.1
    typing_extensions==4.16.0
)
# Kubernetes versions to validate against. 1.30 is the oldest the manifests support (the
# preStop `sleep` action in deployment.yaml is beta and on by default from 1.30).
K8S_VERSIONS=${K8S_VERSIONS:-"1.30 1.34"}

cd "$(dirname "$0")/.."
repo=$(pwd)
manifests=deploy/kubernetes

fail() {
    echo "deploy/validate.sh: FAILED: $*" >&2
    exit 1
}

command -v python3 >/dev/null || fail "python3 not found"

python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' ||
    fail "python3 >= 3.11 needed (tomllib, and the pinned packages), found $(python3 -V 2>&1)"
# One virtualenv per set of pins, reused while the pins do not change.
pins_id=$(printf '%s\n' "${PINS[@]}" | cksum | cut -d' ' -f1)
venv="${TMPDIR:-/tmp}/fwgate-validate-venv-$pins_id"
if [ "$(cat "$venv/.fwgate-pins" 2>/dev/null)" != "${PINS[*]}" ]; then
    echo "deploy/validate.sh: installing ${PINS[0]} (and pinned dependencies) into $venv"
    rm -rf "$venv"
    python3 -m venv "$venv" ||
        fail "cannot create a virtualenv in $venv with python3 -m venv (on Debian: apt-get install python3-venv)"
    if ! "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps "${PINS[@]}" ||
        ! "$venv/bin/python" -m pip check >/dev/null; then
        rm -rf "$venv"
        fail "pip install ${PINS[*]} failed"
    fi
    echo "${PINS[*]}" >"$venv/.fwgate-pins"
fi

# The fwgate binary for step 4, where cargo puts it: $CARGO_TARGET_DIR (relative to the
# repository, as cargo reads it) or target/.
target_dir=${CARGO_TARGET_DIR:-target}
case "$target_dir" in
    /*) ;;
    *) target_dir="$repo/$target_dir" ;;
esac
fwgate_bin=""
if [ "${FWGATE_VALIDATE_NO_BUILD:-0}" != 1 ]; then
    command -v cargo >/dev/null || fail "cargo not found (set FWGATE_VALIDATE_NO_BUILD=1 to skip the build)"
    echo "deploy/validate.sh: cargo test --locked --no-run (builds $target_dir/debug/fwgate)"
    cargo test --locked --no-run --quiet || fail "cargo test --locked --no-run"
    fwgate_bin="$target_dir/debug/fwgate"
else
    # The newest of the two, so a stale one is not preferred.
    for candidate in "$target_dir/debug/fwgate" "$target_dir/release/fwgate"; do
        if [ -x "$candidate" ] && { [ -z "$fwgate_bin" ] || [ "$candidate" -nt "$fwgate_bin" ]; }; then
            fwgate_bin="$candidate"
        fi
    done
fi

scratch=$(mktemp -d "${TMPDIR:-/tmp}/fwgate-validate.XXXXXX")
trap 'rm -rf "$scratch"' EXIT

FWGATE_BIN="$fwgate_bin" SCRATCH="$scratch" K8S_VERSIONS="$K8S_VERSIONS" \
    "$venv/bin/python" -u - "$manifests" <<'PYTHON'
import base64
import os
import re
import subprocess
import sys
from pathlib import Path

import jsonschema
import yaml
from kubernetes_validate import utils as kv
from packaging.version import Version
from referencing import Registry, Resource

import tomllib

manifests = Path(sys.argv[1])
versions = os.environ["K8S_VERSIONS"].split()
fwgate_bin = os.environ["FWGATE_BIN"]
scratch = Path(os.environ["SCRATCH"])
errors = []


def error(message):
    errors.append(message)
    print(f"ERROR {message}")


def kn(obj):
    return f"{obj.get('kind', '?')}/{(obj.get('metadata') or {}).get('name', '?')}"


def schema_errors(obj, version):
    """Every strict-schema error of one object (kubernetes_validate.utils.validate, which this
    mirrors, stops at the first one). Raises SchemaNotFoundError for an unknown kind/apiVersion
    and VersionNotSupportedError for a Kubernetes version the pinned package has no schemas for."""
    wanted = kv.major_minor(version.lstrip("v"))
    known = [v for v in kv.all_versions() if Version(kv.major_minor(v)) <= Version(wanted)]
    if not known or Version(wanted) > Version(kv.major_minor(kv.latest_version())):
        raise kv.VersionNotSupportedError(version=wanted)
    schema_dir = f"kubernetes-json-schema/v{known[-1]}-local-strict"
    api_version = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", obj["apiVersion"])
    try:
        schema = kv.schema_contents(f"{schema_dir}/{obj['kind'].lower()}-{api_version}.json", wanted)
    except FileNotFoundError:
        raise kv.SchemaNotFoundError(version=wanted, kind=obj["kind"], api_version=obj["apiVersion"])
    definitions = kv.schema_contents(f"{schema_dir}/_definitions.json", wanted)
    registry = Resource.from_contents(definitions) @ (Resource.from_contents(schema) @ Registry())
    validator = jsonschema.validators.Draft202012Validator(schema, registry=registry)
    return sorted(validator.iter_errors(obj), key=lambda e: list(map(str, e.absolute_path)))


# ---- 1. schema validation -------------------------------------------------------------------
supported = kv.major_minor(kv.latest_version())
for version in versions:
    if not re.fullmatch(r"v?\d+\.\d+(\.\d+)?", version) or \
            Version(kv.major_minor(version.lstrip("v"))) > Version(supported):
        print(f"deploy/validate.sh: FAILED: K8S_VERSIONS: kubernetes-validate {kv.__version__} has "
              f"schemas for Kubernetes {kv.all_versions()[0]} to {supported}, not {version!r}", file=sys.stderr)
        sys.exit(1)
files = sorted(p for p in manifests.glob("*.y*ml") if p.name != "kustomization.yaml")
if not files:
    error(f"no manifests found in {manifests}")
objects = []  # (file, object)
for path in files:
    try:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    except yaml.YAMLError as e:
        error(f"{path}: not valid YAML: {e}")
        continue
    if not docs:
        error(f"{path}: no Kubernetes object in the file")
    for doc in docs:
        if not isinstance(doc, dict) or "kind" not in doc or "apiVersion" not in doc:
            error(f"{path}: a document without kind/apiVersion")
            continue
        objects.append((path, doc))
        for version in versions:
            try:
                problems = schema_errors(doc, version)
            except kv.SchemaNotFoundError as e:
                error(f"{path}: {kn(doc)}: {e.message}")
                continue
            except kv.VersionNotSupportedError as e:
                error(f"kubernetes-validate {kv.__version__}: {e.message}")
                continue
            for e in problems:
                where = ".".join(str(p) for p in e.absolute_path) or "(top level)"
                error(f"{path}: {kn(doc)} does not validate against Kubernetes {version} (strict): {where}: {e.message}")
print(f"schemas: {len(objects)} object(s) in {len(files)} file(s) checked against Kubernetes "
      f"{', '.join(versions)} (strict, kubernetes-validate {kv.__version__})")

# ---- 2. references between the objects ------------------------------------------------------
kustomization = manifests / "kustomization.yaml"
if kustomization.exists():
    k = yaml.safe_load(kustomization.read_text()) or {}
    for resource in k.get("resources") or []:
        if not (manifests / resource).exists():
            error(f"{kustomization}: resource {resource} does not exist")

by_kind = {}
for path, obj in objects:
    by_kind.setdefault(obj["kind"], {})[obj["metadata"]["name"]] = obj


def selects(selector, labels):
    """matchLabels / matchExpressions (In, NotIn, Exists, DoesNotExist) against labels."""
    selector = selector or {}
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and labels.get(key) in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


deployments = by_kind.get("Deployment", {})
configmaps = by_kind.get("ConfigMap", {})
secrets = by_kind.get("Secret", {})
if not deployments:
    error("no Deployment found")
for name, dep in deployments.items():
    spec = dep["spec"]
    pod = spec["template"]
    pod_labels = (pod.get("metadata") or {}).get("labels") or {}
    pod_spec = pod["spec"]
    if not selects(spec.get("selector"), pod_labels):
        error(f"Deployment/{name}: spec.selector does not match its Pod template labels")
    containers = (pod_spec.get("initContainers") or []) + pod_spec.get("containers", [])
    port_names = {p["name"] for c in pod_spec.get("containers", []) for p in c.get("ports") or [] if "name" in p}
    volumes = {v["name"]: v for v in pod_spec.get("volumes") or []}
    for v in volumes.values():
        if "configMap" in v:
            cm = configmaps.get(v["configMap"]["name"])
            if cm is None:
                error(f"Deployment/{name}: volume {v['name']}: ConfigMap {v['configMap']['name']} is not in {manifests}")
        if "secret" in v and v["secret"]["secretName"] not in secrets:
            error(f"Deployment/{name}: volume {v['name']}: Secret {v['secret']['secretName']} is not in {manifests}")
    for c in containers:
        for m in c.get("volumeMounts") or []:
            v = volumes.get(m["name"])
            if v is None:
                error(f"Deployment/{name}: container {c['name']} mounts undefined volume {m['name']}")
            elif "subPath" in m and "configMap" in v:
                cm = configmaps.get(v["configMap"]["name"]) or {}
                if m["subPath"] not in (cm.get("data") or {}):
                    error(f"Deployment/{name}: container {c['name']}: subPath {m['subPath']} is not a key of ConfigMap {v['configMap']['name']}")
        for env in c.get("env") or []:
            ref = (env.get("valueFrom") or {}).get("secretKeyRef")
            if ref:
                secret = secrets.get(ref["name"])
                keys = set((secret or {}).get("data") or {}) | set((secret or {}).get("stringData") or {})
                if secret is None:
                    error(f"Deployment/{name}: container {c['name']}: env {env['name']}: Secret {ref['name']} is not in {manifests}")
                elif ref["key"] not in keys:
                    error(f"Deployment/{name}: container {c['name']}: env {env['name']}: Secret {ref['name']} has no key {ref['key']}")
        for probe_name in ("startupProbe", "livenessProbe", "readinessProbe"):
            probe = c.get(probe_name) or {}
            for handler in ("httpGet", "tcpSocket", "grpc"):
                port = (probe.get(handler) or {}).get("port")
                if isinstance(port, str) and port not in port_names:
                    error(f"Deployment/{name}: container {c['name']}: {probe_name} uses undefined port {port}")

    for svc_name, svc in by_kind.get("Service", {}).items():
        if selects({"matchLabels": svc["spec"].get("selector") or {}}, pod_labels):
            for p in svc["spec"].get("ports") or []:
                target = p.get("targetPort")
                if isinstance(target, str) and target not in port_names:
                    error(f"Service/{svc_name}: targetPort {target} is not a container port of Deployment/{name}")
    for kind in ("PodDisruptionBudget", "NetworkPolicy"):
        for obj_name, obj in by_kind.get(kind, {}).items():
            selector = obj["spec"].get("selector") if kind == "PodDisruptionBudget" else obj["spec"].get("podSelector")
            if not selects(selector, pod_labels):
                error(f"{kind}/{obj_name}: selector does not match the Pods of Deployment/{name}")
            if kind == "NetworkPolicy":
                for rule in obj["spec"].get("ingress") or []:
                    for p in rule.get("ports") or []:
                        if isinstance(p.get("port"), str) and p["port"] not in port_names:
                            error(f"NetworkPolicy/{obj_name}: port {p['port']} is not a container port of Deployment/{name}")
for svc_name, svc in by_kind.get("Service", {}).items():
    if not any(selects({"matchLabels": svc["spec"].get("selector") or {}},
                       (d["spec"]["template"].get("metadata") or {}).get("labels") or {})
               for d in deployments.values()):
        error(f"Service/{svc_name}: selector matches no Deployment's Pods")
for hpa_name, hpa in by_kind.get("HorizontalPodAutoscaler", {}).items():
    ref = hpa["spec"]["scaleTargetRef"]
    if ref["kind"] != "Deployment" or ref["name"] not in deployments:
        error(f"HorizontalPodAutoscaler/{hpa_name}: scaleTargetRef {ref['kind']}/{ref['name']} is not in {manifests}")
print("references: checked")

# ---- 3. embedded TOML -----------------------------------------------------------------------
tomls = 0
for cm_name, cm in configmaps.items():
    for key, text in (cm.get("data") or {}).items():
        if key.endswith(".toml"):
            tomls += 1
            try:
                tomllib.loads(text)
            except tomllib.TOMLDecodeError as e:
                error(f"ConfigMap/{cm_name}: {key} is not valid TOML: {e}")
print(f"toml: {tomls} embedded file(s) checked")

# ---- 4. fwgate check, as the init container runs it ----------------------------------------
if not fwgate_bin:
    print("fwgate check: SKIPPED (no fwgate binary under debug/ or release/ of the cargo target directory; FWGATE_VALIDATE_NO_BUILD=1)")
def volume_files(volume):
    """The files a ConfigMap or Secret volume shows (path -> bytes, `items` applied), from the
    objects in the manifests (a Secret's placeholders included); None for other volumes."""
    if "configMap" in volume:
        source = volume["configMap"]
        obj = configmaps.get(source["name"]) or {}
        data = {k: v.encode() for k, v in (obj.get("data") or {}).items()}
        data.update({k: base64.b64decode(v) for k, v in (obj.get("binaryData") or {}).items()})
    elif "secret" in volume:
        source = volume["secret"]
        obj = secrets.get(source["secretName"]) or {}
        data = {k: base64.b64decode(v) for k, v in (obj.get("data") or {}).items()}
        data.update({k: v.encode() for k, v in (obj.get("stringData") or {}).items()})
    else:
        return None
    if source.get("items"):
        return {item["path"]: data.get(item["key"], b"") for item in source["items"]}
    return data


for name, dep in deployments.items():
    if not fwgate_bin:
        break
    pod_spec = dep["spec"]["template"]["spec"]
    checks = [c for c in pod_spec.get("initContainers") or [] if (c.get("args") or [None])[0] == "check"]
    if not checks:
        error(f"Deployment/{name}: no init container runs `fwgate check`")
        continue
    volumes = {v["name"]: v for v in pod_spec.get("volumes") or []}
    for c in checks:
        root = scratch / name / c["name"]
        mounts = []
        for m in c.get("volumeMounts") or []:
            v = volumes.get(m["name"]) or {}
            target = root / m["mountPath"].lstrip("/")
            mounts.append(m["mountPath"])
            files = volume_files(v)
            if files is not None and "subPath" in m:
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(files.get(m["subPath"], b""))
            else:  # a ConfigMap or Secret as a directory; emptyDir (or anything else): empty
                target.mkdir(parents=True, exist_ok=True)
                for key, content in (files or {}).items():
                    (target / key).parent.mkdir(parents=True, exist_ok=True)
                    (target / key).write_bytes(content)

        def in_root(value):
            """A pod path inside one of the mounts, moved under the scratch root."""
            if isinstance(value, str) and value.startswith("/") and any(
                    value == p or value.startswith(p.rstrip("/") + "/") for p in mounts):
                return str(root / value.lstrip("/"))
            return value

        # Absolute paths in the mounted TOML files that point into a mount move under the root
        # too (the embedded fwgate.toml's state_dir = "/var/lib/fwgate" is the `state` emptyDir);
        # relative ones resolve against the file's directory exactly as in the Pod.
        def strings(node):
            if isinstance(node, dict):
                for value in node.values():
                    yield from strings(value)
            elif isinstance(node, list):
                for value in node:
                    yield from strings(value)
            elif isinstance(node, str):
                yield node

        for toml_file in root.rglob("*.toml"):
            text = toml_file.read_text()
            try:
                values = set(strings(tomllib.loads(text)))
            except tomllib.TOMLDecodeError:
                values = set()  # reported above; fwgate check reports it in its own words
            for value in values:
                if in_root(value) != value:
                    for quote in ('"', "'"):
                        text = text.replace(f"{quote}{value}{quote}", f"{quote}{in_root(value)}{quote}")
            toml_file.write_text(text)

        args = [in_root(a) for a in c.get("args") or []]
        env = {k: v for k, v in os.environ.items() if not k.startswith("FWGATE_")}
        for e in c.get("env") or []:
            ref = (e.get("valueFrom") or {}).get("secretKeyRef")
            if "value" in e:
                env[e["name"]] = e["value"]
            elif ref:
                secret = secrets.get(ref["name"]) or {}
                env[e["name"]] = ((secret.get("stringData") or {}).get(ref["key"])
                                  or "placeholder-from-validate-sh")
        result = subprocess.run([fwgate_bin, *args], env=env, capture_output=True, text=True, timeout=60)
        shown = f"fwgate {' '.join(c.get('args') or [])}"
        output = (result.stdout + result.stderr).strip().replace(str(root), "")
        if result.returncode != 0:
            error(f"Deployment/{name}: init container {c['name']}: `{shown}` failed (exit {result.returncode}):\n{output}")
        else:
            print(f"fwgate check (Deployment/{name}, init container {c['name']}): {output}")

if errors:
    print(f"deploy/validate.sh: FAILED: {len(errors)} problem(s) in {manifests}, listed above", file=sys.stderr)
    sys.exit(1)
print(f"deploy/validate.sh: OK: {manifests}")
PYTHON
