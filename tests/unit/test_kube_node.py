"""Pure parts of the enrichment: workload owners, inventory indexes and mutators, and the
node-side parsers (netlink links, fib_trie, pod cgroups, crictl inspectp). No privileges."""

from __future__ import annotations

import json
import subprocess

import pytest

from tracer.cluster import endpoints
from tracer.cluster import inventory
from tracer.node import pods as nodepods
from tracer.lab import topology as T


# ---------------------------------------------------------------------------------------
# Workload owners

def _pod(name, refs=None, labels=None, ip="10.1.0.5", ns="default", node="n1", **spec):
    return {"kind": "Pod",
            "metadata": {"name": name, "namespace": ns, "uid": f"uid-{name}", "labels": labels or {},
                         "ownerReferences": refs or []},
            "spec": {"nodeName": node, **spec}, "status": {"podIP": ip}}


def _ref(kind, name, controller=True):
    return {"apiVersion": "apps/v1", "kind": kind, "name": name, "uid": "x", "controller": controller}


@pytest.mark.parametrize("refs,labels,want", [
    ([_ref("ReplicaSet", "web-7d9f8b6c5d")], {"pod-template-hash": "7d9f8b6c5d"}, ("Deployment", "web")),
    ([_ref("ReplicaSet", "web-v2-7d9f8b6c5d")], {"pod-template-hash": "7d9f8b6c5d"}, ("Deployment", "web-v2")),
    ([_ref("ReplicaSet", "standalone")], {}, ("ReplicaSet", "standalone")),          # no hash: a bare RS
    ([_ref("ReplicaSet", "web-abc")], {"pod-template-hash": "zzz"}, ("ReplicaSet", "web-abc")),
    ([_ref("StatefulSet", "db")], {}, ("StatefulSet", "db")),
    ([_ref("DaemonSet", "podtrace-agent")], {}, ("DaemonSet", "podtrace-agent")),
    ([_ref("Job", "backup-28476120")], {}, ("CronJob", "backup")),
    ([_ref("Job", "migrate-2")], {}, ("Job", "migrate-2")),                           # not a schedule
    ([_ref("Node", "node-1")], {}, ("StaticPod", "node-1")),
    ([_ref("Foo", "a", controller=False), _ref("StatefulSet", "b")], {}, ("StatefulSet", "b")),
    ([], {}, (None, None)),
])
def test_workload_of_owner_references(refs, labels, want):
    pod = inventory.pod_from_obj(_pod("p", refs, labels))
    assert (pod.workload_kind, pod.workload_name) == want
    if refs:
        ctrl = next((r for r in refs if r["controller"]), refs[0])
        assert (pod.owner_kind, pod.owner_name) == (ctrl["kind"], ctrl["name"])
        assert pod.workload == f"{want[0]}/{want[1]}"
    else:
        assert pod.owner_kind is None and pod.workload is None


def test_pod_fields_from_objects():
    pod = inventory.pod_from_obj(_pod("h", ip="172.30.0.11", hostNetwork=True))
    assert pod.host_network and pod.uid == "uid-h" and pod.node == "n1"
    assert inventory.pod_from_obj(_pod("c")).host_network is False


# ---------------------------------------------------------------------------------------
# Inventory: indexes and mutators

@pytest.fixture
def inv(tmp_path):
    doc = T.inventory(T.plan(T.LabConfig(prefix="ptunitk", state_dir=tmp_path)))
    f = tmp_path / "inv.json"
    f.write_text(json.dumps(doc))
    return inventory.load_list(f)


def test_lookup_ip_agrees_with_by_ip(inv):
    for ip, want in inv.by_ip().items():
        assert inv.lookup_ip(ip) == want
    assert inv.lookup_ip("192.0.2.1") == (None, None)


def test_index_follows_mutators(inv):
    inv.apply("ADDED", _pod("new", ip="10.244.1.77"))
    assert inv.lookup_ip("10.244.1.77") == ("pod", "default/new")
    inv.apply("MODIFIED", _pod("new", ip="10.244.1.78"))
    assert inv.lookup_ip("10.244.1.77") == (None, None)
    assert endpoints.resolve("10.244.1.78", inv).pod.key == "default/new"
    inv.apply("DELETED", _pod("new"))
    assert inv.lookup_ip("10.244.1.78") == (None, None) and "default/new" not in inv.pods


def test_index_survives_direct_dict_changes(inv):
    """Code that fills the dicts directly (as before the indexes existed) still resolves."""
    inv.pods["default/direct"] = inventory.Pod("default", "direct", "node-1", "10.244.1.55")
    assert endpoints.resolve("10.244.1.55", inv).pod.key == "default/direct"
    inv.pods["default/direct"].ip = "10.244.1.56"          # behind the index's back
    assert endpoints.resolve("10.244.1.55", inv).pod is None
    assert endpoints.resolve("10.244.1.56", inv).pod.key == "default/direct"


