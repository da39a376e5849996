"""Schemathesis hooks for `cargo xtask contract` (loaded through SCHEMATHESIS_HOOKS).

They touch schema-valid ("positive") cases only, and only where a rule
depends on the cluster's state or ties fields together, which JSON Schema
cannot state, or where a generated value would act on this machine:

- a group's `nodes` become members of the cluster under test (a name the
  schema allows but the cluster lacks is refused with 422, by design); a
  group is not bound to the ticket (`ticket`: the cluster under test has
  no `[ticket]`, where that is refused with 422, by design);
  `anti_affinity` / `colocate_with` are dropped (they name existing groups);
  `move`'s `to` is one of the group's nodes and `resolve`'s `discard` one of
  the volume's replicas;
- cross-field rules: one volume per group, named after the group (volume
  names are unique cluster-wide), `replicas` at most the nodes listed,
  `modes` only for replicas, a resync's `min_rate` only with its `adaptive`
  mode and without a `rate` (it may not exceed it), a file system on the volume listed before it,
  unique resource names, mountpoints that do not overlap;
- safety: commands are `sleep`, scripts `/bin/true`, OCF agents
  `heartbeat:Dummy`, systemd units and interfaces do not exist, mountpoints
  live under /var/tmp/tandem-contract, volumes are at most 64MiB, and no
  resource runs as another user (users are checked against the node's own
  user database). A joining node's addresses are 127.0.0.1 on a closed
  port; node1, the node the tester talks to, is never removed, nor is the
  `admin` token the run uses revoked.
- a stream (`GET /v1/events/stream`) asks for the first event with no
  filter (`since=0`, `limit=1`): a schema-valid stream otherwise waits
  for events that may never come, until the request times out (its
  filters are the same as `GET /v1/events`', tested there);
- an alert's target is harmless: webhooks and mail go to a closed port
  on 127.0.0.1 (so `POST /v1/alerts/{name}/test` answers its documented
  502), exec alerts run `/bin/true`; a mail alert's `username` and
  `password` come both or not at all; a `cacert` (any PEM-looking text the
  schema allows) is dropped, as no schema can say what a certificate is;
- a client certificate request carries a real signing request (made once
  with `openssl`) and no operator-issued `certificate` (the demo's CA is
  the cluster's own): no schema can say what a valid CSR is.

Negative cases are left as generated: the server must refuse them.
"""

import functools
import json
import os
import ssl
import subprocess
import tempfile
import urllib.request

import schemathesis

BASE = os.environ.get("TANDEM_CONTRACT_URL", "http://127.0.0.1:7401").rstrip("/")
TOKEN = os.environ.get("TANDEM_CONTRACT_TOKEN", "")
CACERT = os.environ.get("TANDEM_CONTRACT_CACERT", "")
TALKED_TO = os.environ.get("TANDEM_CONTRACT_NODE", "node1")


def _get(path):
    req = urllib.request.Request(BASE + path)
    if TOKEN:
        req.add_header("Authorization", "Bearer " + TOKEN)
    ctx = ssl.create_default_context(cafile=CACERT) if CACERT else None
    try:
        with urllib.request.urlopen(req, timeout=5, context=ctx) as r:
            return json.loads(r.read())
    except Exception:
        return None


def members():
    # Asked each time: the tester itself removes nodes.
    got = _get("/v1/nodes") or []
    return sorted(n["name"] for n in got if isinstance(n, dict)) or [TALKED_TO]


@functools.lru_cache(maxsize=1)
def csr():
    with tempfile.TemporaryDirectory() as d:
        out = subprocess.run(
            ["openssl", "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
             "-keyout", os.path.join(d, "key.pem"), "-subj", "/CN=contract"],
            check=True, capture_output=True, text=True)
        return out.stdout


def _positive(case):
    meta = getattr(case, "meta", None)
    mode = getattr(getattr(meta, "generation", None), "mode", None)
    return mode is None or mode.is_positive


