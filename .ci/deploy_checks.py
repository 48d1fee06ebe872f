#!/usr/bin/env python3
"""Consistency checks of deploy/ that no schema can express (run by
.ci/deploy-checks, with the venv's PyYAML).

Schemas say a file is well-formed; these say the files agree with each other
and with the contracts: the RabbitMQ topology and permissions, the drain time
against the grace periods, selectors against labels, referenced files,
ConfigMaps and Secrets against what exists, and that no secret value is in
the tree. Each failed check prints one line naming the file; exit 1 if any.
"""

import base64
import hashlib
import json
import re
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"

errors: list[str] = []
warnings: list[str] = []


def check(ok: bool, where: str, msg: str) -> bool:
    if not ok:
        errors.append(f"{where}: {msg}")
    return ok


def rel(p: Path) -> str:
    return str(p.relative_to(ROOT))


def seconds(raw: str) -> float:
    """`20s`, `1m30s`, `500ms` (the subset of humantime the manifests use)."""
    total, pos = 0.0, 0
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    for m in re.finditer(r"(\d+(?:\.\d+)?)(ms|s|m|h)", raw.strip()):
        if m.start() != pos:
            raise ValueError(raw)
        total += float(m.group(1)) * units[m.group(2)]
        pos = m.end()
    if pos != len(raw.strip()) or pos == 0:
        raise ValueError(raw)
    return total


# --------------------------------------------------------------------------
# The AMQP topology of contracts/events.md, as the worker declares it
# (src/broker/topology.rs). definitions.json holds the part that is the same
# on every RabbitMQ version; the DLQ and the unrouted-events queue get
# x-delivery-limit=-1 on 4.x only (on 3.x -1 would dead-letter at the first
# return), so only the worker, which reads the broker's version, declares them.
CONTRACT_EXCHANGES = {
    "commerce.orders": ("topic", {}),
    "holdclear.dlx": ("fanout", {}),
    # No arguments: consumers declare it as the contract states; its
    # alternate exchange comes from a policy.
    "holdclear.events": ("topic", {}),
    "holdclear.events.unrouted": ("fanout", {}),
}
CONTRACT_QUEUES = {
    "holdclear.order-held": {
        "x-queue-type": "quorum",
        "x-dead-letter-exchange": "holdclear.dlx",
        "x-delivery-limit": 20,
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
    },
}
WORKER_ONLY_QUEUES = ("holdclear.order-held.dlq", "holdclear.events.unrouted")
CONTRACT_BINDINGS = {
    ("commerce.orders", "holdclear.order-held", "order.held"),
}
# The users and the documented development password of each.
DEV_PASSWORDS = {"holdclear": b"holdclear-dev", "holdclear-operator": b"holdclear-operator-dev"}