def test_host_network_pods_share_the_node_address(inv):
    inv.apply("ADDED", _pod("agent-a", ip="172.30.0.11", node="node-1", hostNetwork=True))
    inv.apply("ADDED", _pod("agent-b", ip="172.30.0.11", node="node-1", hostNetwork=True))
    assert inv.lookup_ip("172.30.0.11") == inv.by_ip()["172.30.0.11"] == ("pod", "default/agent-b")
    inv.apply("DELETED", _pod("agent-b"))
    assert inv.lookup_ip("172.30.0.11") == ("pod", "default/agent-a")
    inv.apply("DELETED", _pod("agent-a"))
    assert inv.lookup_ip("172.30.0.11") == ("node", "node-1")


def test_service_and_slices_in_any_order():
    inv = inventory.Inventory()
    sl = {"kind": "EndpointSlice", "metadata": {"name": "web-abc", "namespace": "default",
                                                 "labels": {"kubernetes.io/service-name": "web"}},
          "endpoints": [{"addresses": ["10.0.0.1"], "conditions": {"ready": True},
                         "targetRef": {"kind": "Pod", "name": "a", "namespace": "default"}},
                        {"addresses": ["10.0.0.2"], "conditions": {"ready": False},
                         "targetRef": {"kind": "Pod", "name": "b", "namespace": "default"}}]}
    svc = {"kind": "Service", "metadata": {"name": "web", "namespace": "default"},
           "spec": {"clusterIP": "10.96.0.9", "selector": {"app": "web"},
                    "ports": [{"port": 80, "targetPort": 8080}]}}
    inv.apply("ADDED", sl)              # the slice before its Service
    inv.apply("ADDED", svc)
    assert inv.services["default/web"].backend_ips == ["10.0.0.1"]
    assert inv.services["default/web"].selector == {"app": "web"}
    sl2 = json.loads(json.dumps(sl))
    sl2["metadata"]["name"] = "web-def"
    sl2["endpoints"] = [{"addresses": ["10.0.0.3"], "targetRef": {"kind": "Pod", "name": "c"}}]
    inv.apply("ADDED", sl2)
    assert inv.services["default/web"].backends == ["default/a", "default/c"]
    inv.apply("DELETED", sl)
    assert inv.services["default/web"].backend_ips == ["10.0.0.3"]
    assert endpoints.resolve("10.96.0.9", inv).addresses() == ["10.96.0.9", "10.0.0.3"]
    inv.apply("DELETED", svc)
    assert endpoints.resolve("10.96.0.9", inv).service is None


def test_upsert_keeps_lab_facts(inv):
    inv.pods["default/pod-1-1"].netns = "ptunitk-pod-1-1"
    inv.apply("MODIFIED", _pod("pod-1-1", ip="10.244.1.2", node="node-1"))
    assert inv.pods["default/pod-1-1"].netns == "ptunitk-pod-1-1"


def test_describe_ip(inv):
    # lab pods are each the one replica of a Deployment of their own name
    assert inv.describe_ip("10.244.2.3") == {"kind": "pod", "key": "default/pod-2-2", "node": "node-2",
                                             "workload": "Deployment/pod-2-2"}
    assert inv.describe_ip("10.96.0.10")["kind"] == "service"
    assert inv.describe_ip("172.30.0.12") == {"kind": "node", "key": "node-2", "node": "node-2", "workload": None}
    assert inv.describe_ip("192.0.2.1") is None and inv.describe_ip(None) is None


def test_close_matches_stay_fast_on_big_inventories():
    inv = inventory.Inventory()
    for i in range(5000):
        inv.pods[f"ns{i % 50}/app-{i}"] = inventory.Pod(f"ns{i % 50}", f"app-{i}", "n", f"10.{i // 250}.{i % 250}.1")
    with pytest.raises(Exception) as e:   # its time: bench/resolve.py (unknown_name_with_suggestions_ms)
        endpoints.resolve("ns3/app-3x", inv)
    assert "did you mean ns3/app-3" in e.value.line()


# ---------------------------------------------------------------------------------------
# Node side parsers

def _link_msg(index, name, kind=None, link=None, nsid=None, master=None):
    """An RTM_NEWLINK message as the kernel sends it (encoded, then decoded by pyroute2)."""
    from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg

    m = ifinfmsg()
    m["index"] = index
    m["attrs"] = [("IFLA_IFNAME", name)]
    if kind:
        m["attrs"].append(("IFLA_LINKINFO", {"attrs": [("IFLA_INFO_KIND", kind)]}))
    for attr, value in (("IFLA_LINK", link), ("IFLA_LINK_NETNSID", nsid), ("IFLA_MASTER", master)):
        if value is not None:
            m["attrs"].append((attr, value))
    m.encode()
    out = ifinfmsg(m.data)
    out.decode()
    return out


