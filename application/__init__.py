"""The application layer: the use cases between the gRPC servicers and the domain, the saga and
the databases (placing, reading, listing and cancelling orders, stock, watching, page tokens).
It imports no gRPC: servicers map requests to it and its results back."""
