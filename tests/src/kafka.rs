//! Kafka for tests: librdkafka's built-in mock cluster, which speaks the real protocol on
//! loopback ports. Being built; see issue 3.