def test_links_of_netlink_messages():
    msgs = [_link_msg(1, "lo"), _link_msg(3, "cni0", "bridge"), _link_msg(5, "veth27272fab", "veth", 2, 1, 3),
            _link_msg(6, "vethlost", "veth", 2, -1)]
    links = {ln.ifname: ln for ln in nodepods.links_of(msgs)}
    assert links["veth27272fab"] == nodepods.Link(5, "veth27272fab", "veth", 2, 1, "cni0")
    assert links["cni0"].kind == "bridge" and links["cni0"].link_netnsid is None
    assert links["lo"].kind is None and links["lo"].peer_ifindex is None
    assert links["vethlost"].link_netnsid is None      # -1: the peer's namespace has no id here
    assert nodepods.links_of([]) == []


def test_links_of_this_namespace():
    """The same parsing on a real netlink answer (reading links needs no privilege)."""
    links = nodepods._read_links(None)
    lo = next(ln for ln in links if ln.ifname == "lo")
    assert lo.ifindex == 1 and lo.kind is None


FIB_TRIE = """Main:
  +-- 0.0.0.0/0 3 0 5
     |-- 0.0.0.0
        /0 universe UNICAST
     +-- 10.244.1.0/24 2 0 2
        |-- 10.244.1.0
           /24 link UNICAST
        |-- 10.244.1.2
           /32 host LOCAL
        |-- 10.244.1.255
           /32 link BROADCAST
     +-- 127.0.0.0/8 2 0 2
        |-- 127.0.0.1
           /32 host LOCAL
Local:
  +-- 0.0.0.0/0 3 0 5
     |-- 10.244.1.2
        /32 host LOCAL
"""


def test_parse_fib_trie():
    assert nodepods.parse_fib_trie(FIB_TRIE) == ["10.244.1.2"]
    assert nodepods.parse_fib_trie("") == []


@pytest.mark.parametrize("text,uid", [
    ("0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod3c1d8b52_7f0e_4a39_9a51_7c1d0f4f2b10.slice/"
     "cri-containerd-0123abcd.scope\n", "3c1d8b52-7f0e-4a39-9a51-7c1d0f4f2b10"),
    ("12:memory:/kubepods/burstable/pod3c1d8b52-7f0e-4a39-9a51-7c1d0f4f2b10/0123abcd\n",
     "3c1d8b52-7f0e-4a39-9a51-7c1d0f4f2b10"),
    ("0::/system.slice/containerd.service\n", None),
])
def test_pod_uid_from_cgroup(text, uid):
    assert nodepods.pod_uid_from_cgroup(text) == uid


CRICTL = """{
  "status": {"id": "abc", "metadata": {"attempt": 0, "name": "web-0", "namespace": "shop", "uid": "u1"},
             "state": "SANDBOX_READY"},
  "info": {"pid": 4242, "runtimeSpec": {"linux": {"namespaces": [
      {"type": "pid"}, {"type": "network", "path": "/var/run/netns/cni-1234"}]}}}
}
{
  "status": {"id": "def", "metadata": {"name": "db-0", "namespace": "shop", "uid": "u2"}},
  "info": {"pid": 4343}
}"""


def test_parse_crictl_inspectp():
    got = nodepods.parse_crictl_inspectp(CRICTL)
    assert got == [
        {"namespace": "shop", "name": "web-0", "uid": "u1", "pid": 4242, "netns_path": "/var/run/netns/cni-1234"},
        {"namespace": "shop", "name": "db-0", "uid": "u2", "pid": 4343, "netns_path": None},
    ]


def test_cri_degrades_gracefully(tmp_path):
    def missing(argv, **kw):
        raise FileNotFoundError(argv[0])
    assert nodepods.cri_netns_map(run=missing) == ({}, "crictl not installed")

    def no_runtime(argv, **kw):
        return subprocess.CompletedProcess(argv, 1, "", "connect: connect endpoint 'unix:///run/containerd/"
                                           "containerd.sock', make sure you are running as root\n")
    m, note = nodepods.cri_netns_map(run=no_runtime)
    assert m == {} and "crictl pods failed" in note

    ns_file = tmp_path / "cni-1234"
    ns_file.write_text("")

    def works(argv, **kw):
        if argv[1] == "pods":
            return subprocess.CompletedProcess(argv, 0, "abc\n", "")
        return subprocess.CompletedProcess(argv, 0, CRICTL.replace("/var/run/netns/cni-1234", str(ns_file))
                                           .replace('"pid": 4343', '"pid": null'), "")
    m, note = nodepods.cri_netns_map(run=works)
    assert note is None and m == {ns_file.stat().st_ino: "shop/web-0"}


def test_scan_netns_reads_proc_and_run_netns(tmp_path):
    proc = tmp_path / "proc"
    (proc / "101" / "ns").mkdir(parents=True)
    (proc / "101" / "ns" / "net").write_text("")
    (proc / "self").mkdir()
    run = tmp_path / "netns"
    run.mkdir()
    (run / "cni-9").write_text("")
    got = nodepods.scan_netns(proc, run)
    ino = (proc / "101" / "ns" / "net").stat().st_ino
    assert got[ino].pid == 101 and got[ino].path.endswith("101/ns/net")
    named = got[(run / "cni-9").stat().st_ino]
    assert named.name == "cni-9" and named.pid is None
