//! The bodies of the fuzz targets in `fuzz/fuzz_targets/`, here so that
//! `tests/fuzz_corpus.rs` replays the committed corpus through exactly the
//! code the fuzzer ran (FUZZING.md). Each takes the fuzzer's raw bytes and
//! panics when a property fails; none is part of the crate's API.

use std::net::IpAddr;
use std::sync::OnceLock;

use crate::RedeemRequest;
use crate::token::{self, TokenKind};
use crate::{
    AuthorizeRequest, Decision, DenyReason, Engine, ExchangeRequest, IssueRequest, PolicySet,
    StoredRecord,
};

const CLIENT: &str = "c";

fn ip() -> IpAddr {
    IpAddr::from([10, 0, 0, 1])
}

/// The fuzz targets' one call of the engine's redemption API.
fn redeem(e: &Engine, token: &str) -> Decision {
    e.redeem(&RedeemRequest::new(token, CLIENT).ip(ip()))
        .expect("no store, no error")
}

/// The fuzz targets' one call of the engine's code exchange API.
fn exchange(e: &Engine, code: &str, verifier: Option<&str>, redirect_uri: &str) -> Decision {
    e.exchange(&ExchangeRequest {
        code,
        code_verifier: verifier,
        client: CLIENT,
        redirect_uri,
        ip: Some(ip()),
        dpop: None,
    })
    .expect("no store, no error")
}

/// One engine per process holding one live family and one pending code, so
/// that inputs near a real token reach the family lookup and tag check.
fn engine() -> &'static (Engine, String, String) {
    static E: OnceLock<(Engine, String, String)> = OnceLock::new();
    E.get_or_init(|| {
        let e = Engine::builder().build().expect("engine");
        let t = e
            .issue(&IssueRequest {
                client: CLIENT,
                subject: "s",
                scope: "",
                ip: Some(ip()),
            })
            .expect("issue")
            .accepted()
            .expect("issued")
            .token;
        let c = e
            .authorize(&AuthorizeRequest {
                client: CLIENT,
                subject: "s",
                scope: "",
                redirect_uri: "https://app.example/cb",
                // RFC 7636 Appendix B's pair; the verifier is in the seed.
                code_challenge: Some("E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"),
                code_challenge_method: Some("S256"),
                ip: Some(ip()),
                dpop_jkt: None,
            })
            .expect("authorize")
            .accepted()
            .expect("authorized")
            .token;
        (e, t.as_str().to_owned(), c.as_str().to_owned())
    })
}

/// Parsing is exact: what parses spells itself back byte for byte, so a
/// token has one spelling (README, "Tokens").
fn parse_round_trips(s: &str) {
    for kind in [TokenKind::Refresh, TokenKind::Code] {
        if let Some(p) = token::parse(s, kind) {
            assert_eq!(
                p.reassemble().as_str(),
                s,
                "{kind:?} re-encodes differently"
            );
        }
    }
}

/// `verify_access_token`: any presented access token other than the real
/// one is refused and changes nothing; a parsed one spells itself back; no
/// access token is a refresh token or a code (README "Opaque access
/// tokens").
pub fn verify_access_token(data: &[u8]) {
    static REAL: OnceLock<String> = OnceLock::new();
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Some(p) = crate::access::parse(s) {
        assert_eq!(p.reassemble().as_str(), s, "re-encodes differently");
        for kind in [TokenKind::Refresh, TokenKind::Code] {
            assert!(
                token::parse(s, kind).is_none(),
                "an access token parsed as {kind:?}"
            );
        }
    }
    let (e, _, _) = engine();
    let real = REAL.get_or_init(|| {
        let issued = e
            .issue(&IssueRequest {
                client: CLIENT,
                subject: "s",
                scope: "openid",
                ip: Some(ip()),
            })
            .expect("issue");
        let a = issued.accepted().expect("issued");
        e.access_token(a, None)
            .expect("minted")
            .token
            .as_str()
            .to_owned()
    });
    if s == real {
        return;
    }
    let before = e.stats().families;
    assert!(
        e.verify_access_token(s).is_none(),
        "a forged access token verified"
    );
    assert_eq!(e.stats().families, before);
    assert!(
        e.verify_access_token(real).is_some(),
        "the real token survives"
    );
}

/// `redeem_token`: any presented refresh token other than the real one is
/// denied `invalid_token` and changes nothing.
pub fn redeem_token(data: &[u8]) {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    parse_round_trips(s);
    let (e, real, _) = engine();
    if s == real {
        return;
    }
    let before = e.stats().families;
    assert_eq!(redeem(e, s).deny_reason(), Some(DenyReason::InvalidToken));
    assert!(e.introspect(s).is_none());
    assert_eq!(e.stats().families, before);
    assert!(e.introspect(real).is_some(), "the real family survives");
}

