//! Helpers shared by test files.
pub mod dpop_proof;
