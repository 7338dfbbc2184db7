"""The Kubernetes manifests in deploy/k8s: well-formed objects, and train.py commands it accepts.

Also: every job comes with a NetworkPolicy admitting only its own pods; GPU manifests run one
worker per GPU on the GPU image, CPU ones request no GPU; both Dockerfiles install what they claim.

Every YAML document is checked structurally (apiVersion/kind, replica specs, images, resources,
volumes, the MPIJob launcher's `horovodrun -np`), and, where the Kubeflow training SDK
(`kubeflow-training`) is installed, deserialized into its models and serialized back: a field the
models do not know (a typo) is dropped on the way and shows up as a difference. Every `--flag` of a
`train.py` command must be one of train.py's absl flags, with a value its parser accepts.
"""

from __future__ import annotations

import json
import re
import shlex
import types
from collections import defaultdict
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "deploy" / "k8s"
DOCKERFILE = REPO / "deploy" / "Dockerfile"
DOCKERFILE_GPU = REPO / "deploy" / "Dockerfile.gpu"
IMAGE = "REGISTRY/tf-codistill:latest"
GPU_IMAGE = "REGISTRY/tf-codistill-gpu:latest"
GPU = "nvidia.com/gpu"
MANIFESTS = {
    "sync-tfjob.yaml",
    "codistill-weights-pvc.yaml",
    "codistill-predictions-tfjob.yaml",
    "codistill-predictions-mpijob.yaml",
    "codistill-predictions-tfjob-gpu.yaml",
    "codistill-predictions-mpijob-gpu.yaml",
}
# The label both operators put on every pod of a job (value: the job's name): kubeflow/common
# pkg/apis/common/v1/constants.go JobNameLabel (Training Operator), and mpi-operator's
# pkg/controller/mpi_job_controller.go defaultLabels (v2beta1).
JOB_LABEL = "training.kubeflow.org/job-name"

TFJOB = ("kubeflow.org/v1", "TFJob")
MPIJOB = ("kubeflow.org/v2beta1", "MPIJob")
PVC = ("v1", "PersistentVolumeClaim")
NETPOL = ("networking.k8s.io/v1", "NetworkPolicy")
TFJOB_SPEC_KEYS = {"runPolicy", "tfReplicaSpecs", "successPolicy", "enableDynamicWorker"}
TF_REPLICA_TYPES = {"Chief", "Master", "PS", "Worker", "Evaluator"}
MPIJOB_SPEC_KEYS = {
    "slotsPerWorker",
    "runPolicy",
    "mpiReplicaSpecs",
    "sshAuthMountPath",
    "mpiImplementation",
    "launcherCreationPolicy",
    "runLauncherAsWorker",
}
RUN_POLICY_KEYS = {
    "cleanPodPolicy",
    "ttlSecondsAfterFinished",
    "activeDeadlineSeconds",
    "backoffLimit",
    "schedulingPolicy",
    "suspend",
    "managedBy",
}
REPLICA_SPEC_KEYS = {"replicas", "restartPolicy", "template"}
RESTART_POLICIES = {"Always", "OnFailure", "Never", "ExitCode"}
CLEAN_POD_POLICIES = {"All", "Running", "None"}
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|Ki|Mi|Gi|Ti)?$")


