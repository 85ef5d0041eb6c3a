//! Upcasters: raise old `(kind, schema)` payloads to the current schema on
//! read.