/// `exchange_code`: code, verifier and redirect URI separated by NUL bytes
/// (no verifier when there are only two parts). A code other than the real
/// one is denied and changes nothing.
pub fn exchange_code(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let mut parts = text.split('\0');
    let code = parts.next().unwrap_or_default();
    let redirect = parts.next().unwrap_or_default();
    let verifier = parts.next();
    parse_round_trips(code);
    let (e, _, real) = engine();
    if code == real {
        return;
    }
    let before = e.stats().families;
    let d = exchange(e, code, verifier, redirect);
    assert!(d.accepted().is_none(), "a forged code was exchanged");
    assert_eq!(e.stats().families, before);
}

/// `store_record`: decoding arbitrary bytes never panics; what decodes
/// re-encodes to a record that decodes to itself (the codec reads an older
/// code layout and writes only the current one, so the first re-encoding
/// may differ from the input, the second may not).
pub fn store_record(data: &[u8]) {
    let Some(r) = StoredRecord::decode(data, 1) else {
        return;
    };
    let mut once = Vec::new();
    crate::store::codec::encode(&r.family, &mut once);
    let again = StoredRecord::decode(&once, 1).expect("a re-encoded record decodes");
    let mut twice = Vec::new();
    crate::store::codec::encode(&again.family, &mut twice);
    assert_eq!(once, twice, "re-encoding is not stable");
}

/// `policy_toml`: two policy files separated by a NUL byte. The loader
/// never panics, and every refusal names one of the files.
pub fn policy_toml(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let (a, b) = text.split_once('\0').unwrap_or((&text, ""));
    let files = [
        (std::path::Path::new("a.toml"), a),
        (std::path::Path::new("b.toml"), b),
    ];
    if let Err(errors) = PolicySet::from_toml(&files) {
        assert!(!errors.is_empty());
        for e in errors.errors() {
            assert!(files.iter().any(|(p, _)| e.path == *p), "{e}");
            assert!(!e.to_string().is_empty());
        }
    }
}

#[cfg(feature = "durable")]
pub use segment::{log_segment, sample_segment};

#[cfg(feature = "durable")]
mod segment {
    use std::collections::HashMap;
    use std::fs;
    use std::io::Write;
    use std::path::{Path, PathBuf};
    use std::sync::atomic::{AtomicU64, Ordering};

    use super::{CLIENT, Engine, IssueRequest, ip, redeem};
    use crate::Error;
    use crate::store::{LogOptions, LogStore, Store, codec, private};
    use crate::token::FamilyId;

    const SEGMENT: &str = "log-00000000000000000001.rgl";

