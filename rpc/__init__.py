"""gRPC plumbing both services share: typed errors, the server app, wire helpers, metrics, deadlines."""