def check_definitions() -> dict:
    path = DEPLOY / "rabbitmq" / "definitions.json"
    where = rel(path)
    defs = json.loads(path.read_text())

    exchanges = {e["name"]: e for e in defs.get("exchanges", [])}
    check(set(exchanges) == set(CONTRACT_EXCHANGES), where, f"exchanges {sorted(exchanges)} differ from the contract")
    for name, (kind, args) in CONTRACT_EXCHANGES.items():
        e = exchanges.get(name, {})
        # Identical arguments, or the worker's declare fails with PRECONDITION_FAILED.
        check(e.get("type") == kind and e.get("durable") is True and e.get("auto_delete") is False
              and (e.get("arguments") or {}) == args, where,
              f"exchange {name} must be a durable {kind} with exactly the arguments {args}")

    queues = {q["name"]: q for q in defs.get("queues", [])}
    check(set(queues) == set(CONTRACT_QUEUES), where, f"queues {sorted(queues)} differ from {sorted(CONTRACT_QUEUES)}")
    for name in WORKER_ONLY_QUEUES:
        check(name not in queues, where,
              f"queue {name} must not be defined here: its x-delivery-limit depends on the RabbitMQ version (the worker declares it)")
    for name, args in CONTRACT_QUEUES.items():
        q = queues.get(name, {})
        # Identical arguments, or the worker's declare fails with PRECONDITION_FAILED.
        check(q.get("durable") is True and q.get("auto_delete") is False and q.get("arguments") == args,
              where, f"queue {name} must be durable with exactly the arguments {args}")

    bindings = {(b["source"], b["destination"], b["routing_key"]) for b in defs.get("bindings", [])
                if b.get("destination_type") == "queue"}
    check(bindings == CONTRACT_BINDINGS, where, f"bindings {sorted(bindings)} differ from the contract")

    # The held-queue policy: matches the held queue only, never a delivery
    # limit above the queue argument (the broker applies the smaller of the
    # two), and what a queue declared by an older holdclear lacks.
    policies = defs.get("policies", [])
    names = list(queues) + list(exchanges) + list(WORKER_ONLY_QUEUES) + [
        "holdclear.order-held.retry", "x.holdclear.order-held"]
    limit_policies = [p for p in policies if "delivery-limit" in p.get("definition", {})]
    if check(len(limit_policies) == 1, where, "one policy must set delivery-limit"):
        p = limit_policies[0]
        matched = [n for n in names if re.search(p["pattern"], n)]
        check(matched == ["holdclear.order-held"], where,
              f"policy {p['name']} must match holdclear.order-held only (a delivery limit on the DLQ would drop messages), matches {matched}")
        check(p.get("apply-to") in ("queues", "quorum_queues"), where, f"policy {p['name']} must apply to queues")
        d = p["definition"]
        check(d["delivery-limit"] == CONTRACT_QUEUES["holdclear.order-held"]["x-delivery-limit"],
              where, "policy delivery-limit must equal the queue's x-delivery-limit (20, HOLDCLEAR_DELIVERY_LIMIT's default)")
        check(d.get("dead-letter-strategy") == "at-least-once" and d.get("overflow") == "reject-publish", where,
              f"policy {p['name']} must set dead-letter-strategy at-least-once and overflow reject-publish (for queues declared before them)")
    ae_policies = [p for p in policies if "alternate-exchange" in p.get("definition", {})]
    if check(len(ae_policies) == 1, where, "one policy must give holdclear.events its alternate exchange"):
        p = ae_policies[0]
        matched = [n for n in exchanges if re.search(p["pattern"], n)]
        check(matched == ["holdclear.events"] and p.get("apply-to") == "exchanges", where,
              f"policy {p['name']} must apply to the exchange holdclear.events only, matches {matched}")
        check(p["definition"]["alternate-exchange"] == "holdclear.events.unrouted", where,
              f"policy {p['name']} must name holdclear.events.unrouted, the alternate exchange the worker declares")

    # The users: least privilege (see docs/deployment.md).
    users = {u["name"]: u for u in defs.get("users", [])}
    check(set(users) == set(DEV_PASSWORDS), where, f"the users are {sorted(DEV_PASSWORDS)}, found {sorted(users)}")
    for name, dev_password in DEV_PASSWORDS.items():
        u = users.get(name, {})
        check(u.get("tags") in ([], ""), where, f"user {name} must have no tags (no management or admin rights)")
        check(u.get("hashing_algorithm") == "rabbit_password_hashing_sha256" and "password" not in u,
              where, f"user {name} must carry a sha256 password hash, never a password")
        # The committed hash is that of the documented development password,
        # nothing else: base64(salt[4] + sha256(salt + password)).
        raw = base64.b64decode(u.get("password_hash", ""))
        check(len(raw) == 36 and hashlib.sha256(raw[:4] + dev_password).digest() == raw[4:], where,
              f"the committed password_hash of {name} must be that of the documented dev password {dev_password.decode()}")
    expect = {
        # (resource, configure, write, read)
        "holdclear": {
            "commerce.orders": (True, False, True),   # declared and bound from; never published to
            "holdclear.order-held": (True, True, True),
            "holdclear.order-held.dlq": (True, True, True),
            "holdclear.dlx": (True, True, True),
            "holdclear.events": (True, True, True),
            "holdclear.events.unrouted": (True, True, True),
            "other.queue": (False, False, False),
            "amq.topic": (False, False, False),
            "amq.default": (False, False, False),
            "commerce.orders.other": (False, False, False),
            "xholdclear.events": (False, False, False),
        },
        # holdclear dlq: reads the DLQ, replays to commerce.orders; declares nothing.
        "holdclear-operator": {
            "commerce.orders": (False, True, False),
            "holdclear.order-held.dlq": (False, False, True),
            "holdclear.order-held": (False, False, False),
            "holdclear.dlx": (False, False, False),
            "holdclear.events": (False, False, False),
            "commerce.orders.other": (False, False, False),
            "amq.default": (False, False, False),
        },
    }
    for user, table in expect.items():
        perms = [p for p in defs.get("permissions", []) if p["user"] == user]
        if check(len(perms) == 1, where, f"user {user} needs exactly one permissions entry"):
            p = perms[0]
            for name, want in table.items():
                got = tuple(bool(re.search(p[k], name)) for k in ("configure", "write", "read"))
                check(got == want, where, f"{user}'s configure/write/read on {name} is {got}, want {want}")

    vhosts = {v["name"] for v in defs.get("vhosts", [])}
    for section in ("permissions", "policies", "exchanges", "queues", "bindings"):
        for item in defs.get(section, []):
            check(item.get("vhost") in vhosts, where, f"{section} entry {item.get('name', item)} names an undeclared vhost")
    return defs