    /// A fresh private directory for one run, on tmpfs when there is one
    /// (recovery syncs files; a disk would make each run slow).
    fn scratch() -> PathBuf {
        static N: AtomicU64 = AtomicU64::new(0);
        let shm = Path::new("/dev/shm");
        let base = if shm.is_dir() {
            shm.to_owned()
        } else {
            std::env::temp_dir()
        };
        let dir = base.join(format!(
            "rg-fuzz-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&dir);
        private::create_dir(&dir).expect("scratch directory");
        dir
    }

    /// The framing of docs/store.md ("Files and records"), read independently of
    /// the store: length u32 LE, CRC-32 u32 LE of the body, body = kind u8,
    /// LSN u64 LE, payload.
    struct Framed<'a> {
        lsn: u64,
        kind: u8,
        payload: &'a [u8],
    }

    fn framed(b: &[u8], off: usize) -> Option<(Framed<'_>, usize)> {
        let head = b.get(off..off + 8)?;
        let len = u32::from_le_bytes(head[..4].try_into().ok()?) as usize;
        let crc = u32::from_le_bytes(head[4..].try_into().ok()?);
        let body = b.get(off + 8..(off + 8).checked_add(len)?)?;
        if !(9..=64 * 1024).contains(&len) || crc32fast::hash(body) != crc {
            return None;
        }
        let lsn = u64::from_le_bytes(body[1..9].try_into().ok()?);
        Some((
            Framed {
                lsn,
                kind: body[0],
                payload: &body[9..],
            },
            off + 8 + len,
        ))
    }

    /// The family a checksummed record is about, and whether it is live;
    /// `None` for a record the store must not accept.
    fn meaning(r: &Framed<'_>) -> Option<(FamilyId, bool)> {
        // LSNs count up from 1 and stay below 2^63 (docs/store.md).
        if r.lsn == 0 || r.lsn > i64::MAX as u64 {
            return None;
        }
        match r.kind {
            1 => codec::decode(r.payload).map(|f| (f.id, true)),
            2 => Some((FamilyId::from_bytes(r.payload.try_into().ok()?), false)),
            _ => None,
        }
    }

    /// Recompute every record's checksum along the length fields, so the
    /// fuzzer's mutations reach the decoder and replay, not only the
    /// checksum test.
    fn reseal(b: &mut [u8]) {
        let mut off = 0;
        while let Some(head) = b.get(off..off + 8) {
            let len = u32::from_le_bytes(head[..4].try_into().expect("4 bytes")) as usize;
            let Some(end) = (off + 8).checked_add(len).filter(|&e| e <= b.len()) else {
                return;
            };
            let crc = crc32fast::hash(&b[off + 8..end]);
            b[off + 4..off + 8].copy_from_slice(&crc.to_le_bytes());
            off = end;
        }
    }

    /// `log_segment`: the first byte is flags (bit 0: reseal the
    /// checksums), the rest is the only segment of a store. Opening it
    /// either recovers exactly the replay of its longest prefix of whole,
    /// checksummed, decodable records (cutting the file there) or refuses
    /// with `Error::Corrupt` naming the segment and that prefix's end,
    /// leaving the file as it was. It never accepts a record whose
    /// checksum fails.
    pub fn log_segment(data: &[u8]) {
        let Some((&flags, segment)) = data.split_first() else {
            return;
        };
        let mut segment = segment.to_vec();
        if flags & 1 == 1 {
            reseal(&mut segment);
        }
        // What the store may accept: the prefix, replayed newest LSN first.
        let mut end = 0;
        let mut replay: HashMap<FamilyId, (u64, bool)> = HashMap::new();
        while let Some((r, next)) = framed(&segment, end) {
            let Some((id, live)) = meaning(&r) else { break };
            match replay.get(&id) {
                Some((seen, _)) if *seen >= r.lsn => {}
                _ => {
                    replay.insert(id, (r.lsn, live));
                }
            }
            end = next;
        }
        let mut want: Vec<(FamilyId, u64)> = replay
            .into_iter()
            .filter(|(_, (_, live))| *live)
            .map(|(id, (lsn, _))| (id, lsn))
            .collect();
        want.sort();

        let dir = scratch();
        let path = dir.join(SEGMENT);
        private::file_options()
            .create_new(true)
            .write(true)
            .open(&path)
            .and_then(|mut f| f.write_all(&segment))
            .expect("write the segment");
        match LogStore::open(&dir, LogOptions::default()) {
            Ok(store) => {
                let mut got: Vec<(FamilyId, u64)> = store
                    .recover()
                    .expect("recover")
                    .iter()
                    .map(|r| (r.id(), r.lsn()))
                    .collect();
                got.sort();
                drop(store);
                assert_eq!(got, want, "recovered something other than the prefix");
                let left = fs::read(&path).expect("read back");
                assert_eq!(left, segment[..end], "the segment is not cut at the prefix");
            }
            Err(Error::Corrupt {
                file,
                offset,
                detail,
            }) => {
                assert_eq!(file, path);
                assert_eq!(offset, end as u64, "the refusal names another offset");
                assert!(detail.contains("store repair"), "{detail}");
                let left = fs::read(&path).expect("read back");
                assert_eq!(left, segment, "a refused segment was changed");
            }
            Err(e) => panic!("refused with something other than Corrupt: {e}"),
        }
        fs::remove_dir_all(&dir).expect("remove the scratch directory");
    }

    /// A segment written by the store itself: families issued, rotated and
    /// redeemed with a spent token (a revocation), for the seed corpus.
    pub fn sample_segment() -> Vec<u8> {
        let dir = scratch();
        {
            let store = LogStore::open(&dir, LogOptions::default()).expect("open");
            let e = Engine::builder().store(store).build().expect("engine");
            for subject in ["alice", "bob"] {
                let t = e
                    .issue(&IssueRequest {
                        client: CLIENT,
                        subject,
                        scope: "offline_access",
                        ip: Some(ip()),
                    })
                    .expect("issue")
                    .accepted()
                    .expect("issued")
                    .token;
                let t2 = redeem(&e, &t).accepted().expect("rotated").token;
                let _ = redeem(&e, &t2);
                // The first token again: reuse, the family is revoked.
                let _ = redeem(&e, &t);
            }
        }
        let bytes = fs::read(dir.join(SEGMENT)).expect("the store's segment");
        fs::remove_dir_all(&dir).expect("remove the scratch directory");
        bytes
    }
}
