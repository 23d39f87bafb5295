//! Golden-file checks for tests: compare output with `tests/data/NAME`
//! under the crate; `BLESS=1` rewrites the file instead.
#![cfg(test)]

use std::path::PathBuf;

/// Compares `actual` with the golden file `name`, or rewrites it when the
/// environment has `BLESS=1`.
pub fn check(name: &str, actual: &[u8]) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(name);
    if std::env::var_os("BLESS").is_some_and(|v| v == "1") {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, actual).unwrap();
        return;
    }
    let expected = std::fs::read(&path).unwrap_or_else(|e| {
        panic!(
            "golden file {} unreadable ({e}); create it with BLESS=1",
            path.display()
        )
    });
    if expected != actual {
        let actual_path = path.with_extension("actual");
        std::fs::write(&actual_path, actual).unwrap();
        panic!(
            "output differs from golden file {}; actual written to {} (diff them; BLESS=1 accepts)",
            path.display(),
            actual_path.display()
        );
    }
}
