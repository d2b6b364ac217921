//! The operating system's CSPRNG, failing closed.

use crate::error::Error;

/// Fill `buf` from the OS CSPRNG. A failure is an error, never a weaker
/// fallback: a predictable family secret would let anyone mint tokens.
pub(crate) fn fill(buf: &mut [u8]) -> Result<(), Error> {
    getrandom::fill(buf).map_err(|e| Error::Random {
        detail: e.to_string(),
    })
}
