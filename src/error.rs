//! Errors: misuse, misconfiguration and failures of the machinery.
//!
//! A denied refresh is not an error: it is a [`Decision`](crate::Decision).

use std::fmt;
use std::io;
use std::sync::Arc;

use crate::policy::{LoadError, PolicyError};
use crate::token::KeyId;

/// What went wrong outside the decision itself.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Error {
    /// The key ring already holds a key with this id.
    DuplicateKey {
        /// The id that was added twice.
        id: KeyId,
    },
    /// The key ring holds no key with this id.
    UnknownKey {
        /// The id asked for.
        id: KeyId,
    },
    /// The active key cannot be removed; activate another key first.
    RemoveActiveKey {
        /// The active key's id.
        id: KeyId,
    },
    /// The operating system's random number generator failed.
    Random {
        /// The OS error text.
        detail: String,
    },
    /// A policy set was refused; every problem is listed.
    Policy {
        /// One entry per problem found.
        errors: Vec<PolicyError>,
    },
    /// A policy directory was refused; every problem is listed with its
    /// file, line, column and key.
    PolicyFiles {
        /// One entry per problem found.
        errors: Vec<LoadError>,
    },
    /// The store failed to read or write; the engine refuses changes until
    /// restarted (fail closed).
    Store {
        /// What failed, with the file.
        detail: String,
        /// The operating system's error underneath, when there is one; also
        /// [`source`](std::error::Error::source).
        cause: Option<IoCause>,
    },
    /// A store file is corrupt in the middle (not a torn last write).
    Corrupt {
        /// The file.
        file: std::path::PathBuf,
        /// Byte offset of the bad record.
        offset: u64,
        /// What is wrong and what to do.
        detail: String,
    },
    /// A store directory or file is open to every user of the machine or
    /// owned by another user: refused, since records hold subjects and
    /// per-family secrets.
    Exposed {
        /// The directory or file.
        path: std::path::PathBuf,
        /// Its mode or owner, and the command that fixes it.
        detail: String,
    },
    /// An argument is empty or too long.
    InvalidArgument {
        /// Which argument.
        name: &'static str,
        /// What is allowed.
        expected: &'static str,
    },
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::DuplicateKey { id } => write!(f, "key ring already holds key {id}"),
            Error::UnknownKey { id } => write!(f, "key ring holds no key {id}"),
            Error::RemoveActiveKey { id } => {
                write!(
                    f,
                    "key {id} is active; activate another key before removing it"
                )
            }
            Error::Random { detail } => write!(f, "os random number generator failed: {detail}"),
            Error::Policy { errors } => {
                write!(f, "policy set refused ({} problem", errors.len())?;
                if errors.len() != 1 {
                    f.write_str("s")?;
                }
                f.write_str(")")?;
                for e in errors {
                    write!(f, "\n  {e}")?;
                }
                Ok(())
            }
            Error::PolicyFiles { errors } => {
                write!(f, "policy files refused ({} problem", errors.len())?;
                if errors.len() != 1 {
                    f.write_str("s")?;
                }
                f.write_str(")")?;
                for e in errors {
                    write!(f, "\n  {e}")?;
                }
                Ok(())
            }
            Error::Store { detail, .. } => write!(f, "store failed: {detail}"),
            Error::Corrupt {
                file,
                offset,
                detail,
            } => write!(
                f,
                "{}: corrupt at offset {offset}: {detail}",
                file.display()
            ),
            Error::Exposed { path, detail } => write!(f, "{}: {detail}", path.display()),
            Error::InvalidArgument { name, expected } => {
                write!(f, "invalid {name}: expected {expected}")
            }
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Store {
                cause: Some(cause), ..
            } => Some(cause.get()),
            _ => None,
        }
    }
}

// Only the durable store builds store errors.
#[cfg_attr(not(feature = "durable"), allow(dead_code))]
impl Error {
    /// A store failure with no operating-system error underneath.
    pub(crate) fn store(detail: impl Into<String>) -> Error {
        Error::Store {
            detail: detail.into(),
            cause: None,
        }
    }

    /// A store failure caused by `cause`.
    pub(crate) fn store_io(detail: impl Into<String>, cause: io::Error) -> Error {
        Error::Store {
            detail: detail.into(),
            cause: Some(IoCause(Arc::new(cause))),
        }
    }
}

/// An `io::Error` kept as the cause of an [`Error`], shared so that the
/// error stays `Clone`. Two are equal when their kind and text are.
#[derive(Clone, Debug)]
pub struct IoCause(Arc<io::Error>);

impl IoCause {
    /// The error itself.
    pub fn get(&self) -> &io::Error {
        &self.0
    }
}

impl PartialEq for IoCause {
    fn eq(&self, other: &IoCause) -> bool {
        self.0.kind() == other.0.kind() && self.0.to_string() == other.0.to_string()
    }
}

impl Eq for IoCause {}
