//! Throwaway `redis-server` processes on free loopback ports. Being built; see issue 6.
