from generated.orders.v1 import orders_pb2 as pb


def test_placed_order_can_be_read_back(server):
    placed = server.stubs.place("alice", [("SKU-1", 2)])
    assert placed.status == pb.ORDER_STATUS_PENDING
    assert server.stubs.get(placed.order_id) == placed
