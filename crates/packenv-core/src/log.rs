//! A build log capped in memory as it is written (DESIGN §6): the head and the tail are kept and
//! the middle is replaced by a marker, so a step that prints gigabytes costs a fixed amount of
//! memory and the row still shows how the output began and how it ended.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};

/// Output of every step of one build, capped to `head_cap + tail_cap` bytes.
#[derive(Debug)]
pub struct CappedLog {
    head: Vec<u8>,
    tail: VecDeque<u8>,
    head_cap: usize,
    tail_cap: usize,
    /// Bytes dropped between head and tail.
    elided: u64,
    /// Bumped on every write so a flusher can tell whether the row is behind.
    version: u64,
}

impl CappedLog {
    /// A log that keeps at most `cap` bytes: a quarter from the start, the rest from the end.
    pub fn new(cap: usize) -> Self {
        let head_cap = cap / 4;
        CappedLog {
            head: Vec::new(),
            tail: VecDeque::new(),
            head_cap,
            tail_cap: cap - head_cap,
            elided: 0,
            version: 0,
        }
    }

    pub fn write(&mut self, mut bytes: &[u8]) {
        self.version += 1;
        if self.head.len() < self.head_cap {
            let take = bytes.len().min(self.head_cap - self.head.len());
            self.head.extend_from_slice(&bytes[..take]);
            bytes = &bytes[take..];
        }
        if bytes.len() >= self.tail_cap {
            self.elided += (self.tail.len() + bytes.len() - self.tail_cap) as u64;
            self.tail.clear();
            self.tail.extend(&bytes[bytes.len() - self.tail_cap..]);
            return;
        }
        let overflow = (self.tail.len() + bytes.len()).saturating_sub(self.tail_cap);
        self.tail.drain(..overflow);
        self.elided += overflow as u64;
        self.tail.extend(bytes);
    }

    pub fn line(&mut self, text: &str) {
        self.write(text.as_bytes());
        self.write(b"\n");
    }

    pub fn version(&self) -> u64 {
        self.version
    }

    /// The log as text (invalid UTF-8 replaced), with a marker where bytes were dropped.
    pub fn render(&self) -> String {
        let mut out = String::from_utf8_lossy(&self.head).into_owned();
        if self.elided > 0 {
            out.push_str(&format!(
                "\n[... {} bytes of output elided by packenvd ...]\n",
                self.elided
            ));
        }
        let (a, b) = self.tail.as_slices();
        let mut tail = Vec::with_capacity(a.len() + b.len());
        tail.extend_from_slice(a);
        tail.extend_from_slice(b);
        out.push_str(&String::from_utf8_lossy(&tail));
        // Postgres TEXT cannot hold NUL.
        out.replace('\0', "\u{FFFD}")
    }
}

/// A [`CappedLog`] shared by the tasks of one build: the output pumps of its steps, the build
/// itself (its `==>` lines) and the flusher that copies it to the row.
#[derive(Debug, Clone)]
pub struct BuildLog(Arc<Mutex<CappedLog>>);

impl BuildLog {
    pub fn new(cap: usize) -> Self {
        BuildLog(Arc::new(Mutex::new(CappedLog::new(cap))))
    }

    /// The log, even if a writer panicked while holding it (a log is never left half-valid:
    /// every write completes or does not start).
    pub fn lock(&self) -> MutexGuard<'_, CappedLog> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Appends one line of packenvd's own (`==> step 1/2 ...`).
    pub fn line(&self, text: &str) {
        self.lock().line(text);
    }

    pub fn render(&self) -> String {
        self.lock().render()
    }

    pub fn version(&self) -> u64 {
        self.lock().version()
    }
}

/// The last `max_lines` lines of `text`, at most `max_bytes` bytes, for an error message.
pub fn tail_lines(text: &str, max_lines: usize, max_bytes: usize) -> String {
    let text = text.trim_end();
    let mut start = text.len();
    for _ in 0..max_lines {
        match text[..start].rfind('\n') {
            Some(nl) => start = nl,
            None => {
                start = 0;
                break;
            }
        }
    }
    let mut tail = text[start..].trim_start_matches('\n');
    if tail.len() > max_bytes {
        let mut cut = tail.len() - max_bytes;
        while !tail.is_char_boundary(cut) {
            cut += 1;
        }
        tail = &tail[cut..];
    }
    tail.to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_output_is_kept_whole() {
        let mut log = CappedLog::new(100);
        log.line("hello");
        log.line("world");
        assert_eq!(log.render(), "hello\nworld\n");
    }

    #[test]
    fn large_output_keeps_head_and_tail_with_a_marker() {
        let mut log = CappedLog::new(40);
        log.write(b"HEAD-HEAD-");
        for _ in 0..10_000 {
            log.write(b"middle ");
        }
        log.write(b"the end");
        let text = log.render();
        assert!(text.starts_with("HEAD-HEAD-"), "{text}");
        assert!(text.ends_with("the end"), "{text}");
        assert!(text.contains("bytes of output elided"), "{text}");
        assert!(text.len() < 200);
    }

    #[test]
    fn one_huge_write_is_capped_too() {
        let mut log = CappedLog::new(1000);
        log.write(&vec![b'x'; 10_000_000]);
        assert!(log.render().len() < 1100);
    }

    #[test]
    fn tail_lines_takes_the_last_lines() {
        assert_eq!(tail_lines("a\nb\nc\nd\n", 2, 100), "c\nd");
        assert_eq!(tail_lines("a\nb", 5, 100), "a\nb");
        assert_eq!(tail_lines("abcdef", 5, 3), "def");
    }
}
