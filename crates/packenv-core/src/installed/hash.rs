//! The hash a RECORD line gives for a file (`sha256=<URL-safe base64, no padding>`, as wheels
//! and installers write it: PEP 376, PEP 427) and the sha256 of a file on disk, read in chunks
//! within a byte budget, a deadline and a cancellation flag.

use std::io::Read;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use sha2::{Digest, Sha256};

/// What a RECORD line's hash field says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Recorded {
    /// No hash: the RECORD itself, bytecode, files an installer wrote without hashing them.
    None,
    /// The file's sha256 when it was installed.
    Sha256([u8; 32]),
    /// Another algorithm (`sha512=`, ...). Installers write sha256; anything else is left to
    /// the presence check rather than guessed at.
    Other,
}

/// The hash field `field` could not be read: `sha256=` with something that is not 32 bytes
/// of URL-safe base64, or a field that is not `algorithm=value` at all.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Malformed;

/// Reads one RECORD hash field (quotes already undone).
pub(super) fn parse(field: &[u8]) -> Result<Recorded, Malformed> {
    if field.is_empty() {
        return Ok(Recorded::None);
    }
    let eq = field.iter().position(|&b| b == b'=').ok_or(Malformed)?;
    let (algorithm, value) = (&field[..eq], &field[eq + 1..]);
    if algorithm.is_empty() || !algorithm.iter().all(u8::is_ascii_alphanumeric) {
        return Err(Malformed);
    }
    if algorithm != b"sha256" {
        return Ok(Recorded::Other);
    }
    // Padding is not written by installers, but it says nothing false either.
    let value = value.strip_suffix(b"=").unwrap_or(value);
    let mut digest = [0u8; 32];
    match URL_SAFE_NO_PAD.decode_slice(value, &mut digest) {
        Ok(32) => Ok(Recorded::Sha256(digest)),
        _ => Err(Malformed),
    }
}

/// A digest as RECORD writes it.
pub(super) fn encode(digest: &[u8; 32]) -> String {
    URL_SAFE_NO_PAD.encode(digest)
}

/// Why hashing a file stopped before its end.
#[derive(Debug)]
pub(super) enum Unhashed {
    /// The file holds more than the bytes left to hash.
    Budget,
    /// The deadline passed.
    Deadline,
    /// The caller no longer wants the result.
    Cancelled,
    Io(std::io::Error),
}

/// The sha256 of everything `file` holds, read in chunks; `left` is how many bytes may still be
/// hashed and goes down by what was read.
pub(super) fn sha256(
    file: impl Read,
    left: &mut u64,
    deadline: Option<Instant>,
    cancelled: &AtomicBool,
) -> Result<[u8; 32], Unhashed> {
    let mut hasher = Sha256::new();
    // One byte past the budget tells a file that fits from one that does not.
    let mut file = file.take(left.saturating_add(1));
    let mut buf = vec![0u8; 64 << 10];
    loop {
        if cancelled.load(Ordering::Relaxed) {
            return Err(Unhashed::Cancelled);
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            return Err(Unhashed::Deadline);
        }
        let n = match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(Unhashed::Io(e)),
        };
        if n as u64 > *left {
            *left = 0;
            return Err(Unhashed::Budget);
        }
        *left -= n as u64;
        hasher.update(&buf[..n]);
    }
    Ok(hasher.finalize().into())
}

#[cfg(test)]
mod tests {
    use super::*;

    const EMPTY: &str = "47DEQpj8HBSa-_TImW-5JCeuQeRkm5NMpJWZG3hSuFU";

    #[test]
    fn a_sha256_field_is_read_as_record_writes_it() {
        let Ok(Recorded::Sha256(d)) = parse(format!("sha256={EMPTY}").as_bytes()) else {
            panic!("not read");
        };
        assert_eq!(encode(&d), EMPTY);
        assert_eq!(
            parse(format!("sha256={EMPTY}=").as_bytes()),
            Ok(Recorded::Sha256(d))
        );
    }

    #[test]
    fn an_empty_field_or_another_algorithm_is_not_checked() {
        assert_eq!(parse(b""), Ok(Recorded::None));
        assert_eq!(parse(b"sha512=abc"), Ok(Recorded::Other));
    }

    #[test]
    fn malformed_fields_are_told_apart_from_absent_ones() {
        for bad in [
            "sha256".to_string(),
            "=abc".into(),
            "sha 256=abc".into(),
            "sha256=".into(),
            "sha256=not base64!".into(),
            format!("sha256={}", &EMPTY[..40]),
            format!("sha256={EMPTY}AAAA"),
            // The standard alphabet is not the one RECORD uses.
            format!("sha256={}", EMPTY.replace('-', "+")),
        ] {
            assert_eq!(parse(bad.as_bytes()), Err(Malformed), "{bad}");
        }
    }

    #[test]
    fn a_file_is_hashed_within_its_budget() {
        let never = AtomicBool::new(false);
        let mut left = 10;
        let d = sha256(&b""[..], &mut left, None, &never).unwrap();
        assert_eq!((encode(&d), left), (EMPTY.to_owned(), 10));
        let d = sha256(&b"0123456789"[..], &mut left, None, &never).unwrap();
        assert_eq!(left, 0);
        assert_eq!(d, <[u8; 32]>::from(Sha256::digest(b"0123456789")));
        let mut left = 9;
        assert!(matches!(
            sha256(&b"0123456789"[..], &mut left, None, &never),
            Err(Unhashed::Budget)
        ));
    }

    #[test]
    fn hashing_stops_when_cancelled_or_past_its_deadline() {
        let (never, now) = (AtomicBool::new(false), AtomicBool::new(true));
        let mut left = u64::MAX;
        assert!(matches!(
            sha256(&b"x"[..], &mut left, None, &now),
            Err(Unhashed::Cancelled)
        ));
        assert!(matches!(
            sha256(&b"x"[..], &mut left, Some(Instant::now()), &never),
            Err(Unhashed::Deadline)
        ));
    }
}