def check_rabbitmq_conf(compose: dict) -> None:
    path = DEPLOY / "rabbitmq" / "rabbitmq.conf"
    where = rel(path)
    conf = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if check("=" in line, where, f"line {n} is not `key = value`"):
            k, v = (s.strip() for s in line.split("=", 1))
            conf[k] = v
    check(conf.get("max_message_size") == "262144", where,
          "max_message_size must be holdclear's payload limit, 262144 (HOLDCLEAR_MAX_PAYLOAD_BYTES's default)")
    target = conf.get("definitions.local.path")
    mounts = compose["services"]["rabbitmq"].get("volumes", [])
    mounted = {m.split(":")[1]: m.split(":")[0] for m in mounts if isinstance(m, str)}
    check(target in mounted and mounted[target].endswith("definitions.json"), where,
          f"definitions.local.path {target} is not where compose mounts definitions.json")


# --------------------------------------------------------------------------
def check_compose() -> dict:
    path = DEPLOY / "compose.yaml"
    where = rel(path)
    compose = yaml.safe_load(path.read_text())
    services = compose["services"]
    for name in ("rabbitmq", "postgres", "sim", "migrate", "worker", "console"):
        check(name in services, where, f"service {name} missing")

    # One-shot services (restart "no": migrate, tls) are waited for until
    # they completed; the others until healthy.
    one_shot = {n for n, svc in services.items() if svc.get("restart") == "no"}
    for name, svc in services.items():
        for port in svc.get("ports", []):
            check(isinstance(port, str) and port.startswith("127.0.0.1:"), where,
                  f"{name} publishes {port!r}: bind published ports to 127.0.0.1")
        for dep, cond in (svc.get("depends_on") or {}).items():
            check(dep in services, where, f"{name} depends on unknown service {dep}")
            want = "service_completed_successfully" if dep in one_shot else "service_healthy"
            check(cond.get("condition") == want, where, f"{name} must wait for {dep} with {want}")
            if want == "service_healthy":
                check("healthcheck" in services.get(dep, {}) or services.get(dep, {}).get("build"), where,
                      f"{dep} is waited for as healthy but has no healthcheck")
        for vol in svc.get("volumes", []):
            src = vol.split(":")[0] if isinstance(vol, str) else ""
            if src.startswith("."):
                check((DEPLOY / src).exists(), where, f"{name} mounts {src}, which does not exist")

    worker = services.get("worker", {})
    env = worker.get("environment", {})
    drain = seconds(env.get("HOLDCLEAR_SHUTDOWN_TIMEOUT", "20s"))
    check(seconds(worker.get("stop_grace_period", "10s")) > drain, where,
          f"worker stop_grace_period must exceed HOLDCLEAR_SHUTDOWN_TIMEOUT ({drain:g}s)")
    check(env.get("HOLDCLEAR_HTTP_ADDR", "").startswith("0.0.0.0:"), where, "worker must listen on 0.0.0.0 in a container")
    check(worker.get("deploy", {}).get("replicas") == 1, where, "worker starts with one replica")
    check(services.get("migrate", {}).get("command") == ["migrate"], where, "migrate runs `holdclear migrate`")
    console = services.get("console", {})
    check(console.get("command") == ["console"], where, "console runs `holdclear console`")
    check(console.get("environment", {}).get("HOLDCLEAR_CONSOLE_ADDR", "").startswith("0.0.0.0:"), where,
          "console must listen on 0.0.0.0 in a container")
    return compose


