//! TLS test helpers: certificates generated in the test, and clients that trust them.
