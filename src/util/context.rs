//! Error context that names a path once: "evaluating RUN: RUN: not an SAE checkpoint" says the
//! directory twice, because the layer below already names it.

use anyhow::Result;
use std::path::Path;

/// `r` with "`what` PATH" as its context, unless its error already begins by naming `path`.
pub fn naming<T>(r: Result<T>, what: &str, path: &Path) -> Result<T> {
    r.map_err(|e| {
        let p = path.display().to_string();
        if e.to_string().starts_with(&p) {
            e
        } else {
            e.context(format!("{what} {p}"))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::Context;

    /// The error as `main` prints it.
    fn shown(e: anyhow::Error) -> String {
        format!("{e:#}")
    }

    #[test]
    fn a_path_is_named_once() {
        let p = Path::new("/runs/a");
        let inner: Result<()> = Err(anyhow::anyhow!("/runs/a: not an SAE checkpoint"));
        assert_eq!(shown(naming(inner, "evaluating", p).unwrap_err()), "/runs/a: not an SAE checkpoint");
        let other: Result<()> = Err(anyhow::anyhow!("cannot read cfg.json")).context("/runs/b: bad");
        assert_eq!(
            shown(naming(other, "evaluating", p).unwrap_err()),
            "evaluating /runs/a: /runs/b: bad: cannot read cfg.json"
        );
        let bare: Result<()> = Err(anyhow::anyhow!("d_in differs"));
        assert_eq!(shown(naming(bare, "export", p).unwrap_err()), "export /runs/a: d_in differs");
    }
}