def _load() -> list[tuple[str, int, dict]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")) + sorted(K8S.glob("*.yml")):
        with open(path) as f:
            for i, doc in enumerate(yaml.safe_load_all(f)):
                if doc is not None:
                    docs.append((path.name, i, doc))
    return docs


DOCS = _load()
DOC_IDS = [f"{name}#{i}:{doc.get('kind')}" for name, i, doc in DOCS]


def _kind(doc: dict) -> tuple[str, str]:
    return doc.get("apiVersion"), doc.get("kind")


def _replica_specs(doc: dict) -> dict[str, dict]:
    if _kind(doc) == TFJOB:
        return doc["spec"]["tfReplicaSpecs"]
    if _kind(doc) == MPIJOB:
        return doc["spec"]["mpiReplicaSpecs"]
    return {}


def _command(container: dict) -> list[str]:
    """The container's argv; a `sh -c SCRIPT` command is split with shlex."""
    argv = [str(a) for a in container.get("command", []) + container.get("args", [])]
    if len(argv) >= 3 and Path(argv[0]).name in ("sh", "bash") and argv[1] == "-c":
        return shlex.split(argv[2])
    return argv


def _train_invocations(container: dict) -> list[list[str]]:
    """The arguments of every `train.py` in the container's command."""
    argv = _command(container)
    found = []
    for i, token in enumerate(argv):
        if Path(token).name == "train.py":
            args = []
            for arg in argv[i + 1 :]:
                if arg in ("&&", "||", ";", "|"):
                    break
                args.append(arg)
            found.append(args)
    return found


def _flag_values(args: list[str]) -> dict[str, str]:
    """`--name=value` -> {name: value}; a bare `--name` -> {name: ""}."""
    values = {}
    for arg in args:
        assert arg.startswith("--"), f"train.py argument {arg!r}: write flags as --name=value"
        name, _, value = arg[2:].partition("=")
        values[name] = value
    return values


def _mounts(container: dict) -> list[str]:
    return [m["mountPath"] for m in container.get("volumeMounts", [])]


def _under(path: str, roots: list[str]) -> bool:
    return any(path == root or path.startswith(root.rstrip("/") + "/") for root in roots)


def _pvc_names() -> set[str]:
    return {doc["metadata"]["name"] for _, _, doc in DOCS if _kind(doc) == PVC}


def _runs() -> list[dict]:
    """Every train.py invocation: its flags, the job, the workers and where they mount volumes."""
    runs = []
    for name, _, doc in DOCS:
        specs = _replica_specs(doc)
        for role, spec in specs.items():
            for container in spec["template"]["spec"]["containers"]:
                for args in _train_invocations(container):
                    if _kind(doc) == MPIJOB:
                        # horovodrun starts train.py on the workers: their mounts are the ones that count
                        worker = specs["Worker"]
                        mounts = [p for c in worker["template"]["spec"]["containers"] for p in _mounts(c)]
                        np_ = int(_command(container)[_command(container).index("-np") + 1])
                    else:
                        mounts = _mounts(container)
                        np_ = spec.get("replicas", 1)
                    runs.append(
                        {
                            "file": name,
                            "job": doc["metadata"]["name"],
                            "role": role,
                            "args": args,
                            "flags": _flag_values(args),
                            "processes": np_,
                            "mounts": mounts,
                            "pod_spec": spec["template"]["spec"],
                        }
                    )
    return runs


# ----------------------------------------------------------------------------- files and objects
def test_expected_manifests_present():
    assert {p.name for p in K8S.glob("*.yaml")} == MANIFESTS
    assert (K8S / "README.md").is_file()
    assert DOCS, "no YAML documents under deploy/k8s"


@pytest.mark.parametrize("name,index,doc", DOCS, ids=DOC_IDS)
def test_object_header(name, index, doc):
    assert isinstance(doc, dict), f"{name}#{index} is not a mapping"
    assert _kind(doc) in (TFJOB, MPIJOB, PVC, NETPOL), f"{name}#{index}: unexpected {_kind(doc)}"
    meta = doc.get("metadata") or {}
    job = meta.get("name", "")
    assert DNS_LABEL.match(job) and len(job) <= 40, f"{name}#{index}: bad metadata.name {job!r}"
    assert "spec" in doc


def test_names_unique_per_kind():
    seen = defaultdict(list)
    for name, _, doc in DOCS:
        seen[(doc["kind"], doc["metadata"]["name"])].append(name)
    assert all(len(files) == 1 for files in seen.values()), seen


@pytest.mark.parametrize("name,index,doc", DOCS, ids=DOC_IDS)
def test_structure(name, index, doc):
    where = f"{name}#{index}"
    spec = doc["spec"]
    if _kind(doc) == PVC:
        assert "ReadWriteMany" in spec["accessModes"], f"{where}: the shared claim must be ReadWriteMany"
        assert QUANTITY.match(str(spec["resources"]["requests"]["storage"])), where
        return
    if _kind(doc) == NETPOL:
        assert set(spec) <= {"podSelector", "policyTypes", "ingress", "egress"}, where
        assert spec["policyTypes"] == ["Ingress"], f"{where}: ingress only (egress stays open: DNS, data)"
        return
    if _kind(doc) == TFJOB:
        assert set(spec) <= TFJOB_SPEC_KEYS, f"{where}: unknown TFJob spec keys {set(spec) - TFJOB_SPEC_KEYS}"
        replicas = spec["tfReplicaSpecs"]
        assert set(replicas) <= TF_REPLICA_TYPES and "Worker" in replicas, f"{where}: {sorted(replicas)}"
    else:
        assert set(spec) <= MPIJOB_SPEC_KEYS, (
            f"{where}: unknown MPIJob spec keys {set(spec) - MPIJOB_SPEC_KEYS}"
        )
        replicas = spec["mpiReplicaSpecs"]
        assert set(replicas) == {"Launcher", "Worker"}, f"{where}: {sorted(replicas)}"
        assert replicas["Launcher"].get("replicas", 1) == 1, f"{where}: one launcher"
        assert isinstance(spec.get("slotsPerWorker", 1), int)
    policy = spec.get("runPolicy", {})
    assert set(policy) <= RUN_POLICY_KEYS, f"{where}: unknown runPolicy keys {set(policy) - RUN_POLICY_KEYS}"
    assert policy.get("cleanPodPolicy", "None") in CLEAN_POD_POLICIES

    for role, replica in replicas.items():
        at = f"{where} {role}"
        assert set(replica) <= REPLICA_SPEC_KEYS, f"{at}: unknown keys {set(replica) - REPLICA_SPEC_KEYS}"
        assert isinstance(replica["replicas"], int) and replica["replicas"] >= 1, at
        assert replica.get("restartPolicy") in RESTART_POLICIES, f"{at}: restartPolicy"
        pod = replica["template"]["spec"]
        assert "restartPolicy" not in pod, f"{at}: set restartPolicy on the replica spec, not the pod"
        containers = pod["containers"]
        assert containers, at
        if _kind(doc) == TFJOB:
            # The Training Operator injects TF_CONFIG (and the port) into this container only.
            assert [c["name"] for c in containers].count("tensorflow") == 1, (
                f"{at}: no 'tensorflow' container"
            )
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        for container in containers:
            cat = f"{at} container {container.get('name')!r}"
            image = GPU_IMAGE if name.endswith("-gpu.yaml") else IMAGE
            assert container["image"] == image, f"{cat}: image must be the placeholder {image}"
            command = _command(container)
            assert command and all(isinstance(a, str) for a in command), f"{cat}: command"
            requests = container.get("resources", {}).get("requests", {})
            assert {"cpu", "memory"} <= set(requests), f"{cat}: resource requests"
            assert all(QUANTITY.match(str(v)) for v in requests.values()), f"{cat}: {requests}"
            for mount in container.get("volumeMounts", []):
                assert mount["name"] in volumes, f"{cat}: mounts undefined volume {mount['name']!r}"
        for volume in volumes.values():
            claim = volume.get("persistentVolumeClaim")
            if claim:
                assert claim["claimName"] in _pvc_names(), (
                    f"{at}: no PVC {claim['claimName']!r} in deploy/k8s"
                )

    if _kind(doc) == MPIJOB:
        launcher = replicas["Launcher"]["template"]["spec"]["containers"][0]
        argv = _command(launcher)
        assert argv[0] == "horovodrun" and "--gloo" in argv, f"{where}: launcher runs horovodrun --gloo"
        assert argv[argv.index("--hostfile") + 1] == "/etc/mpi/hostfile", where
        np_ = int(argv[argv.index("-np") + 1])
        workers = replicas["Worker"]["replicas"] * spec.get("slotsPerWorker", 1)
        assert np_ == workers, f"{where}: -np {np_} but {workers} worker slots"
        for container in replicas["Worker"]["template"]["spec"]["containers"]:
            assert _command(container)[0] == "/usr/sbin/sshd", f"{where}: MPIJob workers run sshd"


# ------------------------------------------------------------------------- Kubeflow SDK models
def _differences(want, got, path: str = "") -> list[str]:
    """Paths where `got` differs from `want` (a field the model dropped shows as missing)."""
    if isinstance(want, dict) and isinstance(got, dict):
        out = []
        for key in want.keys() | got.keys():
            if key not in got:
                out.append(f"{path}.{key} (unknown to the model)")
            elif key not in want:
                out.append(f"{path}.{key} (added by the model)")
            else:
                out += _differences(want[key], got[key], f"{path}.{key}")
        return out
    if isinstance(want, list) and isinstance(got, list) and len(want) == len(got):
        return [d for i, (w, g) in enumerate(zip(want, got)) for d in _differences(w, g, f"{path}[{i}]")]
    return [] if want == got else [f"{path}: {want!r} became {got!r}"]


def _roundtrip(client, data: dict, klass: str) -> dict:
    """Deserializes `data` into the SDK model `klass` and serializes it back (camelCase, no Nones)."""
    obj = client.deserialize(types.SimpleNamespace(data=json.dumps(data)), klass)
    return client.sanitize_for_serialization(obj)


@pytest.mark.parametrize("name,index,doc", DOCS, ids=DOC_IDS)
def test_kubeflow_sdk_models(name, index, doc):
    """TFJob (KubeflowOrgV1TFJob), PersistentVolumeClaim and NetworkPolicy (kubernetes
    V1PersistentVolumeClaim, V1NetworkPolicy) round-trip whole; the v2beta1 MPIJob has no model in the SDK, so its replica specs and run
    policy (the common kubeflow types) round-trip piece by piece."""
    pytest.importorskip("kubeflow.training", reason="pip install kubeflow-training (requirements-dev.txt)")
    from kubeflow.training.api_client import ApiClient

    client = ApiClient()
    if _kind(doc) == MPIJOB:
        pieces = [(spec, "KubeflowOrgV1ReplicaSpec") for spec in doc["spec"]["mpiReplicaSpecs"].values()]
        pieces += [(doc["spec"].get("runPolicy", {}), "KubeflowOrgV1RunPolicy")]
        pieces += [(doc["metadata"], "V1ObjectMeta")]
    else:
        klass = {TFJOB: "KubeflowOrgV1TFJob", PVC: "V1PersistentVolumeClaim", NETPOL: "V1NetworkPolicy"}
        pieces = [(doc, klass[_kind(doc)])]
    for data, klass in pieces:
        differences = _differences(data, _roundtrip(client, data, klass))
        assert not differences, f"{name}#{index} as {klass}: {differences}"


# ---------------------------------------------------------------------------- train.py commands
RUNS = _runs()
RUN_IDS = [f"{r['job']}:{r['role']}" for r in RUNS]


@pytest.fixture(scope="module")
def train_flags():
    from absl import flags

    import train  # noqa: F401  (defines the flags on absl's global FLAGS)

    return flags.FLAGS


def test_every_job_runs_train():
    jobs = {doc["metadata"]["name"] for _, _, doc in DOCS if _kind(doc) in (TFJOB, MPIJOB)}
    assert jobs == {r["job"] for r in RUNS}


@pytest.mark.parametrize("run", RUNS, ids=RUN_IDS)
def test_flags_exist_and_parse(run, train_flags):
    defined = set(train_flags)
    problems = []
    for name, value in run["flags"].items():
        bool_name = name[2:] if name.startswith("no") and name[2:] in defined else name
        if bool_name not in defined:
            problems.append(f"--{name}: train.py has no such flag")
            continue
        flag = train_flags[bool_name]
        if flag.boolean:
            if value not in ("", "true", "false"):
                problems.append(f"--{name}={value}: boolean flag")
            continue
        try:
            flag.parser.parse(value)
        except ValueError as err:
            problems.append(f"--{name}={value}: {err}")
    assert not problems, f"{run['file']} {run['job']}: " + "; ".join(problems)


@pytest.mark.parametrize("run", RUNS, ids=RUN_IDS)
def test_paths_on_volumes(run):
    flags = run["flags"]
    for name in ("workdir", "data_dir", "exchange_dir"):
        if name in flags:
            assert _under(flags[name], run["mounts"]), (
                f"{run['job']}: --{name}={flags[name]} is not on a mounted volume {run['mounts']}"
            )
    assert "workdir" in flags and "data_dir" in flags, f"{run['job']}: set --workdir and --data_dir"


@pytest.mark.parametrize("run", RUNS, ids=RUN_IDS)
def test_layout(run):
    flags = run["flags"]
    mode = flags.get("mode", "both")
    assert mode in ("sync", "codistill"), f"{run['job']}: one arm per job"
    workers = run["processes"]
    batch = int(flags.get("batch_size", 128))
    assert batch % workers == 0, f"{run['job']}: --batch_size={batch} over {workers} workers"
    if mode == "codistill":
        groups = int(flags.get("num_groups", 2))
        assert batch % groups == 0
        if "exchange_dir" in flags:  # one group per job
            assert 0 <= int(flags["group"]) < groups, run["job"]
        else:  # every group in this job
            assert flags.get("exchange") == "predictions" and flags.get("transport") == "horovod", run["job"]
            assert workers % groups == 0, f"{run['job']}: {workers} workers in {groups} groups"


def test_shared_directory_groups():
    """Jobs that meet in one --exchange_dir cover every group exactly once, with their own workdirs."""
    by_dir = defaultdict(list)
    for run in RUNS:
        if "exchange_dir" in run["flags"]:
            by_dir[run["flags"]["exchange_dir"]].append(run)
    assert by_dir, "no manifest uses the shared-directory weights exchange"
    for directory, runs in by_dir.items():
        groups = {int(r["flags"]["num_groups"]) for r in runs}
        assert len(groups) == 1, f"{directory}: jobs disagree on --num_groups"
        assert sorted(int(r["flags"]["group"]) for r in runs) == list(range(groups.pop())), directory
        assert len({r["flags"]["workdir"] for r in runs}) == len(runs), f"{directory}: shared --workdir"
        for run in runs:
            assert run["flags"]["exchange"] == "weights"
            claims = [v["name"] for v in run["pod_spec"].get("volumes", []) if "persistentVolumeClaim" in v]
            mounts = [
                m["mountPath"]
                for c in run["pod_spec"]["containers"]
                for m in c.get("volumeMounts", [])
                if m["name"] in claims
            ]
            assert _under(directory, mounts), f"{run['job']}: --exchange_dir must be on the shared claim"


# ---------------------------------------------------------------------------------- Dockerfile
def test_dockerfile():
    text = DOCKERFILE.read_text()
    lines = [line.strip() for line in text.splitlines()]
    assert re.match(
        r"^FROM python:3\.11-slim(-\w+)?$", next(line for line in lines if line.startswith("FROM"))
    )
    for package in ("build-essential", "cmake", "libfarmhash-dev", "openssh-server"):
        assert re.search(rf"apt-get install[^\n]*(\\\n[^\n]*)*\b{package}\b", text), package
    assert "pip install -r requirements.txt" in text
    assert re.search(r"pip install (--no-deps )?-e \.", text)
    assert "tools/build_horovod.sh /usr/local/bin/python" in text
    assert "/run/sshd" in text  # sshd's privilege-separation directory (MPIJob workers)
    ignore = REPO / "deploy" / "Dockerfile.dockerignore"
    assert ".venv" in ignore.read_text().split()


def test_gpu_dockerfile():
    """TensorFlow's CUDA build at the pinned version in place of tensorflow-cpu, Horovod (Gloo)
    from the same script as the CPU image, the same system packages."""
    text = DOCKERFILE_GPU.read_text()
    lines = [line.strip() for line in text.splitlines()]
    assert re.match(
        r"^FROM python:3\.11-slim(-\w+)?$", next(line for line in lines if line.startswith("FROM"))
    )
    pinned = re.search(r"^tensorflow-cpu==(\S+)$", (REPO / "requirements.txt").read_text(), re.M).group(1)
    assert f"ARG TF_VERSION={pinned}" in lines, "Dockerfile.gpu's TF_VERSION must match requirements.txt"
    assert '"tensorflow[and-cuda]==${TF_VERSION}"' in text
    assert "grep -v '^tensorflow-cpu==' requirements.txt" in text  # never both TF wheels
    assert "pip install -r requirements.txt" not in text
    for package in ("build-essential", "cmake", "libfarmhash-dev", "openssh-server"):
        assert re.search(rf"apt-get install[^\n]*(\\\n[^\n]*)*\b{package}\b", text), package
    assert "tools/build_horovod.sh /usr/local/bin/python" in text
    assert "ARG HOROVOD_NCCL=0" in lines  # NCCL for Horovod is opt-in (docs/accelerators.md)
    assert re.search(r"pip install (--no-deps )?-e \.", text) and "/run/sshd" in text
    assert "tf.test.is_built_with_cuda()" in text
    ignore = REPO / "deploy" / "Dockerfile.gpu.dockerignore"
    assert ".venv" in ignore.read_text().split()


def _pod_specs(doc):
    return {role: spec["template"]["spec"] for role, spec in _replica_specs(doc).items()}


JOBS = [(name, doc) for name, _, doc in DOCS if _kind(doc) in (TFJOB, MPIJOB)]
JOB_IDS = [doc["metadata"]["name"] for _, doc in JOBS]


@pytest.mark.parametrize("name,job", JOBS, ids=JOB_IDS)
def test_gpu_workers_one_per_gpu(name, job):
    """GPU manifests: every training process has exactly one GPU (TFJob: one pod per worker;
    MPIJob: slotsPerWorker processes per pod, one GPU each); the launcher has none. CPU
    manifests request no GPU."""
    gpu_file = name.endswith("-gpu.yaml")
    slots = job["spec"].get("slotsPerWorker", 1)
    for role, pod in _pod_specs(job).items():
        for container in pod["containers"]:
            limits = container.get("resources", {}).get("limits", {})
            requests = container.get("resources", {}).get("requests", {})
            gpus = int(limits.get(GPU, 0))  # a quantity: "1" in the manifests
            assert int(requests.get(GPU, gpus)) == gpus, f"{name} {role}: GPU request != limit"
            if not gpu_file or role == "Launcher":
                assert not gpus, f"{name} {role}: requests GPUs"
            else:
                assert gpus == slots == 1, (
                    f"{name} {role}: one worker per GPU, got {gpus} GPUs, {slots} slots"
                )
                tolerated = {t.get("key") for t in pod.get("tolerations", [])}
                assert GPU in tolerated, f"{name} {role}: tolerate the GPU nodes' taint"
    if gpu_file:
        assert any(r["job"] == job["metadata"]["name"] and r["flags"].get("model") for r in RUNS)


@pytest.mark.parametrize("name,job", JOBS, ids=JOB_IDS)
def test_tfjob_workers_know_their_pod_ip(name, job):
    """The TFJob rendezvous binds POD_IP (tf_codistill.tfjob.rendezvous_bind_address)."""
    if _kind(job) != TFJOB:
        return
    for role, pod in _pod_specs(job).items():
        (container,) = [c for c in pod["containers"] if c["name"] == "tensorflow"]
        env = {e["name"]: e for e in container.get("env", [])}
        assert env.get("POD_IP", {}).get("valueFrom") == {"fieldRef": {"fieldPath": "status.podIP"}}, (
            f"{name} {role}: set POD_IP from status.podIP"
        )


def _selects(selector: dict, labels: dict) -> bool:
    """A LabelSelector with matchLabels only (what these policies use) against a pod's labels."""
    assert set(selector) <= {"matchLabels"}, selector
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


@pytest.mark.parametrize("name,job", JOBS, ids=JOB_IDS)
def test_network_policy_admits_only_the_jobs_own_pods(name, job):
    """Exactly one NetworkPolicy in the job's file selects the job's pods (labelled by the
    operator with JOB_LABEL=<job name>), and its only ingress rule admits pods of the same job:
    no namespaceSelector, no ipBlock, and no pod of any other job in deploy/k8s."""
    job_name = job["metadata"]["name"]
    pod_labels = {JOB_LABEL: job_name}
    for role, spec in _replica_specs(job).items():
        labels = spec["template"].get("metadata", {}).get("labels", {})
        assert labels.get(JOB_LABEL, job_name) == job_name, f"{name} {role}: do not override {JOB_LABEL}"
    policies = [
        d
        for n, _, d in DOCS
        if n == name and _kind(d) == NETPOL and _selects(d["spec"]["podSelector"], pod_labels)
    ]
    assert len(policies) == 1, f"{name}: {job_name} needs exactly one NetworkPolicy selecting its pods"
    spec = policies[0]["spec"]
    assert spec["podSelector"] == {"matchLabels": {JOB_LABEL: job_name}}, "select by the job label only"
    assert spec["policyTypes"] == ["Ingress"]
    (rule,) = spec["ingress"]
    assert set(rule) == {"from"}, f"{name}: all ports, but only from the job's pods"
    for peer in rule["from"]:
        assert set(peer) == {"podSelector"}, f"{name}: {peer} admits pods outside the namespace or by IP"
        assert _selects(peer["podSelector"], pod_labels)
        for other in JOB_IDS:
            if other != job_name:
                assert not _selects(peer["podSelector"], {JOB_LABEL: other}), f"admits {other}"
    assert rule["from"], f"{name}: an empty 'from' admits everyone"


def test_every_network_policy_belongs_to_a_job():
    jobs = {doc["metadata"]["name"] for _, doc in JOBS}
    for name, _, doc in DOCS:
        if _kind(doc) == NETPOL:
            selected = doc["spec"]["podSelector"].get("matchLabels", {}).get(JOB_LABEL)
            assert selected in jobs, f"{name}: NetworkPolicy {doc['metadata']['name']} selects no job here"


# SIGTERM to exit, measured (docs/operations.md "Preemption"): up to 3 s for a job of the small
# models here, plus the slowest backup measured, a ResNet-50 (205 MB) in 2.5 s on a local disk.
PREEMPTION_EXIT_S = 3.0 + 2.5


@pytest.mark.parametrize("name,job", JOBS, ids=JOB_IDS)
def test_a_preempted_job_backs_up_in_its_grace_period_and_comes_back(name, job):
    """Every pod gets SIGTERM's grace period with a tenfold margin (a slow volume, the
    agreement's next check), and a pod that exits 143 or is deleted is started again."""
    assert job["spec"].get("runPolicy", {}).get("backoffLimit", 0) >= 3, f"{name}: backoffLimit"
    for role, replica in _replica_specs(job).items():
        pod = replica["template"]["spec"]
        grace = pod.get("terminationGracePeriodSeconds", 30)  # Kubernetes' default
        assert grace >= 10 * PREEMPTION_EXIT_S, f"{name} {role}: terminationGracePeriodSeconds {grace}"
        assert replica["restartPolicy"] in ("OnFailure", "ExitCode"), f"{name} {role}: restartPolicy"
