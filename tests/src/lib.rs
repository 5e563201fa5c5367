//! Test support shared by every crate's tests: real `redis-server` processes and Kafka.
