//! Sender-constrained families (DPoP, RFC 9449): the key thumbprint a
//! family may be bound to, the per-client `dpop` knob, and the one pure
//! check the refresh decision and the code exchange make (README "The
//! order of checks", step 6).
//!
//! The engine never sees a proof: the embedding server verifies it (RFC
//! 9449 §4.3) and hands over the RFC 7638 SHA-256 thumbprint of the proof's
//! key. What the engine keeps, and compares in constant time, is that
//! thumbprint (`jkt`). A family bound to one accepts no redemption without
//! a proof from that key, grace replays included, and a refusal revokes
//! nothing: a thief holding the token but not the key can neither ride the
//! grace window nor log the owner out (docs/design.md "Sender-constrained
//! families").

use std::fmt;
use std::str::FromStr;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use subtle::ConstantTimeEq;

use crate::decision::DenyReason;

/// The RFC 7638 SHA-256 thumbprint of a DPoP key (`jkt`, RFC 9449 §6.1):
/// what a family is bound to. Compared in constant time; `Debug` does not
/// print it (it names the client's key, and logs have no use for it).
#[derive(Clone, Copy, Eq)]
pub struct Jkt([u8; 32]);

/// Characters of a thumbprint in base64url without padding.
const JKT_B64_LEN: usize = 43;

impl Jkt {
    /// A thumbprint from its 32 bytes (a SHA-256 digest).
    pub const fn from_bytes(bytes: [u8; 32]) -> Jkt {
        Jkt(bytes)
    }

    /// Its 32 bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Parse the wire form (`cnf.jkt`, `dpop_jkt`): 43 base64url
    /// characters without padding (RFC 9449 §6.1, RFC 7638 §3).
    pub fn from_base64url(s: &str) -> Result<Jkt, JktError> {
        if s.len() != JKT_B64_LEN {
            return Err(JktError::Length { found: s.len() });
        }
        if let Some(at) = s
            .bytes()
            .position(|b| !(b.is_ascii_alphanumeric() || b == b'-' || b == b'_'))
        {
            return Err(JktError::Character { at });
        }
        let mut raw = [0u8; 33];
        match URL_SAFE_NO_PAD.decode_slice(s, &mut raw) {
            Ok(32) => {
                let mut b = [0u8; 32];
                b.copy_from_slice(&raw[..32]);
                Ok(Jkt(b))
            }
            // 43 characters of the alphabet decode to 32 bytes; only the
            // last character's unused bits can still be wrong.
            _ => Err(JktError::Character {
                at: JKT_B64_LEN - 1,
            }),
        }
    }

    /// The wire form: 43 base64url characters, no padding.
    pub fn to_base64url(&self) -> String {
        URL_SAFE_NO_PAD.encode(self.0)
    }
}

impl PartialEq for Jkt {
    fn eq(&self, other: &Jkt) -> bool {
        bool::from(self.0.ct_eq(&other.0))
    }
}

impl fmt::Debug for Jkt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Jkt(..)")
    }
}

impl FromStr for Jkt {
    type Err = JktError;
    fn from_str(s: &str) -> Result<Jkt, JktError> {
        Jkt::from_base64url(s)
    }
}

/// Why a string is not a thumbprint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum JktError {
    /// Not 43 characters long.
    Length {
        /// How many characters there were.
        found: usize,
    },
    /// A character outside the base64url alphabet (or non-zero unused
    /// bits in the last one).
    Character {
        /// Its byte offset.
        at: usize,
    },
}

impl fmt::Display for JktError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            JktError::Length { found } => write!(
                f,
                "DPoP key thumbprint (jkt) must be {JKT_B64_LEN} base64url characters, found {found}"
            ),
            JktError::Character { at } => write!(
                f,
                "DPoP key thumbprint (jkt): invalid base64url character at offset {at}"
            ),
        }
    }
}

impl std::error::Error for JktError {}

/// The per-client `dpop` knob.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Dpop {
    /// No binding: a presented proof is ignored (families already bound
    /// stay bound, for life).
    #[default]
    Off,
    /// A public client's family is bound to the key of the proof presented
    /// at the code exchange; without one it stays unbound.
    Allowed,
    /// No exchange or refresh without a proof; a public client's family is
    /// bound at the exchange, and a live unbound one (from before the
    /// switch) to the key of its next proof.
    Required,
}

/// What a passed check means for the family's binding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Binding {
    /// Not bound, and stays so.
    Unbound,
    /// Bound, and the presented key is its key.
    Bound,
    /// Not bound yet: bind it to this key once the redemption is accepted.
    Bind(Jkt),
}

