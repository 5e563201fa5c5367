//! Test support shared by every crate's tests and benches: real `redis-server` processes
//! (standalone and a 3-node cluster on loopback ports) and librdkafka's in-process Kafka mock
//! cluster, or a tansu broker in its place. Nothing here is a mock of Redis or of the Kafka
//! protocol.

pub mod kafka;
pub mod redis_server;
pub mod secure_redis;
pub mod tansu;
