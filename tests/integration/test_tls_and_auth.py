"""Who may call: TLS, mutual TLS and bearer tokens, with health left open to probes."""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from orders_service_api.v1 import orders_pb2 as pb
from orders_service_api.v1 import orders_pb2_grpc as pb_grpc

NOW = dt.datetime.now(dt.UTC)


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _cert(
    subject: str, key, issuer_name: str, issuer_key, *, ca: bool, server: bool = False
) -> x509.Certificate:
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer_name)]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - dt.timedelta(minutes=5))
        .not_valid_after(NOW + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    return builder.sign(issuer_key, hashes.SHA256())


class Pki:
    """A throwaway CA with a server and a client certificate, written as PEM files."""

    def __init__(self, folder: Path) -> None:
        ca_key, server_key, client_key = _key(), _key(), _key()
        ca = _cert("test-ca", ca_key, "test-ca", ca_key, ca=True)
        server = _cert("localhost", server_key, "test-ca", ca_key, ca=False, server=True)
        client = _cert("client-1", client_key, "test-ca", ca_key, ca=False)
        pem = serialization.Encoding.PEM
        self.ca = ca.public_bytes(pem)
        self.client_cert, self.client_key = client.public_bytes(pem), _pem_key(client_key)
        self.files = {}
        for name, data in {
            "ca.pem": self.ca,
            "server.pem": server.public_bytes(pem),
            "server.key": _pem_key(server_key),
        }.items():
            (folder / name).write_bytes(data)
            self.files[name] = str(folder / name)


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki(tmp_path)


def _health(channel: grpc.Channel) -> int:
    request = health_pb2.HealthCheckRequest(service="")
    return health_pb2_grpc.HealthStub(channel).Check(request, timeout=5).status


def test_tls_server_answers_clients_that_trust_its_ca_and_refuses_plaintext(start_server, sqlite_url, pki):
    server = start_server(
        database_url=sqlite_url, tls_cert_file=pki.files["server.pem"], tls_key_file=pki.files["server.key"]
    )
    address = f"localhost:{server.service.port}"
    with grpc.secure_channel(address, grpc.ssl_channel_credentials(root_certificates=pki.ca)) as channel:
        stock = pb_grpc.InventoryServiceStub(channel).SetStock(
            pb.SetStockRequest(sku="TLS-1", available=3), timeout=5
        )
        assert stock.available == 3
        assert _health(channel) == health_pb2.HealthCheckResponse.SERVING
    with grpc.insecure_channel(address) as plaintext, pytest.raises(grpc.RpcError) as refused:
        _health(plaintext)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_requires_a_client_certificate_signed_by_the_client_ca(start_server, sqlite_url, pki):
    server = start_server(
        database_url=sqlite_url,
        tls_cert_file=pki.files["server.pem"],
        tls_key_file=pki.files["server.key"],
        tls_client_ca_file=pki.files["ca.pem"],
    )
    address = f"localhost:{server.service.port}"
    anonymous = grpc.ssl_channel_credentials(root_certificates=pki.ca)
    with grpc.secure_channel(address, anonymous) as channel, pytest.raises(grpc.RpcError) as refused:
        _health(channel)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE

    identified = grpc.ssl_channel_credentials(pki.ca, pki.client_key, pki.client_cert)
    with grpc.secure_channel(address, identified) as channel:
        assert _health(channel) == health_pb2.HealthCheckResponse.SERVING


def test_bearer_tokens_guard_the_services_but_not_health_and_are_never_logged(
    start_server, sqlite_url, tmp_path, caplog
):
    tokens = tmp_path / "tokens"
    tokens.write_text("first-secret-token\nsecond-secret-token\n")
    server = start_server(database_url=sqlite_url, auth_tokens_file=str(tokens), saga_workers=0)
    inventory = server.stubs.inventory
    request = pb.SetStockRequest(sku="AUTH-1", available=1)
    caplog.set_level(logging.DEBUG)

    for metadata in [(), (("authorization", "Bearer wrong"),), (("authorization", "first-secret-token"),)]:
        with pytest.raises(grpc.RpcError) as denied:
            inventory.SetStock(request, metadata=metadata, timeout=5)
        assert denied.value.code() == grpc.StatusCode.UNAUTHENTICATED
    for token in ("first-secret-token", "second-secret-token"):
        assert (
            inventory.SetStock(request, metadata=(("authorization", f"Bearer {token}"),), timeout=5).sku
            == "AUTH-1"
        )
    assert _health(server.channel) == health_pb2.HealthCheckResponse.SERVING

    assert "secret-token" not in caplog.text
    assert "UNAUTHENTICATED" in caplog.text


SCOPED_TOKENS = """\
# operators: a token alone on its line has every scope
admin-secret-token
# the shop front may place, read and cancel orders and read stock, but not set it
shop-secret-token orders:write,orders:read,inventory:read
reader-secret-token orders:read
stock-keeper-secret-token inventory:write,inventory:read
"""


METHODS = {"SetStock", "GetStock", "PlaceOrder", "GetOrder", "ListOrders", "WatchOrder", "CancelOrder"}


def _bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


def _code(call, request, token: str) -> grpc.StatusCode:
    """The status of a unary call, or of a stream's first message."""
    try:
        reply = call(request, metadata=_bearer(token), timeout=5)
        if isinstance(reply, grpc.Call) and hasattr(reply, "__next__"):
            next(reply)
            reply.cancel()
    except grpc.RpcError as error:
        return error.code()
    return grpc.StatusCode.OK


@pytest.fixture
def scoped_server(start_server, sqlite_url, tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text(SCOPED_TOKENS)
    return start_server(database_url=sqlite_url, auth_tokens_file=str(tokens), saga_workers=0)


def test_each_method_needs_its_scope_and_a_token_without_it_gets_permission_denied(scoped_server, caplog):
    orders, inventory = scoped_server.stubs.orders, scoped_server.stubs.inventory
    caplog.set_level(logging.DEBUG)
    place = pb.PlaceOrderRequest(customer_id="scoped", items=[pb.OrderItem(sku="SCOPE-1", quantity=1)])
    allowed = {
        "admin-secret-token": set(METHODS),
        "shop-secret-token": set(METHODS) - {"SetStock"},
        "reader-secret-token": {"GetOrder", "ListOrders", "WatchOrder"},
        "stock-keeper-secret-token": {"SetStock", "GetStock"},
    }

    for token, methods in allowed.items():
        # A PENDING order of its own, so that each token's CancelOrder has something to cancel.
        order_id = orders.PlaceOrder(place, metadata=_bearer("admin-secret-token"), timeout=5).order.order_id
        calls = {
            "SetStock": (inventory.SetStock, pb.SetStockRequest(sku="SCOPE-1", available=5)),
            "GetStock": (inventory.GetStock, pb.GetStockRequest(sku="SCOPE-1")),
            "PlaceOrder": (orders.PlaceOrder, place),
            "GetOrder": (orders.GetOrder, pb.GetOrderRequest(order_id=order_id)),
            "ListOrders": (orders.ListOrders, pb.ListOrdersRequest()),
            "WatchOrder": (orders.WatchOrder, pb.WatchOrderRequest(order_id=order_id)),
            "CancelOrder": (orders.CancelOrder, pb.CancelOrderRequest(order_id=order_id)),
        }
        assert set(calls) == METHODS
        codes = {name: _code(call, request, token) for name, (call, request) in calls.items()}
        expected = {
            name: grpc.StatusCode.OK if name in methods else grpc.StatusCode.PERMISSION_DENIED
            for name in calls
        }
        assert codes == expected, token

    # A token that is not in the file is still unauthenticated, whatever the method.
    get = pb.GetOrderRequest(order_id=order_id)
    assert _code(orders.GetOrder, get, "unknown-secret-token") == grpc.StatusCode.UNAUTHENTICATED
    assert "secret-token" not in caplog.text
    assert "code=PERMISSION_DENIED" in caplog.text


def _list_services(channel: grpc.Channel, metadata=()) -> list[str]:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    (reply,) = stub.ServerReflectionInfo(iter([request]), metadata=metadata, timeout=5)
    return [service.name for service in reply.list_services_response.service]


def test_with_tokens_on_reflection_needs_a_valid_token_and_health_none(scoped_server):
    channel = scoped_server.channel

    for metadata in [(), _bearer("wrong"), (("authorization", "reader-secret-token"),)]:
        with pytest.raises(grpc.RpcError) as denied:
            _list_services(channel, metadata)
        assert denied.value.code() == grpc.StatusCode.UNAUTHENTICATED
    # Reflection only describes the API: any valid token may read it, whatever its scopes.
    assert "orders.v1.OrderService" in _list_services(channel, _bearer("reader-secret-token"))

    assert _health(channel) == health_pb2.HealthCheckResponse.SERVING
    watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""), timeout=5)
    assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
    watch.cancel()
