//! JSON-lines logs (`metrics.jsonl`, `history.jsonl`) read back line by line.
//!
//! A line that does not parse (a write cut off by `kill -9`, or a hand edit) is skipped, but never
//! silently: one note on stderr names the file, how many lines were skipped and where, so that a
//! curve or a resumed log with a hole in it does not pass unnoticed.

use serde::de::DeserializeOwned;
use serde_json::Value;
use std::path::Path;

/// The lines of `text` (read from `path`) that are JSON, each with its text; blank lines are not
/// counted as bad.
pub fn parse<'a>(path: &Path, text: &'a str) -> Vec<(&'a str, Value)> {
    read(path, text, "are not JSON", |line| Some((line, serde_json::from_str::<Value>(line).ok()?)))
}

/// The lines of `text` that are JSON records of type `T`; the others are noted as skipped.
pub fn parse_as<T: DeserializeOwned>(path: &Path, text: &str) -> Vec<T> {
    read(path, text, "are not records of this log", |line| serde_json::from_str(line).ok())
}

/// `each` of the non-blank lines; those it gives nothing for are noted (`what` they are).
fn read<'a, T>(path: &Path, text: &'a str, what: &str, each: impl Fn(&'a str) -> Option<T>) -> Vec<T> {
    let mut out = Vec::new();
    let mut bad = Vec::new();
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        match each(line) {
            Some(v) => out.push(v),
            None => bad.push(i + 1),
        }
    }
    note_skipped(path, &bad, what);
    out
}

/// The note for skipped lines, or None when there are none.
pub fn skipped_note(path: &Path, bad: &[usize], what: &str) -> Option<String> {
    let first = bad.first()?;
    let lines = match bad.len() {
        1 => format!("line {first}"),
        n => format!("{n} lines, the first line {first}"),
    };
    Some(format!("{}: skipped {lines}: they {what}", path.display()))
}

fn note_skipped(path: &Path, bad: &[usize], what: &str) {
    if let Some(n) = skipped_note(path, bad, what) {
        eprintln!("note: {n}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_lines_are_skipped_and_named() {
        let p = Path::new("metrics.jsonl");
        let text = "{\"step\": 1}\n\n{\"step\": 2\nnot json\n{\"step\": 3}\n";
        let got: Vec<u64> = parse(p, text).iter().map(|(_, v)| v["step"].as_u64().unwrap()).collect();
        assert_eq!(got, [1, 3]);
        assert_eq!(
            skipped_note(p, &[3, 4], "are not JSON").unwrap(),
            "metrics.jsonl: skipped 2 lines, the first line 3: they are not JSON"
        );
        assert_eq!(skipped_note(p, &[], "x"), None);
        #[derive(serde::Deserialize)]
        struct R {
            step: u64,
        }
        let typed: Vec<R> = parse_as(p, "{\"step\": 1}\n{\"step\": \"a\"}\n");
        assert_eq!(typed.len(), 1);
        assert_eq!(typed[0].step, 1);
    }
}
