//! The `Snapshotter` contract and its gRPC proxy.