/// The sender-constraint check of a redemption (RFC 9449 §5): `bound` is
/// the family's key, `presented` the key of the verified proof sent with
/// the request. A bound family needs its own key whatever the knob says
/// now; under `required` every redemption needs a proof, and a public
/// client's unbound family binds to it. Confidential clients' families
/// are never bound: their client authentication constrains them (RFC 9449
/// §5).
pub(crate) fn check(
    bound: Option<&Jkt>,
    presented: Option<&Jkt>,
    mode: Dpop,
    public_client: bool,
) -> Result<Binding, DenyReason> {
    match (bound, presented) {
        (Some(_), None) => Err(DenyReason::DpopProofRequired),
        (Some(b), Some(p)) if b == p => Ok(Binding::Bound),
        (Some(_), Some(_)) => Err(DenyReason::DpopKeyMismatch),
        (None, None) if mode == Dpop::Required => Err(DenyReason::DpopProofRequired),
        (None, None) => Ok(Binding::Unbound),
        (None, Some(p)) if mode == Dpop::Required && public_client => Ok(Binding::Bind(*p)),
        (None, Some(_)) => Ok(Binding::Unbound),
    }
}

/// The key a family born from a code exchange is bound to, once
/// [`check`] passed: a public client's, under `allowed` or `required`, to
/// the key of the exchange's proof (RFC 9449 §5); otherwise none.
pub(crate) fn at_exchange(presented: Option<&Jkt>, mode: Dpop, public_client: bool) -> Option<Jkt> {
    match mode {
        Dpop::Off => None,
        Dpop::Allowed | Dpop::Required => presented.filter(|_| public_client).copied(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: Jkt = Jkt([1; 32]);
    const B: Jkt = Jkt([2; 32]);

    #[test]
    fn thumbprints_parse_from_and_print_to_base64url() {
        // RFC 7638 §3.1's example thumbprint.
        let s = "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs";
        let j: Jkt = s.parse().unwrap();
        assert_eq!(j.to_base64url(), s);
        assert_eq!(j.as_bytes()[0], 0x37);
    }

    /// Bad input says what is wrong and where.
    #[test]
    fn bad_thumbprints_are_refused_naming_the_problem() {
        assert_eq!(
            Jkt::from_base64url("abc"),
            Err(JktError::Length { found: 3 })
        );
        let padded = "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9X=";
        assert_eq!(
            Jkt::from_base64url(padded),
            Err(JktError::Character { at: 42 })
        );
        let plus = "Nzb+sXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs";
        assert_eq!(
            Jkt::from_base64url(plus),
            Err(JktError::Character { at: 3 })
        );
        // Non-canonical: the last character's unused bits set.
        let loose = "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xt";
        assert!(Jkt::from_base64url(loose).is_err());
        assert!(
            JktError::Length { found: 3 }
                .to_string()
                .contains("43 base64url characters, found 3")
        );
    }

    #[test]
    fn debug_does_not_print_the_thumbprint() {
        let s = format!("{:?}", Jkt([0xab; 32]));
        assert_eq!(s, "Jkt(..)");
    }

    #[test]
    fn a_bound_family_needs_its_own_key_whatever_the_knob() {
        for mode in [Dpop::Off, Dpop::Allowed, Dpop::Required] {
            for public in [true, false] {
                assert_eq!(
                    check(Some(&A), None, mode, public),
                    Err(DenyReason::DpopProofRequired)
                );
                assert_eq!(
                    check(Some(&A), Some(&B), mode, public),
                    Err(DenyReason::DpopKeyMismatch)
                );
                assert_eq!(check(Some(&A), Some(&A), mode, public), Ok(Binding::Bound));
            }
        }
    }

    #[test]
    fn required_needs_a_proof_and_binds_only_public_clients() {
        let r = Dpop::Required;
        assert_eq!(
            check(None, None, r, true),
            Err(DenyReason::DpopProofRequired)
        );
        assert_eq!(
            check(None, None, r, false),
            Err(DenyReason::DpopProofRequired)
        );
        assert_eq!(check(None, Some(&A), r, true), Ok(Binding::Bind(A)));
        assert_eq!(check(None, Some(&A), r, false), Ok(Binding::Unbound));
    }

    #[test]
    fn off_and_allowed_leave_unbound_refreshes_alone() {
        for mode in [Dpop::Off, Dpop::Allowed] {
            assert_eq!(check(None, None, mode, true), Ok(Binding::Unbound));
            assert_eq!(check(None, Some(&A), mode, true), Ok(Binding::Unbound));
        }
    }

    #[test]
    fn the_exchange_binds_public_clients_that_allow_it() {
        assert_eq!(at_exchange(Some(&A), Dpop::Allowed, true), Some(A));
        assert_eq!(at_exchange(Some(&A), Dpop::Required, true), Some(A));
        assert_eq!(at_exchange(Some(&A), Dpop::Allowed, false), None);
        assert_eq!(at_exchange(Some(&A), Dpop::Off, true), None);
        assert_eq!(at_exchange(None, Dpop::Allowed, true), None);
    }
}
