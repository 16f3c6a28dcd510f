"""SRC/DST names read as kubectl reads them (svc/NAME, svc/NS/NAME, pod/NAME, node/NAME, -n),
and unknown names answered with what to type instead, across kinds: on an inventory built in
memory, and through the API server (tests/fakeapi/), which go through the same resolver."""

from __future__ import annotations

import pytest

from tests.fakeapi import FakeApi
from tracer.cluster import api as kube
from tracer.cluster import endpoints, fetch, names
from tracer.cluster.inventory import Inventory, Node, Pod, Service
from tracer.errors import BadInput


@pytest.fixture
def shop(inv: Inventory) -> Inventory:
    """The lab's inventory plus a namespace `shop` with pod web-0 and Service cart."""
    inv.pods["shop/web-0"] = Pod("shop", "web-0", "node-1", "10.244.1.50")
    inv.services["shop/cart"] = Service("shop", "cart", "10.96.0.50", backends=["shop/web-0"],
                                        backend_ips=["10.244.1.50"])
    inv.reindex()
    return inv


@pytest.mark.parametrize("spec,namespace,kind,key", [
    ("pod-1-1", None, "pod", "default/pod-1-1"),
    ("web-0", "shop", "pod", "shop/web-0"),
    ("pod/web-0", "shop", "pod", "shop/web-0"),
    ("pod/shop/web-0", None, "pod", "shop/web-0"),
    ("po/pod-1-1", None, "pod", "default/pod-1-1"),
    ("default/pod-1-1", "shop", "pod", "default/pod-1-1"),    # an explicit namespace wins over -n
    ("svc/web", None, "service", "default/web"),
    ("svc/cart", "shop", "service", "shop/cart"),
    ("service/shop/cart", None, "service", "shop/cart"),
    ("services/web", None, "service", "default/web"),
    ("node/node-2", "shop", "node", "node-2"),
    ("nodes/node-2", None, "node", "node-2"),
    ("10.244.1.2", "shop", "ip", "10.244.1.2"),
])
def test_parse(spec, namespace, kind, key):
    assert names.parse(spec, namespace) == names.Name(kind, key)


@pytest.mark.parametrize("spec", ["", "a/b/c/d", "svc/", "/pod", "node/a/b", "svc/a/b/c", "999.1.1.1", "fe80::1"])
def test_parse_refuses(spec):
    with pytest.raises(BadInput) as e:
        names.parse(spec)
    assert "\n" not in e.value.line() and e.value.exit_code == 2


def test_resolve_the_kubectl_forms(shop):
    assert endpoints.resolve("svc/web", shop).service.key == "default/web"
    assert endpoints.resolve("svc/web", shop).ip == "10.96.0.10"
    assert endpoints.resolve("svc/default/web", shop).ip == "10.96.0.10"
    assert endpoints.resolve("svc/cart", shop, "shop").service.key == "shop/cart"
    assert endpoints.resolve("web-0", shop, "shop").pod.key == "shop/web-0"
    assert endpoints.resolve("pod/web-0", shop, "shop").ip == "10.244.1.50"
    assert endpoints.resolve("pod/pod-1-1", shop).pod.key == "default/pod-1-1"
    assert endpoints.resolve("node/node-2", shop, "shop").node.name == "node-2"
    # -n does not move names that carry their namespace
    assert endpoints.resolve("default/pod-1-1", shop, "shop").pod.key == "default/pod-1-1"
    assert endpoints.resolve("svc/default/web", shop, "shop").service.key == "default/web"


@pytest.mark.parametrize("spec,namespace,line", [
    # a node's name typed as a pod
    ("node-2", None, "no pod default/node-2; did you mean node/node-2?"),
    # a Service's name typed bare (a pod), in its namespace and in another one
    ("web", None, "no pod default/web; did you mean svc/default/web?"),
    ("cart", None, "no pod default/cart; did you mean svc/shop/cart?"),
    ("cart", "shop", "no pod shop/cart; did you mean svc/shop/cart?"),
    # a pod's name typed as a Service or a node
    ("svc/pod-1-1", None, "no Service default/pod-1-1; did you mean default/pod-1-1?"),
    ("node/pod-1-1", None, "no node pod-1-1; did you mean default/pod-1-1?"),
    # a node typed as a Service
    ("svc/node-1", None, "no Service default/node-1; did you mean node/node-1?"),
    # near names of the same kind, spelled as they are typed
    ("svc/wbe", None, "no Service default/wbe; did you mean svc/default/web"),
    ("node/node-9", None, "no node node-9; did you mean node/node-"),
    ("pod-1-9", None, "no pod default/pod-1-9; did you mean default/pod-1-"),
    # the wrong namespace
    ("web-0", None, "no pod default/web-0; did you mean shop/web-0"),
])
def test_unknown_names_suggest_across_kinds(shop, spec, namespace, line):
    with pytest.raises(BadInput) as e:
        endpoints.resolve(spec, shop, namespace)
    assert e.value.line().startswith(line), e.value.line()
    assert "\n" not in e.value.line() and e.value.exit_code == 2


def test_hint_without_anything_near():
    name = names.parse("node/zzzz")
    assert names.hint(name, ["default/pod-1-1"], [], ["node-1"], fallback="list them") == "list them"


def test_hint_in_a_large_cluster_is_quick():
    import time

    pods = [f"ns{i % 50}/pod-{i}" for i in range(20000)]
    nodes = [Node(f"node-{i}", None).name for i in range(500)]
    t0 = time.monotonic()
    out = names.hint(names.parse("ns3/pod-1003x"), pods, [], nodes)
    assert time.monotonic() - t0 < 2.0 and "ns3/pod-1003" in out


@pytest.fixture
def conn(tmp_path):
    with FakeApi.from_lab("pttestnames") as fake:
        c = kube.connect(str(fake.write_kubeconfig(tmp_path / "kubeconfig")))
        yield c
        c.close()


@pytest.mark.parametrize("spec,line", [
    ("node-2", "no pod default/node-2; did you mean node/node-2?"),
    ("web", "no pod default/web; did you mean svc/default/web?"),
    ("svc/wbe", "no Service default/wbe; did you mean svc/default/web"),
    ("node/pod-1-1", "no node pod-1-1; did you mean default/pod-1-1?"),
])
def test_the_api_suggests_as_the_inventory_does(conn, spec, line):
    with pytest.raises(BadInput) as e:
        fetch.inventory_for(conn, [spec])
    assert e.value.line().startswith(line), e.value.line()


def test_the_api_fetches_the_kubectl_forms(conn):
    inv, _ = fetch.inventory_for(conn, ["pod/pod-1-1", "svc/web"])
    assert endpoints.resolve("svc/web", inv).service.backend_ips == ["10.244.2.3"]
    assert endpoints.resolve("pod/pod-1-1", inv).pod.key == "default/pod-1-1"
    with pytest.raises(BadInput) as e:    # -n moves the bare names
        fetch.inventory_for(conn, ["pod-1-1"], namespace="shop")
    assert e.value.line().startswith("no pod shop/pod-1-1")
