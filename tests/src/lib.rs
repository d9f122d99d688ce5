//! Harness for umnet integration tests.
