//! System-test helpers (filled by later issues).
