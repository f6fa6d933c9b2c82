from orders_service_api.v1 import orders_pb2 as pb


def test_placed_order_can_be_read_back_while_no_dispatcher_runs(start_server, database_url):
    server = start_server(database_url=database_url, saga_workers=0)
    placed = server.stubs.place("alice", [("SKU-1", 2)])
    assert placed.status == pb.ORDER_STATUS_PENDING
    assert server.stubs.get(placed.order_id) == placed