# --------------------------------------------------------------------------
def load_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def matches(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def check_k8s(defs: dict) -> None:
    kpath = K8S / "kustomization.yaml"
    kwhere = rel(kpath)
    kust = yaml.safe_load(kpath.read_text())

    # Every file the kustomization names exists (no kustomize needed).
    listed = list(kust.get("resources", []))
    for gen in kust.get("configMapGenerator", []) + kust.get("secretGenerator", []):
        listed += [f.split("=", 1)[-1] for f in gen.get("files", [])] + gen.get("envs", [])
    for f in listed:
        check((K8S / f).is_file(), kwhere, f"lists {f}, which does not exist")
    check("secret.example.yaml" not in listed, kwhere, "must not include secret.example.yaml")
    check(not kust.get("secretGenerator"), kwhere, "must not generate Secrets (no secret values in the tree)")

    objs: list[tuple[str, dict]] = []
    for f in kust.get("resources", []):
        if (K8S / f).is_file():
            objs += [(f, d) for d in load_docs(K8S / f)]
    by_kind: dict[str, list[dict]] = {}
    for _, d in objs:
        by_kind.setdefault(d["kind"], []).append(d)
        check(d["kind"] != "Secret", kwhere, f"applies a Secret ({d['metadata']['name']})")

    generated = {g["name"] for g in kust.get("configMapGenerator", [])}
    settings: dict[str, str] = {}
    for gen in kust.get("configMapGenerator", []):
        for envfile in gen.get("envs", []):
            for line in (K8S / envfile).read_text().splitlines():
                if line.strip() and not line.lstrip().startswith("#"):
                    k, _, v = line.partition("=")
                    settings[k.strip()] = v.strip()

    # The Secrets the manifests reference must be the ones documented.
    example = {d["metadata"]["name"]: d for d in load_docs(K8S / "secret.example.yaml")}
    for name, d in example.items():
        for k, v in d.get("stringData", {}).items():
            check("CHANGE-ME" in v, "deploy/k8s/secret.example.yaml", f"{name}.{k} must be a CHANGE-ME placeholder")

    def pod_checks(where: str, spec: dict, kind: str) -> None:
        psc = spec.get("securityContext", {})
        check(psc.get("runAsNonRoot") is True and psc.get("runAsUser", 0) != 0, where, f"{kind}: run as non-root")
        check(psc.get("seccompProfile", {}).get("type") == "RuntimeDefault", where, f"{kind}: seccomp RuntimeDefault")
        check(spec.get("automountServiceAccountToken") is False, where, f"{kind}: no service account token")
        for c in spec.get("containers", []):
            sc = c.get("securityContext", {})
            check(sc.get("readOnlyRootFilesystem") is True, where, f"{kind}/{c['name']}: read-only root filesystem")
            check(sc.get("allowPrivilegeEscalation") is False, where, f"{kind}/{c['name']}: no privilege escalation")
            check(sc.get("capabilities", {}).get("drop") == ["ALL"], where, f"{kind}/{c['name']}: drop ALL capabilities")
            res = c.get("resources", {})
            check(bool(res.get("requests", {}).get("memory")) and bool(res.get("limits", {}).get("memory")),
                  where, f"{kind}/{c['name']}: memory request and limit")
            for src in c.get("envFrom", []):
                ref = src.get("configMapRef", {}).get("name")
                check(ref is None or ref in generated, where, f"{kind}: ConfigMap {ref} is not generated")
            for e in c.get("env", []):
                ref = e.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    check(ref["key"] in example.get(ref["name"], {}).get("stringData", {}), where,
                          f"{kind}: secret {ref['name']}/{ref['key']} is not in secret.example.yaml")
                check("value" not in e or not re.search(r"SECRET|PASSWORD|_URL$", e["name"]), where,
                      f"{kind}: {e['name']} must come from a Secret, not a literal value")
        for v in spec.get("volumes", []):
            ref = v.get("configMap", {}).get("name")
            check(ref is None or ref in generated, where, f"{kind}: ConfigMap volume {ref} is not generated")

    def component(d: dict) -> str:
        return d["metadata"].get("labels", {}).get("app.kubernetes.io/component", "")

    all_deployments = by_kind.get("Deployment", [])
    deployments = [d for d in all_deployments if component(d) == "worker"]
    consoles = [d for d in all_deployments if component(d) == "console"]
    check(len(deployments) == 1, kwhere, "exactly one worker Deployment")
    check(len(consoles) == 1 and len(all_deployments) == 2, kwhere,
          "one console Deployment besides the worker's, and no other")
    for con in consoles:
        where = "deploy/k8s/console.yaml"
        spec = con["spec"]["template"]["spec"]
        labels = con["spec"]["template"]["metadata"]["labels"]
        check(matches(con["spec"]["selector"]["matchLabels"], labels), where, "selector does not match the pod labels")
        pod_checks(where, spec, "console Deployment")
        c = spec["containers"][0]
        check(c.get("args") == ["console"], where, "the console runs `holdclear console`")
        env = {e["name"]: e for e in c.get("env", [])}
        check(env.get("HOLDCLEAR_CONSOLE_ADDR", {}).get("value", "").endswith(":8090")
              and any(p["containerPort"] == 8090 for p in c.get("ports", [])), where, "console port 8090")
        check(all("valueFrom" in env.get(k, {}) for k in
                  ("HOLDCLEAR_CONSOLE_OPERATOR_TOKENS", "HOLDCLEAR_CONSOLE_SESSION_KEY")), where,
              "console tokens and session key come from a Secret")
        check(c.get("livenessProbe", {}).get("httpGet", {}).get("path") == "/healthz", where, "liveness on /healthz")
        svcs = [v for v in by_kind.get("Service", []) if component(v) == "console"]
        check(len(svcs) == 1 and all(matches(v["spec"]["selector"], labels) for v in svcs), where,
              "one Service selects the console")
        pols = [p for p in by_kind.get("NetworkPolicy", []) if matches(p["spec"]["podSelector"]["matchLabels"], labels)]
        if check(len(pols) == 1, where, "one NetworkPolicy selects the console"):
            eg = {p["port"] for r in pols[0]["spec"]["egress"] for p in r.get("ports", [])}
            check(eg == {53, 5671, 5672, 5432}, where, f"console egress ports {sorted(eg)} must be DNS, AMQP(S), PostgreSQL")
            ing = {p["port"] for r in pols[0]["spec"].get("ingress", []) for p in r.get("ports", [])}
            check(ing == {8090}, where, "console ingress: 8090 only")
    for dep in deployments:
        where = "deploy/k8s/deployment.yaml"
        spec = dep["spec"]["template"]["spec"]
        labels = dep["spec"]["template"]["metadata"]["labels"]
        check(matches(dep["spec"]["selector"]["matchLabels"], labels), where, "selector does not match the pod labels")
        check(dep["spec"].get("replicas", 1) >= 2, where, "at least 2 replicas")
        pod_checks(where, spec, "Deployment")
        drain = seconds(settings.get("HOLDCLEAR_SHUTDOWN_TIMEOUT", "20s"))
        check(spec.get("terminationGracePeriodSeconds", 30) > drain + 5, where,
              f"terminationGracePeriodSeconds must exceed HOLDCLEAR_SHUTDOWN_TIMEOUT ({drain:g}s) with margin")
        c = spec["containers"][0]
        check(c.get("args") == ["run"], where, "the worker runs `holdclear run`")
        check(c.get("livenessProbe", {}).get("httpGet", {}).get("path") == "/healthz", where, "liveness on /healthz")
        check(c.get("readinessProbe", {}).get("httpGet", {}).get("path") == "/readyz", where, "readiness on /readyz")
        check(settings.get("HOLDCLEAR_HTTP_ADDR", "").endswith(":9090")
              and any(p["containerPort"] == 9090 for p in c.get("ports", [])), where, "metrics port 9090")
        mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
        rules = settings.get("HOLDCLEAR_RULES", "")
        check(str(Path(rules).parent) in mounts and "subPath" not in str(c.get("volumeMounts")), where,
              f"HOLDCLEAR_RULES={rules} must be inside a directory mount (no subPath: it never updates)")
        ann = dep["spec"]["template"]["metadata"].get("annotations", {})
        check(ann.get("prometheus.io/scrape") == "true" and ann.get("prometheus.io/port") == "9090", where,
              "Prometheus scrape annotations")

        for svc in [v for v in by_kind.get("Service", []) if component(v) != "console"]:
            check(matches(svc["spec"]["selector"], labels), "deploy/k8s/service.yaml", "selector does not match the worker")
            check(any(p["name"] == "metrics" for p in svc["spec"]["ports"]), "deploy/k8s/service.yaml", "port `metrics`")
            for sm in by_kind.get("ServiceMonitor", []):
                check(matches(sm["spec"]["selector"]["matchLabels"], svc["metadata"]["labels"]),
                      "deploy/k8s/servicemonitor.yaml", "selector does not match the Service")
                check(all(e.get("port") == "metrics" for e in sm["spec"]["endpoints"]),
                      "deploy/k8s/servicemonitor.yaml", "endpoints must use the Service port `metrics`")
        for pdb in by_kind.get("PodDisruptionBudget", []):
            check(matches(pdb["spec"]["selector"]["matchLabels"], labels), "deploy/k8s/pdb.yaml", "selector does not match the worker")
        for so in by_kind.get("ScaledObject", []):
            w = "deploy/k8s/scaledobject.yaml"
            check(so["spec"]["scaleTargetRef"]["name"] == dep["metadata"]["name"], w, "must target the worker Deployment")
            check(so["spec"].get("minReplicaCount", 0) >= 2, w, "minReplicaCount at least 2 (the PDB needs two)")
            auths = {a["metadata"]["name"]: a for a in by_kind.get("TriggerAuthentication", [])}
            for t in so["spec"]["triggers"]:
                check(t["metadata"].get("queueName") in CONTRACT_QUEUES, w, "must scale on the held-order queue")
                ref = t.get("authenticationRef", {}).get("name")
                if check(ref in auths, w, f"TriggerAuthentication {ref} missing"):
                    for s in auths[ref]["spec"].get("secretTargetRef", []):
                        check(s["key"] in example.get(s["name"], {}).get("stringData", {}), w,
                              f"secret {s['name']}/{s['key']} is not in secret.example.yaml")
        pols = {p["metadata"]["name"]: p for p in by_kind.get("NetworkPolicy", [])}
        np = next((p for p in pols.values() if matches(p["spec"]["podSelector"]["matchLabels"], labels)), None)
        if check(np is not None, "deploy/k8s/networkpolicy.yaml", "no NetworkPolicy selects the worker"):
            w = "deploy/k8s/networkpolicy.yaml"
            check(set(np["spec"]["policyTypes"]) == {"Ingress", "Egress"}, w, "worker: both directions")
            eg = {p["port"] for r in np["spec"]["egress"] for p in r.get("ports", [])}
            check({53, 5671, 5672, 5432, 443} <= eg and eg <= {53, 5671, 5672, 5432, 443}, w,
                  f"worker egress ports {sorted(eg)} must be DNS, AMQP(S), PostgreSQL and HTTPS")
            ing = [r for r in np["spec"].get("ingress", [])]
            check(len(ing) == 1 and [p["port"] for p in ing[0]["ports"]] == [9090]
                  and ing[0]["from"][0]["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "monitoring"},
                  w, "worker ingress: 9090 from the monitoring namespace only")

    jobs = by_kind.get("Job", [])
    check(len(jobs) == 1, kwhere, "exactly one migration Job")
    for job in jobs:
        spec = job["spec"]["template"]["spec"]
        pod_checks("deploy/k8s/migrate-job.yaml", spec, "Job")
        check(spec["containers"][0].get("args") == ["migrate"], "deploy/k8s/migrate-job.yaml", "runs `holdclear migrate`")
        check(spec.get("restartPolicy") in ("Never", "OnFailure"), "deploy/k8s/migrate-job.yaml", "restartPolicy")

    check(settings.get("HOLDCLEAR_DELIVERY_LIMIT") == str(CONTRACT_QUEUES["holdclear.order-held"]["x-delivery-limit"]),
          "deploy/k8s/settings.env", "HOLDCLEAR_DELIVERY_LIMIT must equal x-delivery-limit in definitions.json")


# --------------------------------------------------------------------------
def check_no_secrets() -> None:
    """Nothing that looks like a real credential in deploy/'s configuration
    files: passwords in URLs and values of password/secret/token keys must
    be a documented development default, a CHANGE-ME placeholder or a
    ${VARIABLE} taken from the environment."""
    allowed = ("holdclear-dev", "holdclear-demo-secret", "CHANGE-ME", "...")

    def ok(value: str) -> bool:
        value = value.strip("\"',")
        return value.startswith("${") or any(a in value for a in allowed) or value in ("", "true", "false")

    url_pw = re.compile(r"://[^:/\s@]+:([^@\s]+)@")
    key_val = re.compile(r"(?i)^\s*[\"']?[\w.-]*(password|secret|token)[\w.-]*[\"']?\s*[:=]\s*(\S+)")
    for path in sorted(DEPLOY.rglob("*")):
        if not path.is_file() or path.suffix not in (".yaml", ".yml", ".json", ".env", ".conf", ".toml"):
            continue
        for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if line.lstrip().startswith("#"):
                continue
            for m in url_pw.finditer(line):
                check(ok(m.group(1)), f"{rel(path)}:{n}", "a password in a URL; use a placeholder or ${VARIABLE}")
            m = key_val.match(line)
            if m and m.group(0).lstrip().strip("\"'").startswith("password_hash"):
                continue  # checked against the dev password in check_definitions
            if m and m.group(0).lstrip().startswith("secretName:"):
                continue  # the name of a Secret (a volume's source), not a value
            if m and not line.strip().startswith(("- name:", "name:")) and m.group(2) not in ("|", ">"):
                value = m.group(2)
                if "://" in value or value.endswith((".toml", ".json")) or m.group(1).lower() == "token" and value.startswith("http"):
                    continue
                if re.search(r"(?i)(ttl|lifetime|expir)", line.split("=")[0].split(":")[0]):
                    continue  # a duration (token_ttl), not a credential
                check(ok(value), f"{rel(path)}:{n}", f"{m.group(1)} value looks like a secret; use a placeholder")
    for must in ("rules.toml", "sim-scenario.toml"):
        check((DEPLOY / "config" / must).is_file(), f"deploy/config/{must}",
              "missing: the image and compose.yaml need it at run time")


def main() -> int:
    defs = check_definitions()
    compose = check_compose()
    check_rabbitmq_conf(compose)
    check_k8s(defs)
    check_no_secrets()
    for w in warnings:
        print(f"WARN  {w}")
    for e in errors:
        print(f"ERROR {e}")
    if errors:
        print(f"{len(errors)} consistency check(s) failed")
        return 1
    print("consistency checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
