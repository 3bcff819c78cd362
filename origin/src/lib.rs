//! Room authority.
