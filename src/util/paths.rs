//! Why a path cannot be used, in words: a missing path, a symbolic link to nothing, or a loop
//! of links. The system's own messages say "No such file or directory" for a link to nothing
//! and "File exists" when creating a directory at a looping link, neither of which tells the
//! user that the path is a link.

use std::path::{Path, PathBuf};

/// What is wrong with `path` where something must exist there, as "{what} {path} ...".
pub fn missing(path: &Path, what: &str) -> String {
    match dangling(path) {
        Some(why) => format!("{what} {} {why}", path.display()),
        None => format!("{what} {} does not exist", path.display()),
    }
}

/// Refuse a path that is a symbolic link to nothing or in a loop (`what` names the option),
/// before anything is created through it.
pub fn refuse_dangling(path: &Path, what: &str) -> anyhow::Result<()> {
    match dangling(path) {
        Some(why) => anyhow::bail!("{what} {} {why}", path.display()),
        None => Ok(()),
    }
}

/// "is a symbolic link to T, which does not exist" or "is a symbolic link in a loop (a -> b ->
/// a)" when `path` is such a link, else None.
pub fn dangling(path: &Path) -> Option<String> {
    let target = std::fs::read_link(path).ok()?;
    match std::fs::metadata(path) {
        Ok(_) => None,
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
            Some(format!("is a symbolic link in a loop ({})", chain(path)))
        }
        Err(_) => Some(format!("is a symbolic link to {}, which does not exist", target.display())),
    }
}

/// The links from `path` until one repeats (at most 8 shown).
fn chain(path: &Path) -> String {
    let mut seen: Vec<PathBuf> = vec![path.to_path_buf()];
    let mut at = path.to_path_buf();
    while let Ok(next) = std::fs::read_link(&at) {
        let next = match next.is_absolute() {
            true => next,
            false => at.parent().unwrap_or(Path::new("")).join(next),
        };
        let repeats = seen.contains(&next);
        seen.push(next.clone());
        if repeats || seen.len() > 8 {
            break;
        }
        at = next;
    }
    seen.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(" -> ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links_to_nothing_and_loops_are_named() {
        let d = tempfile::tempdir().unwrap();
        let (a, b, gone) = (d.path().join("a"), d.path().join("b"), d.path().join("gone"));
        std::os::unix::fs::symlink(&b, &a).unwrap();
        std::os::unix::fs::symlink(&a, &b).unwrap();
        std::os::unix::fs::symlink(d.path().join("nothing"), &gone).unwrap();
        let m = missing(&a, "--data");
        assert!(m.contains("is a symbolic link in a loop") && m.contains("/a -> ") && m.contains("/b -> "), "{m}");
        assert!(missing(&gone, "--out").ends_with("nothing, which does not exist"));
        assert!(missing(&d.path().join("x"), "--data").ends_with("/x does not exist"));
        assert!(refuse_dangling(&gone, "--out").is_err() && refuse_dangling(d.path(), "--out").is_ok());
        assert!(refuse_dangling(&d.path().join("new"), "--out").is_ok());
    }
}