def _fix_group(name, body):
    nodes = members()
    listed = body.get("nodes") or [nodes[0]]
    mapped = []
    for i, _ in enumerate(listed):
        n = nodes[i % len(nodes)]
        if n not in mapped:
            mapped.append(n)
    body["nodes"] = mapped
    body.pop("anti_affinity", None)
    body.pop("colocate_with", None)
    body.pop("ticket", None)
    volume = None
    mounted = False
    kept = []
    for i, r in enumerate(body.get("resources") or []):
        if not isinstance(r, dict):
            kept.append(r)
            continue
        r["name"] = f"r{i}"
        t = r.get("type")
        r.pop("user", None)
        r.pop("group", None)
        if t == "process":
            r["command"] = ["sleep", "600"]
        elif t == "exec":
            r["path"] = "/bin/true"
        elif t == "ocf":
            r["agent"] = "heartbeat:Dummy"
        elif t == "systemd":
            r["unit"] = "tandem-contract-none.service"
        elif t == "vip":
            r["interface"] = "tndcontract0"
            r["backup_interfaces"] = []
        elif t == "volume":
            if volume is not None:
                continue
            volume = ("v-" + name)[:63]
            r["name"] = volume
            size = r.get("size")
            if not isinstance(size, int) or size > 64 << 20:
                r["size"] = "64MiB"
            r["replicas"] = min(int(r.get("replicas", 2)), len(mapped))
            r.pop("modes", None)
            resync = r.get("resync")
            if isinstance(resync, dict) and resync.get("min_rate") is not None:
                if r.get("rate") is not None:
                    resync.pop("min_rate")  # it may not exceed `rate`
                else:
                    resync["mode"] = "adaptive"
        elif t == "filesystem":
            if volume is None or mounted:
                continue
            mounted = True
            r["volume"] = volume
            r["mountpoint"] = f"/var/tmp/tandem-contract/{name}"
            r["mkfs"] = False
            r.pop("owner", None)
        kept.append(r)
    if not kept:
        kept = [{"name": "r0", "type": "process", "command": ["sleep", "600"]}]
    body["resources"] = kept
    return body


def _fix_alert(body):
    kind = body.get("kind")
    body.pop("cacert", None)
    if kind == "webhook":
        body["url"] = "http://127.0.0.1:9/hook"
    elif kind == "smtp":
        body["server"] = "127.0.0.1"
        body["port"] = 9
        # A rule between fields: SMTP AUTH takes both or neither.
        if (body.get("username") is None) != (body.get("password") is None):
            body.pop("username", None)
            body.pop("password", None)
    elif kind == "exec":
        body["command"] = ["/bin/true"]
        body.pop("timestamp_format", None)


@schemathesis.hook
def before_load_schema(context, raw_schema):
    # An API that checks no token yet is tested against its document without
    # the security requirements: a request without a token is then valid.
    if not TOKEN:
        for item in raw_schema.get("paths", {}).values():
            for op in item.values():
                if isinstance(op, dict):
                    op.pop("security", None)
                    op.get("responses", {}).pop("401", None)
                    op.get("responses", {}).pop("403", None)


@schemathesis.hook
def map_case(context, case):
    op = context.operation
    path = getattr(op, "path", "")
    method = getattr(op, "method", "").upper()
    params = case.path_parameters or {}
    if path == "/v1/nodes/{name}" and method == "DELETE" and params.get("name") == TALKED_TO:
        # Whatever the case: removing the node under test ends the run.
        params["name"] = "not-" + TALKED_TO
        return case
    if path == "/v1/tokens/{name}" and method == "DELETE" and params.get("name") == "admin":
        # Nor may it revoke the token it runs with.
        params["name"] = "not-admin"
        return case
    if not _positive(case):
        return case
    if path == "/v1/events/stream":
        case.query = {"since": 0, "limit": 1}
        if case.headers:
            case.headers.pop("Last-Event-ID", None)
        return case
    body = case.body if isinstance(case.body, dict) else None
    if path == "/v1/groups/{name}" and method == "PUT" and body is not None:
        case.body = _fix_group(str(params.get("name", "g")), body)
    elif path == "/v1/groups/{name}/move" and body is not None:
        g = _get(f"/v1/groups/{params.get('name', '')}?stale=true")
        if isinstance(g, dict) and g.get("spec", {}).get("nodes"):
            body["to"] = g["spec"]["nodes"][-1]
    elif path == "/v1/volumes/{name}/resolve" and body is not None:
        v = _get(f"/v1/volumes/{params.get('name', '')}?stale=true")
        if isinstance(v, dict) and v.get("replicas"):
            body["discard"] = v["replicas"][-1]["node"]
    elif path == "/v1/certificates" and method == "POST" and body is not None:
        body["csr"] = csr()
        body.pop("certificate", None)
    elif path == "/v1/alerts/{name}" and method == "PUT" and body is not None:
        _fix_alert(body)
    elif path == "/v1/volumes/{name}/promote":
        # A valid promotion names a replica and confirms with the volume's
        # name; the cluster's volume always has an UpToDate replica online,
        # so it is refused on its merits (409), never carried out.
        name = str(params.get("name", ""))
        v = _get(f"/v1/volumes/{name}?stale=true")
        fixed = dict(body or {})
        fixed["confirm"] = name
        if isinstance(v, dict) and v.get("replicas"):
            fixed["node"] = v["replicas"][-1]["node"]
        elif not fixed.get("node"):
            fixed["node"] = "n1"
        case.body = fixed
    elif path == "/v1/nodes" and method == "POST" and body is not None:
        body["addresses"] = ["127.0.0.1"]
        body["port"] = 9
    return case
